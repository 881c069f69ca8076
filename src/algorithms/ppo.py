"""PPO for language models (RLHF): a policy with a value head samples completions; rewards come
from a REWARDS function or a reward model, with a per-token KL penalty to a frozen reference;
advantages by GAE; the clipped surrogate objective. Each rollout serves ``ppo_epochs`` steps."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional

import torch
from pydantic import Field, PositiveFloat
from torch import nn

from src.algorithms.base import Task
from src.algorithms.ssl_base import frozen_copy
from src.core.registry import REWARDS, TASKS


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over (N, T) response tokens; returns (advantages,
    returns). ``mask`` is 1 on real response tokens; values after the last one count as 0."""
    n, t = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(n, device=rewards.device)
    for i in reversed(range(t)):
        next_value = values[:, i + 1] * mask[:, i + 1] if i + 1 < t else torch.zeros_like(last)
        delta = rewards[:, i] + gamma * next_value - values[:, i]
        last = delta + gamma * lam * last * (mask[:, i + 1] if i + 1 < t else 0)
        adv[:, i] = last * mask[:, i]
    return adv, adv + values


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded sequences, counted from each one's first real token, as
    ``generate`` counts them: a forward without them would score a shifted sequence."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def token_logps(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under ``logits``: (N, T, V) logits and (N, T) tokens -> (N, T)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[..., None])[..., 0]


@dataclass
class Rollout:
    """One batch of sampled completions and everything the updates on it need. N sequences of
    P prompt tokens (left-padded) followed by T response tokens (right-padded after EOS)."""

    seq: torch.Tensor  # (N, P + T) prompt and response ids
    mask: torch.Tensor  # (N, P + T) attention mask
    response_mask: torch.Tensor  # (N, T) 1 on response tokens up to and including the first EOS
    old_logp: torch.Tensor  # (N, T) log pi_old of each response token
    advantages: torch.Tensor  # (N, T) GAE advantages, whitened over the response tokens
    returns: torch.Tensor  # (N, T) value targets
    score: torch.Tensor  # () mean reward of the completions
    kl: torch.Tensor  # () mean KL(pi_old || pi_ref) per completion
    kl_coef: torch.Tensor  # () the KL penalty used for this rollout
    length: torch.Tensor  # () mean response length
    prompt_len: int  # P

    def to(self, device) -> Rollout:
        moved: dict[str, Any] = {
            f.name: v.to(device)
            for f in dataclasses.fields(self)
            if isinstance(v := getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)


@TASKS.register("ppo")
class PPO(Task):
    """Batches hold left-padded ``input_ids``/``attention_mask`` of prompts (the ``prompts`` data)."""

    def __init__(
        self,
        model,
        reward: Annotated[
            dict[str, Any],
            Field(description='a REWARDS section, e.g. {type: contains, pattern: "return"}'),
        ],
        max_new_tokens: Annotated[
            int, Field(ge=1, description="length of each sampled completion")
        ] = 24,
        temperature: Annotated[
            float, Field(gt=0, description="sampling temperature of the completions")
        ] = 1.0,
        kl_coef: Annotated[
            float,
            Field(
                ge=0,
                description="per-token penalty on log pi - log pi_ref (the starting value when "
                "adaptive)",
            ),
        ] = 0.05,
        kl_target: Annotated[
            Optional[PositiveFloat],
            Field(
                description="turns on the adaptive controller of Ziegler et al. (2019): after each "
                "rollout kl_coef *= 1 + clip(KL / kl_target - 1, -0.2, 0.2) * samples / "
                "kl_horizon, so the KL per completion settles near the target instead of "
                "growing with the reward"
            ),
        ] = None,
        kl_horizon: Annotated[
            float,
            Field(gt=0, description="samples over which the controller acts (smaller: faster)"),
        ] = 10000.0,
        clip: Annotated[float, Field(gt=0, description="PPO ratio clip")] = 0.2,
        vf_coef: Annotated[float, Field(ge=0, description="weight of the value loss")] = 0.5,
        gamma: Annotated[float, Field(gt=0, le=1, description="discount of GAE")] = 1.0,
        lam: Annotated[float, Field(gt=0, le=1, description="lambda of GAE")] = 0.95,
        ppo_epochs: Annotated[
            int,
            Field(
                ge=1,
                description="optimizer steps per rollout (the ratio moves away from 1 after the first)",
            ),
        ] = 2,
        reference: Annotated[
            Literal["auto", "frozen_copy", "disable_adapter"],
            Field(description="frozen_copy or disable_adapter (auto picks by the model)"),
        ] = "auto",
    ):
        super().__init__(model)
        self.reward_section = reward
        self.gen = dict(max_new_tokens=max_new_tokens, temperature=temperature)
        self.kl_coef, self.clip, self.vf_coef = kl_coef, clip, vf_coef
        self.kl_target, self.kl_horizon = kl_target, kl_horizon
        self.gamma, self.lam, self.ppo_epochs = gamma, lam, ppo_epochs
        self.steps_per_batch = ppo_epochs  # the trainer gives a rollout's steps the same batch
        self.adapter_off = reference == "disable_adapter" or (
            reference == "auto" and hasattr(model, "disable_adapter")
        )
        if not self.adapter_off:
            self.reference = frozen_copy(model).eval()
        self._rollout: Optional[Rollout] = None
        self._uses = 0

    def configure(self, info) -> None:
        self.tokenizer = info.extra["tokenizer"]
        hidden = (
            self.causal_lm.config.get_text_config().hidden_size
            if hasattr(self.causal_lm.config, "get_text_config")
            else self.causal_lm.config.hidden_size
        )
        self.value_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.reward_fn = REWARDS.build(self.reward_section, "task.reward")
        self._reward_device = torch.device("cpu")

    def _forward(self, model, seq, mask, with_values: bool):
        out = model(
            input_ids=seq,
            attention_mask=mask,
            position_ids=positions(mask),
            output_hidden_states=with_values,
        )
        values = self.value_head(out.hidden_states[-1].float())[..., 0] if with_values else None
        return out.logits, values

    @torch.no_grad()
    def collect(self, batch: dict[str, torch.Tensor]) -> Rollout:
        """Sample completions and score them: everything the updates of this rollout need."""
        prompt, pmask = batch["input_ids"], batch["attention_mask"]  # (N, P)
        tok = self.tokenizer
        seq = self.causal_lm.generate(
            input_ids=prompt,
            attention_mask=pmask,
            do_sample=True,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            top_k=0,
            **self.collectives.lockstep(),
            **self.gen,
        )  # (N, P+T)
        p = prompt.shape[1]
        response = seq[:, p:]  # (N, T)
        # response tokens up to and including the first EOS count; the rest is padding
        ended = (response == tok.eos_token_id).long().cumsum(1)
        rmask = ((ended == 0) | ((ended == 1) & (response == tok.eos_token_id))).float()  # (N, T)
        mask = torch.cat([pmask, rmask.long()], dim=1)  # (N, P+T)
        logits, values = self._forward(self.model, seq, mask, True)  # (N, P+T, V), (N, P+T)
        # the logits at position i predict token i + 1: positions P-1 .. P+T-2 predict the response
        old_logp = token_logps(logits[:, p - 1 : -1], response)  # (N, T)
        ref_model, ctx = (
            (self.model, self.causal_lm.disable_adapter())
            if self.adapter_off
            else (self.reference, contextlib.nullcontext())
        )
        with ctx:
            ref_logits, _ = self._forward(ref_model, seq, mask, False)
        ref_logp = token_logps(ref_logits[:, p - 1 : -1], response)  # (N, T)
        texts = tok.batch_decode(
            response * rmask.long() + tok.pad_token_id * (1 - rmask.long()),
            skip_special_tokens=True,
        )
        prompts = tok.batch_decode(prompt, skip_special_tokens=True)
        if hasattr(self.reward_fn, "to") and self._reward_device != seq.device:
            self.reward_fn.to(seq.device)  # a reward model scores where the policy runs
            self._reward_device = seq.device
        score = self.reward_fn(prompts, texts).to(seq.device).float()  # (N,)
        kl = (old_logp - ref_logp) * rmask  # (N, T)
        rewards = -self.kl_coef * kl  # (N, T): the KL penalty on every token ...
        last = (rmask.sum(1) - 1).clamp(min=0).long()
        rewards[torch.arange(len(seq)), last] += score  # ... and the score on the last one
        vals = values[:, p - 1 : -1] * rmask  # (N, T): the value of the state before each token
        adv, returns = gae(rewards, vals, rmask, self.gamma, self.lam)
        valid = adv[rmask.bool()]
        adv = (adv - valid.mean()) / (valid.std() + 1e-8) * rmask
        return Rollout(
            seq=seq,
            mask=mask,
            response_mask=rmask,
            old_logp=old_logp,
            advantages=adv,
            returns=returns,
            score=score.mean(),
            kl=kl.sum(1).mean(),
            kl_coef=torch.tensor(self.kl_coef, device=seq.device),
            length=rmask.sum(1).mean(),
            prompt_len=p,
        )

    def adapt_kl(self, kl: float, samples: int) -> None:
        """One step of the adaptive KL controller (a no-op without ``kl_target``)."""
        if self.kl_target is not None:
            error = min(max(kl / self.kl_target - 1.0, -0.2), 0.2)
            self.kl_coef *= 1.0 + error * samples / self.kl_horizon

    def training_step(self, batch):
        if self._rollout is None or self._uses >= self.ppo_epochs:
            self._rollout, self._uses = self.collect(batch), 0
            if self.kl_target is not None:  # one host read per rollout, not per step
                c = self.collectives
                kl = float(c.mean(self._rollout.kl.detach().float()))  # alike on every rank
                self.adapt_kl(kl, len(self._rollout.seq) * c.world_size)
        r = self._rollout
        self._uses += 1
        p = r.prompt_len
        logits, values = self._forward(self.model, r.seq, r.mask, True)  # (N, P+T, V), (N, P+T)
        logp = token_logps(logits[:, p - 1 : -1], r.seq[:, p:])  # (N, T)
        m = r.response_mask  # (N, T)
        ratio = torch.exp(logp - r.old_logp)  # (N, T) pi / pi_old
        clipped = ratio.clamp(1 - self.clip, 1 + self.clip)
        surrogate = torch.minimum(ratio * r.advantages, clipped * r.advantages)
        policy_loss = -(surrogate * m).sum() / m.sum()
        value_loss = (((values[:, p - 1 : -1] - r.returns) ** 2) * m).sum() / m.sum()
        return {
            "loss": policy_loss + self.vf_coef * value_loss,
            "reward": r.score,
            "kl": r.kl,
            "kl_coef": r.kl_coef,
            "response_length": r.length,
            "clip_fraction": (((ratio - 1).abs() > self.clip).float() * m).sum() / m.sum(),
        }

    def extra_state(self) -> dict[str, Any]:
        return {"kl_coef": self.kl_coef}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.kl_coef = state.get("kl_coef", self.kl_coef)

    def rank_state(self) -> dict[str, Any]:
        """The rollout being reused, so a resumed run continues it instead of sampling anew."""
        if self._rollout is None:
            return {}
        return {"rollout": dataclasses.asdict(self._rollout.to("cpu")), "uses": self._uses}

    def load_rank_state(self, state: dict[str, Any]) -> None:
        if "rollout" in state:
            rollout = dict(state["rollout"])
            if "p" in rollout:  # written before the Rollout fields had names
                rollout = {
                    "seq": rollout["seq"],
                    "mask": rollout["mask"],
                    "response_mask": rollout["rmask"],
                    "old_logp": rollout["old_logp"],
                    "advantages": rollout["adv"],
                    "returns": rollout["returns"],
                    "score": rollout["score"],
                    "kl": rollout["kl"],
                    "kl_coef": rollout["kl_coef"],
                    "length": rollout["length"],
                    "prompt_len": int(rollout["p"]),
                }
            self._rollout = Rollout(**rollout).to(self.value_head.weight.device)
            self._uses = state["uses"]

    def validation_step(self, batch):
        r = self.collect(batch)
        return {"reward": r.score, "kl": r.kl}
