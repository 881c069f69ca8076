"""Text corpora for language models: files and folders (or the Python standard library's own
source, ``stdlib:`` / ``stdlib:email``), split by file with a seed, tokenised, and packed into
fixed blocks with an end-of-text separator between documents.

The tokenizer comes from a local folder, or is a byte-level BPE trained with the ``tokenizers``
library on the training files and kept in the run folder (``<run>/tokenizer``), so a resumed run
reuses the same vocabulary.
"""

from __future__ import annotations

import glob
import sysconfig
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import torch
from pydantic import Field

from src.core.dataset_info import DataModule, DatasetInfo
from src.core.errors import ConfigError
from src.core.registry import DATASETS

EOS, PAD, MASK = "<|endoftext|>", "<|pad|>", "<|mask|>"
SKIP_DIRS = {"site-packages", "test", "tests", "idlelib", "__pycache__", "turtledemo"}
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def resolve_files(paths: list[str], key: str = "data.paths") -> list[Path]:
    """Files named by ``paths``: files, folders (their *.py, *.txt, *.md), globs, or ``stdlib:``."""
    out: list[Path] = []
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for i, spec in enumerate(paths):
        if spec.startswith("stdlib:"):
            root = stdlib / spec[len("stdlib:") :].replace(".", "/")
            if root.with_suffix(".py").is_file() and not root.is_dir():
                found = [root.with_suffix(".py")]
            elif not root.is_dir():
                raise ConfigError(f"{key}.{i}: no standard-library package '{spec[7:]}'")
            elif root == stdlib:
                found = [
                    f for f in root.rglob("*.py") if not SKIP_DIRS & set(f.relative_to(root).parts)
                ]
            else:
                found = [
                    f for f in root.rglob("*.py") if not SKIP_DIRS & set(f.relative_to(root).parts)
                ]
        else:
            p = Path(spec).expanduser()
            if p.is_dir():
                found = [f for ext in ("*.py", "*.txt", "*.md") for f in p.rglob(ext)]
            elif p.is_file():
                found = [p]
            else:
                try:
                    found = [Path(f) for f in sorted(glob.glob(spec, recursive=True))]
                except (OSError, ValueError) as exc:
                    raise ConfigError(f"{key}.{i}: {spec}: {exc}") from None
                if not found:
                    raise ConfigError(f"{key}.{i}: no such file or folder: {spec}")
        out += sorted(found)
    return sorted(set(out))


def split_by_file(
    files: list[Path], val_fraction: float, seed: int
) -> tuple[list[Path], list[Path]]:
    order = np.random.default_rng(seed).permutation(len(files))
    n_val = max(1, int(round(val_fraction * len(files)))) if val_fraction else 0
    val = sorted(files[i] for i in order[:n_val])
    train = sorted(files[i] for i in order[n_val:])
    return train, val


def read(f: Path, key: str = "data.paths") -> str:
    """A text file's contents (undecodable bytes replaced); an unreadable file is a config error."""
    try:
        return f.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ConfigError(f"{key}: {f}: cannot read ({exc.strerror or exc})") from None


def train_tokenizer(files: list[Path], vocab_size: int):
    """A byte-level BPE trained on ``files``, as a transformers fast tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train(
        [str(f) for f in files],
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS, PAD, MASK],
        show_progress=False,
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        eos_token=EOS,
        bos_token=EOS,
        pad_token=PAD,
        mask_token=MASK,
        unk_token=EOS,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def load_tokenizer(path: str, key: str = "data.tokenizer"):
    from transformers import AutoTokenizer

    from src.core.local_paths import resolve_path

    folder = resolve_path(path, key)
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{key}: {path}: not a tokenizer folder ({str(exc).strip().splitlines()[0][:120]})"
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def get_tokenizer(
    tokenizer: Optional[str], files: list[Path], vocab_size: int, run_dir: Optional[Path]
):
    """The named tokenizer; else the run's saved one (a resume); else a new BPE on ``files``."""
    if tokenizer:
        return load_tokenizer(tokenizer)
    saved = Path(run_dir) / "tokenizer" if run_dir else None
    if saved is not None and (saved / "tokenizer.json").is_file():
        return load_tokenizer(str(saved))
    return train_tokenizer(files, vocab_size)


def token_info(tok) -> dict:
    """What models built from a config need to know of the tokenizer."""
    info = {
        "tokenizer": tok,
        "vocab_size": len(tok),
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id or tok.eos_token_id,
        "decoder_start_token_id": tok.pad_token_id,
    }
    if tok.mask_token_id is not None:
        info["mask_token_id"] = tok.mask_token_id
    return info


class TokenBlocks(torch.utils.data.Dataset):
    """Fixed blocks of token ids; a batch is ``{"input_ids", "labels"}`` (labels = inputs: the
    model shifts them)."""

    batched = True

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int):
        return {k: v[0] for k, v in self.__getitems__([i]).items()}

    def __getitems__(self, indices: list[int]):
        x = self.blocks[torch.as_tensor(indices, dtype=torch.long)]
        return {"input_ids": x, "labels": x}


def pack(tok, files: list[Path], block_size: int) -> tuple[torch.Tensor, int, int]:
    """Documents joined with EOS and cut into (n, block_size) blocks; also (bytes, tokens)."""
    ids: list[int] = []
    n_bytes = 0
    texts = [read(f) for f in files]
    for enc, text in zip(tok(texts, add_special_tokens=False)["input_ids"], texts):
        ids += enc + [tok.eos_token_id]
        n_bytes += len(text.encode("utf-8"))
    n = len(ids) // block_size
    if n == 0:
        raise ConfigError(
            f"data.block_size: {block_size} is longer than the corpus ({len(ids)} tokens)"
        )
    return (
        torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size),
        n_bytes,
        len(ids),
    )


@DATASETS.register("text")
def text(
    seed: int,
    paths: Annotated[
        list[str],
        Field(
            description="files, folders, globs, or stdlib: / stdlib:<package> (Python's own source)"
        ),
    ],
    run_dir: Optional[Path] = None,
    tokenizer: Annotated[
        Optional[str],
        Field(description="local tokenizer folder (pkg:... too); else a BPE of vocab_size"),
    ] = None,
    vocab_size: Annotated[
        int,
        Field(
            ge=300,
            description="size of the BPE trained on the training files when no tokenizer is given",
        ),
    ] = 4096,
    block_size: Annotated[int, Field(ge=8, description="tokens per training example")] = 256,
    val_fraction: Annotated[
        float, Field(ge=0, lt=1, description="fraction of files held out (chosen with the seed)")
    ] = 0.1,
    max_files: Annotated[
        Optional[Annotated[int, Field(ge=2)]],
        Field(description="keep this many files (chosen with the seed) to bound a run"),
    ] = None,
) -> DataModule:
    """Packed token blocks from text files, split by file."""
    files = resolve_files(paths)
    if max_files and len(files) > max_files:
        keep = np.random.default_rng(seed + 1).permutation(len(files))[:max_files]
        files = sorted(files[i] for i in keep)
    if len(files) < 2 and val_fraction:
        raise ConfigError(f"data.paths: {len(files)} file(s); a split by file needs two or more")
    train_files, val_files = split_by_file(files, val_fraction, seed)
    tok = get_tokenizer(tokenizer, train_files, vocab_size, run_dir)
    train, _, _ = pack(tok, train_files, block_size)
    val = None
    extra = token_info(tok)
    if val_files:
        val_blocks, val_bytes, val_tokens = pack(tok, val_files, block_size)
        val = TokenBlocks(val_blocks)
        extra["val_bytes_per_token"] = val_bytes / val_tokens
        extra["val_files"] = [str(f) for f in val_files]
    info = DatasetInfo(num_samples=len(train), input_shape=(block_size,), extra=extra)
    return DataModule(TokenBlocks(train), val, info)
