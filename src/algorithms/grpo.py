"""GRPO: group relative policy optimisation (Shao et al., 2024), as TRL's ``GRPOTrainer`` does it.

Each prompt of a batch is answered ``num_generations`` (G) times by sampling; each completion is
scored by the weighted sum of the ``rewards`` (REWARDS sections); a completion's advantage is its
reward minus its group's mean (divided by the group's standard deviation unless
``scale_rewards: none``). The loss is PPO's clipped objective on every completion token, with an
optional KL penalty to a reference (``beta``, 0 by default as in TRL), normalised as ``loss_type``
says:

- ``grpo``: each completion's mean over its tokens, then the mean over completions;
- ``dr_grpo``: the sum over all tokens / (completions x max_new_tokens) (Liu et al., 2025: no
  length bias);
- ``dapo``: the sum over all tokens / all completion tokens of the step, across ranks (Yu et al.,
  2025: token-level).

G is not bound to the batch size: the step's B x G completions are generated ``generation_batch``
sequences at a time and go forward and backward ``micro_batch`` sequences at a time
(:meth:`split`, which the trainer calls), each chunk carrying its exact share of the loss, so the
gradient is the one of a single batch of all of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import warnings
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional

import torch
from pydantic import Field

from src.algorithms.base import Task
from src.algorithms.ppo import positions, token_logps
from src.algorithms.ssl_base import frozen_copy
from src.core.errors import ConfigError
from src.core.registry import REWARDS, TASKS


def group_advantages(
    rewards: torch.Tensor, group: int, scale: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages of (N,) rewards in consecutive groups of ``group``: reward - group mean,
    divided by the group's standard deviation (unbiased, + 1e-4, as TRL) when ``scale``.
    Returns (advantages, each group's standard deviation)."""
    r = rewards.view(-1, group)
    std = r.std(dim=1, keepdim=True)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (std + 1e-4)
    return adv.reshape(-1), std[:, 0]


@dataclass
class Chunk:
    """Completions that go forward and backward together: P prompt tokens (left-padded), then
    T completion tokens (right-padded after EOS)."""

    seq: torch.Tensor  # (n, P + T)
    mask: torch.Tensor  # (n, P + T) attention mask
    response_mask: torch.Tensor  # (n, T) 1 up to and including the first EOS
    advantages: torch.Tensor  # (n,)
    old_logp: Optional[torch.Tensor]  # (n, T) when a rollout serves several steps
    ref_logp: Optional[torch.Tensor]  # (n, T) when beta > 0
    norm: torch.Tensor  # () what this chunk's summed per-token loss is divided by
    prompt_len: int
    metrics: dict[str, torch.Tensor]  # the rollout's (every chunk carries them)

    def to(self, device) -> Chunk:
        def move(v):
            if isinstance(v, torch.Tensor):
                return v.to(device)
            return {k: move(x) for k, x in v.items()} if isinstance(v, dict) else v

        return Chunk(**{f.name: move(getattr(self, f.name)) for f in dataclasses.fields(self)})


@TASKS.register("grpo")
class GRPO(Task):
    """Batches hold left-padded prompts (``input_ids``, ``attention_mask``) and, for rewards that
    check answers, their ``answer`` strings (the ``arithmetic`` data in ``prompts`` format, or
    ``prompts`` JSONL with an ``answer`` field)."""

    splits_batches = True  # the step's completions are made and cut into chunks by split()

    def __init__(
        self,
        model,
        rewards: Annotated[
            list[dict[str, Any]],
            Field(
                min_length=1,
                description="REWARDS sections, each with an optional `weight` (default 1); a "
                "completion's reward is the weighted sum",
            ),
        ],
        num_generations: Annotated[
            int,
            Field(
                ge=2,
                description="completions per prompt (G): the group its advantage is relative to",
            ),
        ] = 8,
        micro_batch: Annotated[
            Optional[Annotated[int, Field(ge=1)]],
            Field(
                description="completions per forward and backward (default: all of the step's); "
                "the gradient is the same, the memory that of this many"
            ),
        ] = None,
        generation_batch: Annotated[
            Optional[Annotated[int, Field(ge=1)]],
            Field(description="completions per generate call (default: micro_batch)"),
        ] = None,
        max_new_tokens: Annotated[int, Field(ge=1, description="longest completion")] = 16,
        temperature: Annotated[
            float, Field(gt=0, description="sampling temperature of the completions")
        ] = 1.0,
        beta: Annotated[
            float,
            Field(
                ge=0,
                description="weight of the KL penalty to the reference (0: no reference is "
                "run, as TRL's default)",
            ),
        ] = 0.0,
        epsilon: Annotated[float, Field(gt=0, lt=1, description="ratio clip, low side")] = 0.2,
        epsilon_high: Annotated[
            Optional[float],
            Field(gt=0, description="ratio clip, high side (DAPO's clip-higher; default: epsilon)"),
        ] = None,
        loss_type: Annotated[
            Literal["grpo", "dr_grpo", "dapo"],
            Field(description="normalisation of the token losses (see the module)"),
        ] = "grpo",
        scale_rewards: Annotated[
            Literal["group", "none"],
            Field(
                description="divide advantages by the group's standard deviation (group) or not "
                "(none, Dr. GRPO's advice)"
            ),
        ] = "group",
        num_iterations: Annotated[
            int,
            Field(
                ge=1,
                description="optimizer steps per generation (TRL's mu; > 1 reuses the "
                "completions with the clipped ratio)",
            ),
        ] = 1,
        reference: Annotated[
            Literal["auto", "frozen_copy", "disable_adapter"],
            Field(
                description="the KL reference when beta > 0: frozen_copy or disable_adapter (auto "
                "picks by the model)"
            ),
        ] = "auto",
    ):
        super().__init__(model)
        self.reward_sections = rewards
        self.g = num_generations
        self.micro_batch, self.generation_batch = micro_batch, generation_batch or micro_batch
        self.gen = dict(max_new_tokens=max_new_tokens, temperature=temperature)
        self.beta, self.eps_low = beta, epsilon
        self.eps_high = epsilon if epsilon_high is None else epsilon_high
        self.loss_type, self.scale = loss_type, scale_rewards == "group"
        self.num_iterations = self.steps_per_batch = num_iterations  # one rollout per batch
        self.adapter_off = reference == "disable_adapter" or (
            reference == "auto" and hasattr(model, "disable_adapter")
        )
        if beta > 0 and not self.adapter_off:
            self.reference = frozen_copy(model).eval()
        self._chunks: Optional[list[Chunk]] = None
        self._uses = 0
        self._warned_flat = False

    def configure(self, info) -> None:
        self.tokenizer = info.extra["tokenizer"]
        self.reward_fns = []
        for i, section in enumerate(self.reward_sections):
            if not isinstance(section, dict) or "type" not in section:
                raise ConfigError(f"task.rewards.{i}: a REWARDS section with a 'type'")
            weight = section.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise ConfigError(f"task.rewards.{i}.weight: a number (got {weight!r})")
            body = {k: v for k, v in section.items() if k != "weight"}
            fn = REWARDS.build(body, f"task.rewards.{i}")
            takes = inspect.signature(fn).parameters
            self.reward_fns.append((str(section["type"]), float(weight), fn, "answers" in takes))
        names = [n for n, *_ in self.reward_fns]
        self.reward_names = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]

    # ------------------------------------------------------------------ rollout

    def _generate(self, prompt, pmask, sample: bool) -> torch.Tensor:
        tok = self.tokenizer
        opts = (
            dict(do_sample=True, top_k=0, temperature=self.gen["temperature"])
            if sample
            else dict(do_sample=False)
        )
        return self.causal_lm.generate(
            input_ids=prompt,
            attention_mask=pmask,
            max_new_tokens=self.gen["max_new_tokens"],
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            **self.collectives.lockstep(),
            **opts,
        )

    def _complete(self, prompt, pmask, sample: bool):
        """(sequences (N, P + T), response mask (N, T), completion texts)."""
        step = self.generation_batch or len(prompt)
        outs = [
            self._generate(prompt[i : i + step], pmask[i : i + step], sample)
            for i in range(0, len(prompt), step)
        ]
        t = max(o.shape[1] for o in outs)
        pad = self.tokenizer.pad_token_id
        seq = torch.cat([torch.nn.functional.pad(o, (0, t - o.shape[1]), value=pad) for o in outs])
        p = prompt.shape[1]
        response = seq[:, p:]
        eos = self.tokenizer.eos_token_id
        ended = (response == eos).long().cumsum(1)
        rmask = ((ended == 0) | ((ended == 1) & (response == eos))).long()
        # generate pads a finished sequence with pad (== eos for many tokenizers): cut there too
        texts = self.tokenizer.batch_decode(
            response * rmask + pad * (1 - rmask), skip_special_tokens=True
        )
        return seq, rmask, texts

    def _rewards(self, prompt, texts: list[str], answers) -> dict[str, torch.Tensor]:
        prompts = self.tokenizer.batch_decode(prompt, skip_special_tokens=True)
        out = {}
        for name, (_, _, fn, takes) in zip(self.reward_names, self.reward_fns):
            kw = {"answers": answers} if takes else {}
            out[name] = torch.as_tensor(fn(prompts, texts, **kw), dtype=torch.float32)
        return out

    def _logps(self, model, seq, mask, p: int) -> torch.Tensor:
        logits = model(input_ids=seq, attention_mask=mask, position_ids=positions(mask)).logits
        return token_logps(logits[:, p - 1 : -1], seq[:, p:])

    def _in_chunks(self, fn, n: int) -> torch.Tensor:
        step = self.micro_batch or n
        return torch.cat([fn(slice(i, i + step)) for i in range(0, n, step)])

    @torch.no_grad()
    def split(self, batch: dict[str, Any]) -> list[Chunk]:
        """The step's micro-batches: G completions of every prompt, scored, in chunks of
        ``micro_batch``. A rollout serves ``num_iterations`` steps; the trainer gives each of
        them the same batch (``steps_per_batch``)."""
        if self._chunks is not None and self._uses < self.num_iterations:
            self._uses += 1
            return self._chunks
        prompt = batch["input_ids"].repeat_interleave(self.g, dim=0)
        pmask = batch["attention_mask"].repeat_interleave(self.g, dim=0)
        answers = [a for a in batch.get("answer", []) for _ in range(self.g)] or None
        was_training = self.model.training
        self.model.eval()  # no dropout while sampling (TRL samples with the model in eval mode)
        try:
            seq, rmask, texts = self._complete(prompt, pmask, sample=True)
        finally:
            self.model.train(was_training)
        scores = self._rewards(prompt, texts, answers)
        dev = seq.device
        total = self._total(scores)
        adv, std = group_advantages(total, self.g, self.scale)
        n, p = len(seq), prompt.shape[1]
        mask = torch.cat([pmask, rmask], dim=1)
        old = ref = None
        if self.num_iterations > 1:  # the policy that sampled, for the ratio of later steps
            old = self._in_chunks(lambda s: self._logps(self.model, seq[s], mask[s], p), n)
        if self.beta > 0:
            model, ctx = (
                (self.model, self.causal_lm.disable_adapter())
                if self.adapter_off
                else (self.reference, contextlib.nullcontext())
            )
            with ctx:
                ref = self._in_chunks(lambda s: self._logps(model, seq[s], mask[s], p), n)
        flat = (std == 0).float().mean()
        if bool(flat > 0) and not self._warned_flat:  # (a host read once per rollout)
            warnings.warn(
                f"GRPO: {float(flat):.0%} of this step's prompt groups have one reward "
                "for all their completions (no advantage, no gradient from them); "
                "logged as train/frac_reward_zero_std",
                stacklevel=2,
            )
            self._warned_flat = True
        # what each chunk's summed loss is divided by (the same for every chunk of the step)
        if self.loss_type == "grpo":  # per completion: each divided by its own length below
            norm = torch.tensor(float(n), device=dev)
        elif self.loss_type == "dr_grpo":
            norm = torch.tensor(float(n * self.gen["max_new_tokens"]), device=dev)
        else:  # dapo: every token of the step counts alike, across ranks
            norm = self.collectives.mean(rmask.sum().float().to(dev)).clamp(min=1.0)
        metrics = {
            "reward": total.mean(),
            "reward_std": std.mean(),
            "frac_reward_zero_std": flat,
            "completion_length": rmask.sum(1).float().mean(),
            **{f"reward/{k}": v.mean() for k, v in scores.items()},
        }
        chunks = []
        step = self.micro_batch or n
        for i in range(0, n, step):
            s = slice(i, i + step)
            chunks.append(
                Chunk(
                    seq=seq[s],
                    mask=mask[s],
                    response_mask=rmask[s],
                    advantages=adv[s].to(dev),
                    norm=norm,
                    old_logp=None if old is None else old[s],
                    ref_logp=None if ref is None else ref[s],
                    prompt_len=p,
                    metrics={k: v.to(dev) for k, v in metrics.items()},
                )
            )
        self._chunks, self._uses = chunks, 1
        return chunks

    # ------------------------------------------------------------------ loss

    def training_step(self, chunk: Any) -> dict[str, torch.Tensor]:
        if not isinstance(chunk, Chunk):
            raise TypeError("GRPO trains on the chunks of its split(): run it with the trainer")
        p = chunk.prompt_len
        logp = self._logps(self.model, chunk.seq, chunk.mask, p)  # (n, T)
        m = chunk.response_mask.float()
        old = logp.detach() if chunk.old_logp is None else chunk.old_logp
        ratio = torch.exp(logp - old)
        a = chunk.advantages[:, None]
        clipped = ratio.clamp(1 - self.eps_low, 1 + self.eps_high)
        per_token = -torch.minimum(ratio * a, clipped * a)
        out = dict(chunk.metrics)
        if chunk.ref_logp is not None:
            d = chunk.ref_logp - logp
            kl = torch.exp(d) - d - 1  # k3, an unbiased estimate of KL(pi || ref) per token
            per_token = per_token + self.beta * kl
            out["kl"] = (kl.detach() * m).sum() / m.sum().clamp(min=1)
        if self.loss_type == "grpo":
            loss = ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).sum() / chunk.norm
        else:
            loss = (per_token * m).sum() / chunk.norm
        clipped_now = ((ratio < 1 - self.eps_low) & (a < 0)) | (
            (ratio > 1 + self.eps_high) & (a > 0)
        )
        out["clip_ratio"] = (clipped_now.float() * m).sum().detach() / m.sum().clamp(min=1)
        return {"loss": loss, **out}

    def _total(self, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        """The reward of each completion: the weighted sum of the reward functions' scores."""
        terms = [w * scores[n] for n, (_, w, _, _) in zip(self.reward_names, self.reward_fns)]
        return torch.stack(terms).sum(0)

    @torch.no_grad()
    def validation_step(self, batch):
        """Greedy completions of the held-out prompts: their rewards (with an ``exact_answer``
        reward, ``val/reward/exact_answer`` is the accuracy)."""
        seq, rmask, texts = self._complete(
            batch["input_ids"], batch["attention_mask"], sample=False
        )
        scores = self._rewards(batch["input_ids"], texts, batch.get("answer"))
        total = self._total(scores)
        dev = seq.device
        return {
            "reward": total.mean().to(dev),
            **{f"reward/{k}": v.mean().to(dev) for k, v in scores.items()},
        }

    # ------------------------------------------------------------------ state

    def rank_state(self) -> dict[str, Any]:
        """The completions being reused (num_iterations > 1), so a resumed run continues them."""
        if self._chunks is None or self.num_iterations == 1:
            return {}
        return {
            "chunks": [dataclasses.asdict(c.to("cpu")) for c in self._chunks],
            "uses": self._uses,
        }

    def load_rank_state(self, state: dict[str, Any]) -> None:
        if "chunks" in state:
            dev = next(self.model.parameters()).device
            self._chunks = [Chunk(**c).to(dev) for c in state["chunks"]]
            self._uses = state["uses"]
