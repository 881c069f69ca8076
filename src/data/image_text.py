"""Images with text: captions for contrastive training (``clip``) and questions with answers for
vision-language models (``vlm``).

- ``image_text``: a folder of images and a captions file, JSONL (``{"image": "rel/path.png",
  "caption": "..."}``, several lines per image allowed) or COCO captions JSON (``images`` with
  ``id``/``file_name``, ``annotations`` with ``image_id``/``caption``). Split by image, so no
  validation image is seen in training under another caption.
- ``digits_captions``: scikit-learn's digits with captions made from templates ("a handwritten
  seven", "the digit 7", ...). Training captions use ``TRAIN_TEMPLATES``; validation images are
  captioned with the disjoint ``HELD_OUT_TEMPLATES``, which are also what zero-shot
  classification uses by default, so the zero-shot figure is on phrasings never trained on.
- ``digits_vqa``: digits with questions and answers ("What digit is this?" -> "seven", "Is this
  digit even?" -> "no", "What is this digit plus one?" -> "eight"), tokenised with a causal LM's
  tokenizer; only the answer (and EOS) is in the loss.

Training batches of captions hold ``inputs`` (B, C, H, W) and ``caption`` (B strings: each of an
image's captions is one sample); validation batches hold every caption of each image
(``captions``, B lists), its ``index`` in the split and, where the data has them, ``labels``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import numpy as np
import torch
from pydantic import Field, PositiveInt

from src.core.dataset_info import DataModule, DatasetInfo
from src.core.errors import ConfigError, DataError, library_message
from src.core.registry import DATASETS
from src.data.digits import digit_images, stratified_split
from src.data.examples import ValFraction
from src.data.image_folder import ImageChannels, ImageSize

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# "{}" is the digit's name, "{digit}" its numeral.
TRAIN_TEMPLATES = (
    "a handwritten {}",
    "the digit {digit}",
    "a photo of the number {}",
    "a drawing of a {}",
    "the number {}",
    "an image of the digit {digit}",
    "a scan of a handwritten {}",
    "a {} written by hand",
)
HELD_OUT_TEMPLATES = (
    "a picture of a {}",
    "this digit is a {}",
    "a blurry photo of the number {}",
    "the handwritten digit {digit}",
)


def fill(template: str, name: str, index: Optional[int] = None, key: str = "template") -> str:
    """A caption from a template: ``{}`` becomes the class name, ``{digit}`` its index."""
    try:
        return template.format(name, digit=index if index is not None else name)
    except (IndexError, KeyError, ValueError) as exc:
        raise ConfigError(
            f"{key}: {template!r}: only {{}} (the class name) and {{digit}} may "
            f"be filled (not {exc})"
        ) from None


class Images:
    """Images by index: a (N, C, H, W) tensor in memory, or files read when asked."""

    def __init__(
        self,
        tensor: Optional[torch.Tensor] = None,
        files: Sequence[Path] = (),
        size: int = 32,
        channels: int = 3,
    ):
        self.tensor, self.files = tensor, list(files)
        self.transform: Optional[Callable[[Any], torch.Tensor]] = None
        if tensor is None:
            from src.data.image_folder import image_transform

            self.transform = image_transform(size, channels)

    def __len__(self) -> int:
        return len(self.tensor) if self.tensor is not None else len(self.files)

    def take(self, idx: Sequence[int]) -> torch.Tensor:
        if self.tensor is not None:
            return self.tensor[torch.as_tensor(idx, dtype=torch.long)]
        return torch.stack([self.load(i) for i in idx])

    def load(self, i: int) -> torch.Tensor:
        from PIL import Image

        try:
            with Image.open(self.files[i]) as im:
                assert self.transform is not None  # built with the files, in __init__
                return self.transform(im.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as exc:  # damage the header check missed
            raise DataError(
                f"{self.files[i]}: unreadable image ({library_message(exc, 80)})"
            ) from None


class CaptionPairs(torch.utils.data.Dataset):
    """Training samples: one per (image, caption) pair. ``labels`` (per pair) when the images
    have classes."""

    batched = True  # __getitems__ makes the whole batch; the loader does not collate

    def __init__(
        self, images: Images, pairs: list[tuple[int, str]], labels: Optional[torch.Tensor] = None
    ):
        self.images, self.pairs = images, pairs
        self.image_labels = labels
        if labels is not None:
            self.labels = labels[torch.tensor([i for i, _ in pairs], dtype=torch.long)]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        rows = [self.pairs[i] for i in indices]
        batch = {"inputs": self.images.take([r[0] for r in rows]), "caption": [r[1] for r in rows]}
        if self.image_labels is not None:
            batch["labels"] = self.labels[torch.as_tensor(indices, dtype=torch.long)]
        return batch


class CaptionedImages(torch.utils.data.Dataset):
    """Validation samples: one per image, with all of its captions and its index in the split."""

    batched = True

    def __init__(
        self, images: Images, captions: list[list[str]], labels: Optional[torch.Tensor] = None
    ):
        self.images, self.captions = images, captions
        if labels is not None:
            self.labels = labels

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        batch = {
            "inputs": self.images.take(indices),
            "captions": [self.captions[i] for i in indices],
            "index": torch.as_tensor(indices, dtype=torch.long),
        }
        if hasattr(self, "labels"):
            batch["labels"] = self.labels[torch.as_tensor(indices, dtype=torch.long)]
        return batch


Resize = Annotated[
    Optional[PositiveInt],
    Field(description="bilinear resize of the 8x8 images, done once up front"),
]
Channels = Annotated[int, Field(gt=0, description="repeat the grey channel (3 for RGB towers)")]


@DATASETS.register("digits_captions")
def digits_captions(
    seed: int,
    val_fraction: Annotated[
        float, Field(gt=0.0, lt=1.0, description="held-out images, stratified by class")
    ] = 0.2,
    templates: Annotated[
        Optional[list[str]],
        Field(
            min_length=1,
            description="training caption templates ({} the name, {digit} the "
            "numeral); default: TRAIN_TEMPLATES",
        ),
    ] = None,
    held_out_templates: Annotated[
        Optional[list[str]],
        Field(
            min_length=1,
            description="templates of the validation captions and of zero-shot "
            "classification, none of them a training one; default: "
            "HELD_OUT_TEMPLATES",
        ),
    ] = None,
    resize: Resize = None,
    channels: Channels = 1,
) -> DataModule:
    """Digits captioned from templates; validation captions use templates never trained on."""
    train_t = list(templates or TRAIN_TEMPLATES)
    held_t = list(held_out_templates or HELD_OUT_TEMPLATES)
    shared = sorted(set(train_t) & set(held_t))
    if shared:
        raise ConfigError(f"data.held_out_templates: {shared[0]!r} is also a training template")
    x, y = digit_images(resize, channels)
    train_idx, val_idx = stratified_split(y.numpy(), val_fraction, seed)
    images = Images(x)

    for key, temps in (("data.templates", train_t), ("data.held_out_templates", held_t)):
        for n, t in enumerate(temps):
            fill(t, "x", 0, f"{key}.{n}")

    def captions(i: int, temps: list[str]) -> list[str]:
        c = int(y[i])
        return [fill(t, DIGIT_NAMES[c], c) for t in temps]

    pairs = [(int(i), cap) for i in train_idx for cap in captions(i, train_t)]
    val = CaptionedImages(
        Images(x[torch.as_tensor(val_idx)]),
        [captions(i, held_t) for i in val_idx],
        y[torch.as_tensor(val_idx)],
    )
    counts = torch.bincount(y[torch.as_tensor(train_idx)], minlength=10)
    info = DatasetInfo(
        num_samples=len(pairs),
        num_classes=10,
        class_names=DIGIT_NAMES,
        class_counts=tuple(int(c) for c in counts),
        input_shape=tuple(x.shape[1:]),
        extra={"templates": held_t, "captions": True},
    )
    return DataModule(CaptionPairs(images, pairs, y), val, info)


def _caption_rows(root: Path, captions: str) -> list[tuple[str, str, str]]:
    """(image path relative to root, caption, where) from JSONL or COCO captions JSON."""
    from src.data.jsonl import read_jsonl

    path = Path(captions).expanduser()
    if not path.is_absolute() and not path.exists():
        path = root / captions
    if path.suffix == ".jsonl":
        rows = read_jsonl(str(path), ("image", "caption"), "data.captions")
        out = []
        for where, r in rows:
            if not isinstance(r["image"], str) or not isinstance(r["caption"], str):
                raise ConfigError(f"{where}: image and caption must be strings")
            out.append((r["image"], r["caption"], where))
        return out
    if not path.is_file():
        raise ConfigError(f"data.captions: file not found: {captions}")
    try:
        coco = json.loads(path.read_text(encoding="utf-8"))
        files = {im["id"]: im["file_name"] for im in coco["images"]}
        return [
            (files[a["image_id"]], a["caption"], f"{path}: annotations[{n}]")
            for n, a in enumerate(coco["annotations"])
        ]
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"data.captions: {path}: not COCO captions JSON ({exc})") from None
    except (KeyError, TypeError) as exc:
        raise ConfigError(
            f"data.captions: {path}: not COCO captions JSON (missing {exc}: "
            "needs images[].id/file_name and annotations[].image_id/caption)"
        ) from None


@DATASETS.register("image_text")
def image_text(
    seed: int,
    root: Annotated[str, Field(description="folder the image paths are relative to")],
    captions: Annotated[
        str,
        Field(
            description="captions file: .jsonl ({image, caption} per line) or COCO captions .json; "
            "relative to root unless it exists as given"
        ),
    ] = "captions.jsonl",
    val_fraction: ValFraction = 0.1,
    image_size: ImageSize = 32,
    channels: ImageChannels = 3,
    bad_files: Annotated[
        Literal["error", "skip"],
        Field(
            description="every image is checked first (header and structure); error stops at the "
            "first unreadable or missing one, skip leaves it out and says how "
            "many"
        ),
    ] = "error",
    cache_dir: Annotated[
        Optional[str],
        Field(
            description="the data cache, where each image's check is kept (default "
            "$TESSERA_CACHE, else ~/.cache/tessera)"
        ),
    ] = None,
) -> DataModule:
    """Images with captions from a folder; split by image. Each image is checked once (the
    outcome is kept in the data cache); a later start opens only new or changed images."""
    import warnings

    base = Path(root).expanduser()
    if not base.is_dir():
        raise ConfigError(f"data.root: folder not found: {root}")
    by_image: dict[str, list[str]] = {}
    first_seen: dict[str, str] = {}
    for rel, caption, where in _caption_rows(base, captions):
        by_image.setdefault(rel, []).append(caption)
        first_seen.setdefault(rel, where)
    from src.data.image_files import checked_files
    from src.data.token_store import cache_root

    names, bad = [], []
    outcome = checked_files(str(base), list(by_image), cache_root(cache_dir))
    for rel, why in outcome.items():
        if why is None:
            names.append(rel)
        elif why == "not found":
            bad.append(f"{first_seen[rel]}: image not found: {base / rel}")
        else:
            bad.append(f"{first_seen[rel]}: {base / rel}: not a readable image ({why})")
    if bad and bad_files == "error":
        more = f" ({len(bad)} bad images in all)" if len(bad) > 1 else ""
        raise ConfigError(f"data.captions: {bad[0]}{more}; fix it, or set data.bad_files=skip")
    if bad:
        warnings.warn(
            f"data.captions: skipped {len(bad)} unreadable or missing images (data.bad_files=skip)",
            stacklevel=2,
        )
    if len(names) < 2:
        raise ConfigError(f"data.captions: {len(names)} readable image(s); at least 2 are needed")
    order = np.random.default_rng(seed).permutation(len(names))
    n_val = max(1, int(round(val_fraction * len(names)))) if val_fraction > 0 else 0
    val_names = [names[i] for i in order[:n_val]]
    train_names = [names[i] for i in order[n_val:]]
    train_images = Images(files=[base / n for n in train_names], size=image_size, channels=channels)
    pairs = [(i, c) for i, n in enumerate(train_names) for c in by_image[n]]
    val = (
        CaptionedImages(
            Images(files=[base / n for n in val_names], size=image_size, channels=channels),
            [by_image[n] for n in val_names],
        )
        if val_names
        else None
    )
    info = DatasetInfo(
        num_samples=len(pairs),
        input_shape=(channels, image_size, image_size),
        extra={"captions": True},
    )
    return DataModule(CaptionPairs(train_images, pairs), val, info)


# --------------------------------------------------------------------------- questions

Question = Literal["digit", "even", "plus_one"]
QUESTIONS: dict[Question, tuple[str, Callable[[int], str]]] = {
    "digit": ("What digit is this?", lambda c: DIGIT_NAMES[c]),
    "even": ("Is this digit even?", lambda c: "yes" if c % 2 == 0 else "no"),
    "plus_one": ("What is this digit plus one?", lambda c: DIGIT_NAMES[c + 1] if c < 9 else "ten"),
}
PROMPT = "Question: {question}\nAnswer:"


class ImageQuestions(torch.utils.data.Dataset):
    """One sample per (image, question): ``inputs`` (the image), ``input_ids`` (prompt, answer,
    EOS; right-padded), ``labels`` (-100 but on the answer and EOS), ``prompt_ids`` (left-padded,
    for generation), ``answer`` and ``kind`` strings."""

    batched = True

    def __init__(
        self,
        images: Images,
        rows: Sequence[tuple[int, list[int], list[int], str, str]],
        pad_id: int,
    ):
        self.images, self.rows, self.pad_id = images, rows, pad_id
        self.lengths = [len(p) + len(a) for _, p, a, _, _ in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        rows = [self.rows[i] for i in indices]
        n, longest = len(rows), max(len(p) + len(a) for _, p, a, _, _ in rows)
        longest_p = max(len(p) for _, p, _, _, _ in rows)
        ids = torch.full((n, longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, longest), dtype=torch.long)
        labels = torch.full((n, longest), -100, dtype=torch.long)
        prompt = torch.full((n, longest_p), self.pad_id, dtype=torch.long)
        prompt_mask = torch.zeros((n, longest_p), dtype=torch.long)
        for j, (_, p, a, _, _) in enumerate(rows):
            seq = torch.tensor(p + a)
            ids[j, : len(seq)], mask[j, : len(seq)] = seq, 1
            labels[j, len(p) : len(seq)] = seq[len(p) :]
            prompt[j, longest_p - len(p) :], prompt_mask[j, longest_p - len(p) :] = seq[: len(p)], 1
        return {
            "inputs": self.images.take([r[0] for r in rows]),
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "prompt_ids": prompt,
            "prompt_mask": prompt_mask,
            "answer": [r[3] for r in rows],
            "kind": [r[4] for r in rows],
        }


def _lm_tokenizer(path: str):
    from src.data.text import load_tokenizer

    tok = load_tokenizer(path)
    if tok.eos_token_id is None:
        raise ConfigError(
            f"data.tokenizer: {path}: has no EOS token to end answers with "
            "(a causal LM's tokenizer is needed)"
        )
    return tok


def _encode(tok, question: str, answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids + EOS) of one question."""
    p = tok(PROMPT.format(question=question), add_special_tokens=False)["input_ids"]
    return p, tok(" " + answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


@DATASETS.register("digits_vqa")
def digits_vqa(
    seed: int,
    tokenizer: Annotated[
        str,
        Field(
            description="the causal LM's tokenizer: a local folder (an exported run's hf folder, "
            "pkg:... too)"
        ),
    ],
    questions: Annotated[
        list[Question],
        Field(
            min_length=1,
            description="question kinds asked of every image: digit ('What digit is "
            "this?'), even, plus_one",
        ),
    ] = list(QUESTIONS),
    val_fraction: Annotated[
        float, Field(gt=0.0, lt=1.0, description="held-out images, stratified by class")
    ] = 0.2,
    resize: Resize = None,
    channels: Channels = 1,
) -> DataModule:
    """Digits with questions and one-word answers; every question is asked of every image."""
    from src.data.text import token_info

    tok = _lm_tokenizer(tokenizer)
    x, y = digit_images(resize, channels)
    train_idx, val_idx = stratified_split(y.numpy(), val_fraction, seed)
    kinds = list(dict.fromkeys(questions))
    encoded = {}
    for kind in kinds:
        question, answer_of = QUESTIONS[kind]
        for c in range(10):
            encoded[kind, c] = (*_encode(tok, question, answer_of(c)), answer_of(c))

    def split(idx) -> ImageQuestions:
        rows = [
            (j, *encoded[k, int(y[i])][:2], encoded[k, int(y[i])][2], k)
            for j, i in enumerate(idx)
            for k in kinds
        ]
        return ImageQuestions(Images(x[torch.as_tensor(idx)]), rows, tok.pad_token_id)

    train, val = split(train_idx), split(val_idx)
    info = DatasetInfo(
        num_samples=len(train),
        input_shape=tuple(x.shape[1:]),
        extra={**token_info(tok), "question_kinds": kinds, "image_questions": True},
    )
    return DataModule(train, val, info)


@DATASETS.register("image_questions")
def image_questions(
    seed: int,
    root: Annotated[str, Field(description="folder the image paths are relative to")],
    tokenizer: Annotated[
        str, Field(description="the causal LM's tokenizer: a local folder (pkg:... too)")
    ],
    path: Annotated[
        str,
        Field(
            description="JSONL: {image, question, answer, kind (optional: the question's type, "
            "for per-kind accuracy)} per line; relative to root unless it exists as "
            "given"
        ),
    ] = "questions.jsonl",
    val_fraction: ValFraction = 0.2,
    image_size: ImageSize = 32,
    channels: ImageChannels = 3,
) -> DataModule:
    """Your own images with questions and answers (the ``vlm`` task); split by image, so no
    validation image is seen in training under another question."""
    from PIL import Image

    from src.data.jsonl import read_jsonl
    from src.data.text import token_info

    base = Path(root).expanduser()
    if not base.is_dir():
        raise ConfigError(f"data.root: folder not found: {root}")
    file = Path(path).expanduser()
    if not file.exists():
        file = base / path
    tok = _lm_tokenizer(tokenizer)
    by_image: dict[str, list[tuple[str, str, str]]] = {}
    for where, r in read_jsonl(str(file), ("image", "question", "answer"), "data.path"):
        values = [r["image"], r["question"], r["answer"], r.get("kind", "question")]
        if not all(isinstance(v, str) for v in values):
            raise ConfigError(f"{where}: image, question, answer and kind must be strings")
        if r["image"] not in by_image:
            try:
                with Image.open(base / r["image"]) as im:
                    im.verify()
            except FileNotFoundError:
                raise ConfigError(f"{where}: image not found: {base / r['image']}") from None
            except Exception as exc:  # PIL raises many types for broken files
                raise ConfigError(
                    f"{where}: {base / r['image']}: not a readable image "
                    f"({library_message(exc, 80)})"
                ) from None
        by_image.setdefault(r["image"], []).append(tuple(values[1:]))
    names = list(by_image)
    order = np.random.default_rng(seed).permutation(len(names))
    n_val = int(round(val_fraction * len(names)))
    kinds = sorted({k for qs in by_image.values() for _, _, k in qs})

    def split(chosen: list[str]) -> ImageQuestions:
        rows = [
            (j, *_encode(tok, q, a), a, k) for j, n in enumerate(chosen) for q, a, k in by_image[n]
        ]
        images = Images(files=[base / n for n in chosen], size=image_size, channels=channels)
        return ImageQuestions(images, rows, tok.pad_token_id)

    train = split([names[i] for i in order[n_val:]])
    val = split([names[i] for i in order[:n_val]]) if n_val else None
    if len(train) == 0:
        raise ConfigError("data.val_fraction: leaves no training image")
    info = DatasetInfo(
        num_samples=len(train),
        input_shape=(channels, image_size, image_size),
        extra={**token_info(tok), "question_kinds": kinds, "image_questions": True},
    )
    return DataModule(train, val, info)
