"""A LLaVA-style vision-language model (Liu et al., 2023): image features, projected by an MLP into
a few token embeddings, are put before the text of a causal language model.

- Vision encoder: the run's ``model:`` (a MODELS entry returning (B, D) features, e.g. the image
  tower of a ``clip`` run through ``vision_init``), frozen by default (``lock_vision``).
- Projector: Linear -> GELU -> Linear from D to ``image_tokens`` x the LM's width.
- Language model: ``lm:``, a MODELS section (``hf``, ``kind: causal_lm``, e.g. the GPT exported
  from ``lm_stdlib``). ``lock_lm`` freezes its weights; an ``adapter:`` in ``lm:`` (LoRA) still
  trains.
- Two stages by config, as LLaVA: stage 1 trains the projector alone (both towers locked); stage 2
  names stage 1's run in ``init`` (its projector, and the vision encoder if stage 1 trained it)
  and adds LoRA on the LM, or ``lock_lm: false`` for full fine-tuning.
- Loss: next-token cross-entropy on the answer and EOS only (image and prompt positions carry
  -100). Validation: greedy answers for every validation image and question, exact-match
  accuracy per question kind (``val/exact_match/<kind>``) and overall.
- Checkpoints also hold ``projector.safetensors`` (and the LM's adapter in PEFT's layout): the
  parts that train when the rest is frozen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import torch
from pydantic import Field
from torch import nn

from src.algorithms.base import Task
from src.algorithms.causal_lm import token_loss_sums
from src.algorithms.ssl_base import feature_dim
from src.core.dataset_info import DatasetInfo
from src.core.errors import ConfigError
from src.core.registry import MODELS, TASKS


def load_weights(source: str, prefixes: tuple[str, ...], key: str) -> dict[str, torch.Tensor]:
    """Tensors whose names start with one of ``prefixes`` from a run folder or checkpoint (the
    task's state), or every tensor of a ``.safetensors`` file (``export --format safetensors``:
    the model's weights under their own names, returned under the first prefix)."""
    from src.core.errors import CheckpointError

    path = Path(source).expanduser()
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise ConfigError(f"{key}: file not found: {source}")
        from safetensors.torch import load_file

        return {prefixes[0] + k: v for k, v in load_file(str(path)).items()}
    from src.distributed.weights import load_consolidated

    try:
        state = load_consolidated(path)
    except CheckpointError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    return {k: v for k, v in state.items() if k.startswith(prefixes)}


@TASKS.register("vlm")
class VLM(Task):
    """Answers questions about images; batches hold ``inputs`` (images), ``input_ids`` /
    ``attention_mask`` / ``labels`` (prompt + answer, answer-only labels), ``prompt_ids`` /
    ``prompt_mask`` (left-padded prompts), ``answer`` and ``kind`` strings (``digits_vqa``)."""

    def __init__(
        self,
        model,
        lm: Annotated[
            dict[str, Any],
            Field(
                description="MODELS section of the causal LM (hf, kind causal_lm, a local folder "
                "or a config); an `adapter:` in it trains LoRA"
            ),
        ],
        image_tokens: Annotated[
            int, Field(ge=1, description="token embeddings each image becomes")
        ] = 4,
        projector_hidden: Annotated[
            Optional[int],
            Field(gt=0, description="hidden width of the projector MLP (default: the LM's)"),
        ] = None,
        lock_vision: Annotated[
            bool, Field(description="freeze the vision encoder (kept in eval mode)")
        ] = True,
        lock_lm: Annotated[
            bool,
            Field(
                description="freeze the LM's own weights (an adapter still trains); false: full "
                "fine-tuning"
            ),
        ] = True,
        vision_init: Annotated[
            Optional[str],
            Field(
                description="weights of the vision encoder: a run folder or checkpoint whose "
                "model: it was (a clip run's image tower), or a .safetensors of "
                "them"
            ),
        ] = None,
        init: Annotated[
            Optional[str],
            Field(
                description="a previous stage's run folder or checkpoint: its projector (and "
                "vision encoder) start this run"
            ),
        ] = None,
        max_new_tokens: Annotated[
            int, Field(ge=1, description="longest generated answer at validation")
        ] = 6,
    ):
        super().__init__(model)
        if lm.get("type") != "hf" or lm.get("kind", "causal_lm") != "causal_lm":
            raise ConfigError(
                "task.lm: a transformers causal LM ({type: hf, kind: causal_lm, "
                "path: ...}) is needed"
            )
        self.lm_section = dict(lm)
        self.image_tokens, self.projector_hidden = image_tokens, projector_hidden
        self.lock_vision, self.lock_lm = lock_vision, lock_lm
        self.vision_init, self.init = vision_init, init
        self.max_new_tokens = max_new_tokens
        self._results: list[tuple[torch.Tensor, torch.Tensor]] = []

    def configure(self, info: DatasetInfo) -> None:
        tokenizer = info.extra.get("tokenizer")
        if not info.extra.get("image_questions") or tokenizer is None:
            raise ConfigError(
                "data: task 'vlm' trains on images with questions and answers "
                "(data.type: digits_vqa)"
            )
        self.tokenizer = tokenizer
        self.kinds = list(info.extra.get("question_kinds", ()))
        if self.vision_init is not None:
            state = load_weights(self.vision_init, ("model.",), "task.vision_init")
            self._load(self.model, state, "model.", "task.vision_init")
        self.lm = MODELS.build(self.lm_section, "task.lm", info=info)
        width = self.lm.get_input_embeddings().weight.shape[1]
        feat = feature_dim(self.model, info, "vlm")
        hidden = self.projector_hidden or width
        self.projector = nn.Sequential(
            nn.Linear(feat, hidden), nn.GELU(), nn.Linear(hidden, self.image_tokens * width)
        )
        if self.init is not None:
            state = load_weights(self.init, ("projector.", "model."), "task.init")
            if not any(k.startswith("projector.") for k in state):
                raise ConfigError(f"task.init: {self.init} holds no projector (not a vlm run)")
            self._load(self.projector, state, "projector.", "task.init")
            self._load(self.model, state, "model.", "task.init")
        if self.lock_vision:
            self.model.requires_grad_(False)
        if self.lock_lm:
            for name, p in self.lm.named_parameters():
                if "lora_" not in name and "prompt_encoder" not in name:
                    p.requires_grad_(False)
        self.train(self.training)

    @staticmethod
    def _load(module: nn.Module, state: dict[str, torch.Tensor], prefix: str, key: str) -> None:
        own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(own, strict=True)
        except RuntimeError as exc:
            first = str(exc).split("\n\t")[1] if "\n\t" in str(exc) else str(exc)
            raise ConfigError(
                f"{key}: its {prefix.rstrip('.')} weights do not fit this run's "
                f"({first.strip()[:200]})"
            ) from None

    def train(self, mode: bool = True):
        super().train(mode)
        if self.lock_vision:
            self.model.eval()
        if (
            self.lock_lm
            and getattr(self, "lm", None) is not None
            and not hasattr(self.lm, "peft_config")
        ):
            self.lm.eval()  # wholly frozen: no dropout noise in what the projector learns from
        return self

    # ------------------------------------------------------------------ model

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """(B, image_tokens, LM width) embeddings the images become."""
        if self.lock_vision:
            with torch.no_grad():
                feats = self.model(images)
        else:
            feats = self.model(images)
        b = feats.shape[0]
        return self.projector(feats.float()).view(b, self.image_tokens, -1)

    def sequence(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs_embeds, attention_mask, labels) of image tokens + prompt + answer; image and
        prompt positions are -100 in the labels."""
        image = self.image_embeddings(batch["inputs"])
        text = self.lm.get_input_embeddings()(batch["input_ids"])
        b, k = image.shape[:2]
        ones = torch.ones(b, k, dtype=batch["attention_mask"].dtype, device=image.device)
        ignore = torch.full((b, k), -100, dtype=batch["labels"].dtype, device=image.device)
        return (
            torch.cat([image.to(text.dtype), text], 1),
            torch.cat([ones, batch["attention_mask"]], 1),
            torch.cat([ignore, batch["labels"]], 1),
        )

    def training_step(self, batch):
        embeds, mask, labels = self.sequence(batch)
        logits = self.lm(inputs_embeds=embeds, attention_mask=mask).logits
        nll, n = token_loss_sums(logits, labels)
        return {"loss": nll / n.clamp(min=1)}

    @torch.no_grad()
    def answer(
        self, images: torch.Tensor, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
    ) -> list[str]:
        """Greedy answers to left-padded prompts about ``images`` (with the KV cache)."""
        image = self.image_embeddings(images)
        embed = self.lm.get_input_embeddings()
        text = embed(prompt_ids)
        b, k = image.shape[:2]
        mask = torch.cat(
            [torch.ones(b, k, dtype=prompt_mask.dtype, device=image.device), prompt_mask], 1
        )
        pos = (mask.cumsum(1) - 1).clamp(min=0)  # the image and prompt count from 0, as in training
        out = self.lm(
            inputs_embeds=torch.cat([image.to(text.dtype), text], 1),
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
        )
        eos = self.tokenizer.eos_token_id
        tokens, done = [], torch.zeros(b, dtype=torch.bool, device=image.device)
        last = pos[:, -1:]
        for step in range(self.max_new_tokens):
            nxt = out.logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
            tokens.append(nxt)
            done |= nxt == eos
            # several ranks step together (sharded weights are gathered in every forward)
            if step == self.max_new_tokens - 1 or (
                self.collectives.world_size == 1 and bool(done.all())
            ):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            last = last + 1
            out = self.lm(
                inputs_embeds=embed(nxt[:, None]),
                attention_mask=mask,
                position_ids=last,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
        ids = torch.stack(tokens, 1).tolist()
        return [
            self.tokenizer.decode(
                row[: row.index(eos)] if eos in row else row, skip_special_tokens=True
            ).strip()
            for row in ids
        ]

    def validation_step(self, batch):
        embeds, mask, labels = self.sequence(batch)
        nll, n = token_loss_sums(self.lm(inputs_embeds=embeds, attention_mask=mask).logits, labels)
        said = self.answer(batch["inputs"], batch["prompt_ids"], batch["prompt_mask"])
        dev = batch["input_ids"].device  # gathered across ranks at the end (NCCL: on the GPU)
        correct = torch.tensor(
            [s == a for s, a in zip(said, batch["answer"])], dtype=torch.float, device=dev
        )
        kind = torch.tensor(
            [self.kinds.index(k) if k in self.kinds else -1 for k in batch["kind"]],
            dtype=torch.long,
            device=dev,
        )
        self._results.append(self.valid(correct, kind))
        return {"loss": nll / n.clamp(min=1)}

    def validation_epoch_end(self, gather) -> dict[str, Any]:
        if not self._results:
            return {}
        correct, kind = (torch.cat(c) for c in zip(*self._results))
        self._results = []
        correct, kind = gather(correct), gather(kind)
        out = {"exact_match": float(correct.mean()) if len(correct) else 0.0}
        for i, name in enumerate(self.kinds):
            hit = correct[kind == i]
            if len(hit):
                out[f"exact_match/{name}"] = float(hit.mean())
        return out

    @torch.no_grad()
    def predict_step(self, batch, **options) -> dict[str, Any]:
        """The greedy answer to each (image, question) of the split, beside the expected one."""
        said = self.answer(batch["inputs"], batch["prompt_ids"], batch["prompt_mask"])
        return {"kind": batch["kind"], "answer": said, "expected": batch["answer"]}

    def write_checkpoint_files(self, directory: Path) -> None:
        from safetensors.torch import save_file

        state = self.projector.state_dict()
        if not any(hasattr(v, "full_tensor") for v in state.values()):  # sharded: in the checkpoint
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in state.items()},
                str(directory / "projector.safetensors"),
            )
        if hasattr(self.lm, "peft_config"):
            self.lm.save_pretrained(str(directory / "adapter"))
