"""Text corpora for language models: files and folders (or the Python standard library's own
source, ``stdlib:`` / ``stdlib:email``), split by file with a seed, tokenised once into a token
store (:mod:`src.data.token_store`: memory-mapped shards in a cache shared by runs), and read as
fixed blocks with an end-of-text separator between documents.

The tokenizer comes from a local folder, or is a byte-level BPE trained with the ``tokenizers``
library on the training files. A trained BPE is cached by the same rule as the store (its key:
the training files, the vocabulary size), so a second run on the same corpus does not train it
again, and is kept in the run folder (``<run>/tokenizer``), so a resumed run reuses the same
vocabulary. Files are decoded as UTF-8 with undecodable bytes replaced, for the tokenizer's
training and for the store alike.
"""

from __future__ import annotations

import glob
import os
import shutil
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import torch
from pydantic import Field

from src.core.dataset_info import DataModule, DatasetInfo
from src.core.errors import ConfigError
from src.core.registry import DATASETS
from src.data import token_store
from src.data.token_store import TokenStore

EOS, PAD, MASK = "<|endoftext|>", "<|pad|>", "<|mask|>"
SKIP_DIRS = {"site-packages", "test", "tests", "idlelib", "__pycache__", "turtledemo"}
CHUNK_CHARS = 8_000_000  # text tokenized per batch while a store builds (bounds its memory)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def resolve_files(paths: list[str], key: str = "data.paths") -> list[Path]:
    """Files named by ``paths``: files, folders (their *.py, *.txt, *.md), globs, or ``stdlib:``;
    sorted as paths (by their parts)."""
    out: list[str] = []
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for i, spec in enumerate(paths):
        if spec.startswith("stdlib:"):
            root = stdlib / spec[len("stdlib:") :].replace(".", "/")
            if root.with_suffix(".py").is_file() and not root.is_dir():
                out.append(str(root.with_suffix(".py")))
            elif not root.is_dir():
                raise ConfigError(f"{key}.{i}: no standard-library package '{spec[7:]}'")
            else:
                out += walk(root, (".py",), SKIP_DIRS)
        else:
            p = Path(spec).expanduser()
            if p.is_dir():
                out += walk(p, (".py", ".txt", ".md"))
            elif p.is_file():
                out.append(str(p))
            else:
                try:
                    found = [str(Path(f)) for f in glob.glob(spec, recursive=True)]
                except (OSError, ValueError) as exc:
                    raise ConfigError(f"{key}.{i}: {spec}: {exc}") from None
                if not found:
                    raise ConfigError(f"{key}.{i}: no such file or folder: {spec}")
                out += found
    # strings until the end: 24k Path objects cost more to sort than to find
    return [Path(f) for f in sorted(set(out), key=path_order)]


def path_order(path) -> list[str]:
    """The order of paths (``sorted`` of Path objects: by their parts), for a path or its string,
    without Path's slow comparisons."""
    parts = str(path).split(os.sep)
    return ["/", *parts[1:]] if parts[0] == "" else parts


def walk(root: Path, suffixes: tuple[str, ...], skip: frozenset | set = frozenset()) -> list[str]:
    """Files under ``root`` ending in ``suffixes``, not inside a folder named in ``skip``: one
    ``os.walk`` (a scan per folder: 24k files of a corpus in a third of a second)."""
    out = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip]
        out += [os.path.join(folder, n) for n in names if n.endswith(suffixes)]
    return out


def split_by_file(
    files: list[Path], val_fraction: float, seed: int
) -> tuple[list[Path], list[Path]]:
    order = np.random.default_rng(seed).permutation(len(files))
    n_val = max(1, int(round(val_fraction * len(files)))) if val_fraction else 0
    val = sorted((files[i] for i in order[:n_val]), key=path_order)
    train = sorted((files[i] for i in order[n_val:]), key=path_order)
    return train, val


def read(f: Path, key: str = "data.paths") -> str:
    """A text file's contents (undecodable bytes replaced); an unreadable file is a config error."""
    try:
        return f.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ConfigError(f"{key}: {f}: cannot read ({exc.strerror or exc})") from None


def texts(files: list[Path], key: str = "data.paths") -> Iterator[str]:
    """Each file's text, read one at a time (see :func:`read`)."""
    for f in files:
        yield read(f, key)


def train_tokenizer(files: list[Path], vocab_size: int):
    """A byte-level BPE trained on ``files`` (decoded text, streamed), as a transformers fast
    tokenizer."""
    return train_bpe(texts(files), len(files), vocab_size)


def train_bpe(documents: Iterable[str], length: int, vocab_size: int):
    """A byte-level BPE trained on ``documents`` (``length`` of them, streamed), as a
    transformers fast tokenizer with our special tokens and chat template."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        documents,
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS, PAD, MASK],
        show_progress=False,
        length=length,
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


def cached_bpe(files: list[Path], vocab_size: int, root: Path):
    """:func:`train_tokenizer` on ``files``, trained once per (files, vocab_size) and kept under
    ``root/tokenizers/<key>`` (see :func:`cached_tokenizer`)."""
    return cached_tokenizer(
        {"files": token_store.file_facts(files)},
        lambda: train_tokenizer(files, vocab_size),
        vocab_size,
        root,
    )


def cached_tokenizer(source: dict, train: Callable[[], Any], vocab_size: int, root: Path):
    """The BPE ``train()`` makes from ``source`` (what names its training text: files' facts),
    trained once per (source, vocab_size) and kept under ``root/tokenizers/<key>`` (written to a
    temporary folder and renamed, under a lock)."""
    key = token_store.store_key(
        kind="bpe", **source, vocab_size=vocab_size, special=[EOS, PAD, MASK]
    )
    folder = root / "tokenizers" / key
    if (folder / "tokenizer.json").is_file():
        return load_tokenizer(str(folder))
    with token_store.locked(root / "tokenizers" / f"{key}.lock", f"tokenizer {folder}"):
        if (folder / "tokenizer.json").is_file():
            return load_tokenizer(str(folder))
        tok = train()
        tmp = root / "tokenizers" / f"{key}.build"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tok.save_pretrained(str(tmp))
            os.rename(tmp, folder)
        except OSError as exc:  # no cache to write: the run goes on with the trained tokenizer
            shutil.rmtree(tmp, ignore_errors=True)
            token_store.say(f"warning: tokenizer not cached in {folder}: {exc.strerror or exc}")
        return tok


def get_tokenizer(
    tokenizer: Optional[str],
    files: list[Path],
    vocab_size: int,
    run_dir: Optional[Path],
    cache: Optional[Path] = None,
):
    """The named tokenizer; else the run's saved one (a resume); else a BPE on ``files`` (cached
    under ``cache`` when given)."""
    if tokenizer:
        return load_tokenizer(tokenizer)
    saved = Path(run_dir) / "tokenizer" if run_dir else None
    if saved is not None and (saved / "tokenizer.json").is_file():
        return load_tokenizer(str(saved))
    if cache is not None:
        return cached_bpe(files, vocab_size, cache)
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
    """Fixed blocks of ``block_size`` tokens cut from a token store's stream (a partial last block
    is dropped); a batch is ``{"input_ids", "labels"}`` (labels = inputs: the model shifts them),
    gathered from the memory map in one go: resident memory does not grow with the corpus."""

    batched = True

    def __init__(self, store: TokenStore, block_size: int):
        self.store, self.block_size = store, block_size
        self.n = len(store) // block_size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return {k: v[0] for k, v in self.__getitems__([i % self.n]).items()}

    def __getitems__(self, indices: list[int]):
        x = torch.from_numpy(self.store.blocks(np.asarray(indices), self.block_size))
        return {"input_ids": x, "labels": x}


def encode_documents(tok, documents: list[str]) -> list[np.ndarray]:
    """Each document's ids (one batched call of the fast tokenizer) with EOS after it."""
    ids = tok(documents, add_special_tokens=False, verbose=False)["input_ids"]
    out = []
    for doc in ids:
        arr = np.empty(len(doc) + 1, dtype=np.int64)
        arr[:-1] = doc
        arr[-1] = tok.eos_token_id
        out.append(arr)
    return out


def tokenize_files(
    tok, files: list[Path], root: Path, what: str = "text"
) -> tuple[TokenStore, Optional[float]]:
    """``files`` (each a document, EOS after it) tokenized by ``tok`` into the token store their
    content names under ``root``: reused when it is there, else built streaming. Returns the
    store and its build seconds (None: it was cached)."""
    facts = token_store.file_facts(files)
    key = token_store.store_key(kind="text", files=facts, tokenizer=token_store.tokenizer_hash(tok))
    manifest: dict = {"format": "text", "files": len(files), "text_bytes": 0}
    progress = token_store.Progress(
        f"{what} ({len(files):,} files)", len(files), sum(f[1] for f in facts)
    )

    def chunks() -> Iterator[list[np.ndarray]]:
        batch: list[str] = []
        size = done = raw = 0
        try:
            for i, (f, fact) in enumerate(zip(files, facts)):
                batch.append(read(f))
                size += len(batch[-1])
                raw += fact[1]
                if size < CHUNK_CHARS and i + 1 < len(files):
                    continue
                out = encode_documents(tok, batch)
                manifest["text_bytes"] += sum(len(t.encode("utf-8")) for t in batch)
                done += len(batch)
                batch, size = [], 0
                yield out
                progress.update(done, raw)
        finally:  # built, failed or stopped: the bar ends
            progress.close()

    return token_store.open_or_build(
        root, key, len(tok), chunks(), manifest, f"token store of {what}"
    )


def store_fact(store: TokenStore, seconds: Optional[float]) -> dict:
    """What a run reports of a store it read (the banner, run_info.json)."""
    return {
        "path": str(store.folder),
        "tokens": store.tokens,
        "documents": store.manifest["documents"],
        "bytes": sum(m.nbytes for m in store.maps),
        "built_seconds": None if seconds is None else round(seconds, 2),
    }


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
    cache_dir: Annotated[
        Optional[str],
        Field(
            description="where token stores and trained tokenizers are kept (default "
            "$TESSERA_CACHE, else ~/.cache/tessera)"
        ),
    ] = None,
) -> DataModule:
    """Packed token blocks from text files, split by file."""
    files = resolve_files(paths)
    if max_files and len(files) > max_files:
        keep = np.random.default_rng(seed + 1).permutation(len(files))[:max_files]
        files = sorted((files[i] for i in keep), key=path_order)
    if len(files) < 2 and val_fraction:
        raise ConfigError(f"data.paths: {len(files)} file(s); a split by file needs two or more")
    train_files, val_files = split_by_file(files, val_fraction, seed)
    root = token_store.cache_root(cache_dir)
    tok = get_tokenizer(tokenizer, train_files, vocab_size, run_dir, root)
    store, seconds = tokenize_files(tok, train_files, root, "train")
    train = blocks_of(store, block_size)
    val = None
    extra = token_info(tok)
    extra["token_stores"] = [store_fact(store, seconds)]
    if val_files:
        val_store, seconds = tokenize_files(tok, val_files, root, "val")
        val = blocks_of(val_store, block_size)
        extra["val_bytes_per_token"] = val_store.manifest["text_bytes"] / max(1, len(val_store))
        extra["val_files"] = [str(f) for f in val_files]
        extra["token_stores"].append(store_fact(val_store, seconds))
    info = DatasetInfo(num_samples=len(train), input_shape=(block_size,), extra=extra)
    return DataModule(train, val, info)


def blocks_of(store: TokenStore, block_size: int) -> TokenBlocks:
    blocks = TokenBlocks(store, block_size)
    if len(blocks) == 0:
        raise ConfigError(
            f"data.block_size: {block_size} is longer than the corpus ({len(store)} tokens)"
        )
    return blocks
