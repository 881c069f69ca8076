"""Token stores: text tokenized once into memory-mapped shards, reused, never read stale."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import ROOT

from src.core.errors import DataError
from src.data import token_store
from src.data.text import EOS, TokenBlocks, load_tokenizer, text, tokenize_files


def corpus(folder, n=6):
    folder.mkdir(exist_ok=True)
    for i in range(n):
        (folder / f"doc{i}.txt").write_text(f"document {i}: " + "alpha beta gamma delta " * (i + 3))
    return sorted(folder.glob("*.txt"))


def stream(tok, files):
    """What the store must hold: each file's ids then EOS, computed here the direct way."""
    ids = tok([f.read_text() for f in files], add_special_tokens=False)["input_ids"]
    return [t for doc in ids for t in [*doc, tok.eos_token_id]]


def test_blocks_are_the_stream_with_eos_between_documents_cut_into_full_blocks(
    tmp_path, tokenizer_dir
):
    tok = load_tokenizer(str(tokenizer_dir))
    files = corpus(tmp_path / "c")
    store, built = tokenize_files(tok, files, tmp_path / "cache")
    expected = stream(tok, files)
    assert built is not None and len(store) == len(expected) and store.dtype == np.uint16
    assert store.manifest["text_bytes"] == sum(len(f.read_bytes()) for f in files)
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == EOS
    blocks = TokenBlocks(store, 7)
    assert len(blocks) == len(expected) // 7
    got = blocks.__getitems__(list(range(len(blocks))))["input_ids"]
    assert got.dtype.is_floating_point is False and got.shape == (len(blocks), 7)
    assert got.flatten().tolist() == expected[: len(blocks) * 7]
    assert blocks[len(blocks) - 1]["input_ids"].tolist() == got[-1].tolist()
    ends = np.cumsum(
        [len(tok(f.read_text(), add_special_tokens=False)["input_ids"]) + 1 for f in files]
    )
    assert store.doc_ends.tolist() == ends.tolist()


def test_the_same_content_reuses_the_store_and_any_change_builds_a_new_one(tmp_path, tokenizer_dir):
    tok = load_tokenizer(str(tokenizer_dir))
    files = corpus(tmp_path / "c")
    cache = tmp_path / "cache"
    first, built = tokenize_files(tok, files, cache)
    again, rebuilt = tokenize_files(tok, files, cache)
    assert built is not None and rebuilt is None and again.folder == first.folder
    files[2].write_text(files[2].read_text() + " edited")  # a source edited after the build
    edited, built = tokenize_files(tok, files, cache)
    assert built is not None and edited.folder != first.folder
    assert edited.read(0, len(edited)).tolist() == stream(tok, files)
    other = load_tokenizer(str(tokenizer_dir))
    other.add_tokens(["alpha beta"])  # a tokenizer changed under the same name
    changed, built = tokenize_files(other, files, cache)
    assert built is not None and changed.folder not in (first.folder, edited.folder)


def test_blocks_across_shard_boundaries_match_one_shard(tmp_path, tokenizer_dir, monkeypatch):
    tok = load_tokenizer(str(tokenizer_dir))
    files = corpus(tmp_path / "c", 12)
    whole, _ = tokenize_files(tok, files, tmp_path / "one")
    monkeypatch.setattr(token_store, "SHARD_TOKENS", 37)
    sharded, _ = tokenize_files(tok, files, tmp_path / "many")
    assert len(sharded.maps) == -(-len(whole) // 37) > 3
    a, b = TokenBlocks(whole, 16), TokenBlocks(sharded, 16)
    idx = list(range(len(a)))[::-1]
    assert b.__getitems__(idx)["input_ids"].tolist() == a.__getitems__(idx)["input_ids"].tolist()


def test_a_truncated_or_altered_shard_is_one_line_naming_the_file(tmp_path, tokenizer_dir):
    tok = load_tokenizer(str(tokenizer_dir))
    files = corpus(tmp_path / "c")
    store, _ = tokenize_files(tok, files, tmp_path / "cache")
    shard = store.folder / "tokens-00000.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[::-1])  # same size, other bytes
    with pytest.raises(DataError, match=r"tokens-00000.bin: checksum does not match"):
        tokenize_files(tok, files, tmp_path / "cache")
    shard.write_bytes(data[:-2])
    with pytest.raises(DataError, match=r"tokens-00000.bin: \d+ bytes, its manifest says"):
        tokenize_files(tok, files, tmp_path / "cache")


def test_a_build_stopped_half_way_leaves_nothing_and_the_next_one_builds(
    tmp_path, tokenizer_dir, monkeypatch
):
    tok = load_tokenizer(str(tokenizer_dir))
    files = corpus(tmp_path / "c")
    cache = tmp_path / "cache"
    real_add = token_store._Writer.add
    calls = []

    def add_then_die(self, docs):
        real_add(self, docs)
        calls.append(1)
        raise KeyboardInterrupt  # a stop between two chunks

    monkeypatch.setattr(
        token_store, "_Writer", type("W", (token_store._Writer,), {"add": add_then_die})
    )
    with pytest.raises(KeyboardInterrupt):
        tokenize_files(tok, files, cache)
    assert calls and not [p for p in (cache / "tokens").iterdir() if p.is_dir()]
    monkeypatch.undo()
    # what a kill -9 leaves: a half-written build folder; the next build replaces it
    key_dir = next(iter(sorted((cache / "tokens").glob("*.lock")))).with_suffix(".build")
    key_dir.mkdir()
    (key_dir / "tokens-00000.bin").write_bytes(b"\0" * 10)
    store, built = tokenize_files(tok, files, cache)
    assert built is not None and not key_dir.exists()
    assert store.read(0, len(store)).tolist() == stream(tok, files)


def test_a_full_disk_is_one_line_and_leaves_no_store(tmp_path, tokenizer_dir, monkeypatch):
    import errno

    tok = load_tokenizer(str(tokenizer_dir))
    files = corpus(tmp_path / "c")

    def full(self, docs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(token_store._Writer, "add", full)
    with pytest.raises(DataError, match="no space left on the device .*data.cache_dir"):
        tokenize_files(tok, files, tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache" / "tokens").iterdir() if p.is_dir()]


def test_two_processes_needing_one_store_build_it_once(tmp_path, tokenizer_dir):
    corpus(tmp_path / "c", 40)
    code = textwrap.dedent(
        f"""
        import sys; sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from src.data.text import load_tokenizer, tokenize_files
        files = sorted(Path({str(tmp_path / "c")!r}).glob("*.txt"))
        store, built = tokenize_files(load_tokenizer({str(tokenizer_dir)!r}), files,
                                      Path({str(tmp_path / "cache")!r}))
        print(store.folder, built is not None, len(store))
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0][0] == outs[1][0] and outs[0][2] == outs[1][2]
    assert sorted(o[1] for o in outs) == ["False", "True"]  # one built, the other waited


def test_a_store_past_2_to_the_32_tokens_opens_and_serves_its_last_block(tmp_path):
    """Offsets are 64-bit: a sparse store of 2**32 + 3 * 2**20 tokens (no 8 GB written)."""
    folder = tmp_path / "big"
    folder.mkdir()
    total = 2**32 + 3 * 2**20
    per = token_store.SHARD_TOKENS
    shards, left, bs = [], total, 1024
    last = np.arange(bs, dtype=np.uint16) + 7
    while left:
        n = min(per, left)
        f = folder / f"tokens-{len(shards):05d}.bin"
        with open(f, "wb") as fh:
            fh.truncate(n * 2)
        shards.append({"file": f.name, "tokens": n})
        left -= n
    n_blocks = total // bs
    with open(folder / shards[-1]["file"], "r+b") as fh:  # the last block, at its true offset
        fh.seek((n_blocks * bs - bs - (total - shards[-1]["tokens"])) * 2)
        fh.write(last.tobytes())
    for s in shards:
        s["sample_crc32"] = token_store._sample_crc(folder / s["file"], s["tokens"] * 2)
    np.asarray([total // 2, total], dtype=np.int64).tofile(folder / "docs.bin")
    manifest = {
        "version": token_store.VERSION,
        "dtype": "uint16",
        "tokens": total,
        "documents": 2,
        "shards": shards,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    store = token_store.TokenStore(folder)
    assert len(store) == total and store.doc_ends[-1] == total > 2**32
    blocks = TokenBlocks(store, bs)
    assert len(blocks) == n_blocks
    assert blocks[n_blocks - 1]["input_ids"].tolist() == last.tolist()
    assert blocks[-1]["input_ids"].tolist() == last.tolist()
    pattern = np.arange(10, dtype=np.uint16) + 100  # tokens per-5 .. per+4, across shards 0 and 1
    with open(folder / shards[0]["file"], "r+b") as fh:
        fh.seek((per - 5) * 2)
        fh.write(pattern[:5].tobytes())
    with open(folder / shards[1]["file"], "r+b") as fh:
        fh.write(pattern[5:].tobytes())
    for s in shards[:2]:
        s["sample_crc32"] = token_store._sample_crc(folder / s["file"], s["tokens"] * 2)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    store = token_store.TokenStore(folder)
    assert store.read(per - 5, 10).tolist() == pattern.tolist()


def test_text_decodes_bad_bytes_and_caches_its_tokenizer(tmp_path, monkeypatch):
    folder = tmp_path / "c"
    corpus(folder, 8)
    (folder / "latin1.txt").write_bytes(b"caf\xe9 \xff\xfe not utf-8 " * 20)  # as joblib ships
    cache = str(tmp_path / "cache")
    first = text(seed=0, paths=[str(folder)], vocab_size=300, block_size=8, cache_dir=cache)
    assert all(f["built_seconds"] is not None for f in first.info.extra["token_stores"])
    import src.data.text as text_module

    def no_training(*a, **k):
        raise AssertionError("trained the tokenizer again")

    monkeypatch.setattr(text_module, "train_tokenizer", no_training)
    second = text(seed=0, paths=[str(folder)], vocab_size=300, block_size=8, cache_dir=cache)
    assert [f["built_seconds"] for f in second.info.extra["token_stores"]] == [None, None]
    assert [f["path"] for f in second.info.extra["token_stores"]] == [
        f["path"] for f in first.info.extra["token_stores"]
    ]
    assert second.train[3]["input_ids"].tolist() == first.train[3]["input_ids"].tolist()


def test_an_unreadable_file_is_one_line_naming_it(tmp_path, cli):
    folder = tmp_path / "c"
    corpus(folder, 3)
    (folder / "dir.txt").symlink_to(tmp_path / "gone.txt")  # a link whose file was deleted
    cfg = tmp_path / "lm.yaml"
    cfg.write_text(
        "name: lm\ndata: {type: text, paths: ["
        + str(folder)
        + "], vocab_size: 300, block_size: 8}\n"
        "model: {type: hf, kind: causal_lm, config: {model_type: gpt2, n_layer: 1, n_head: 2,"
        " n_embd: 16, n_positions: 8}}\ntask: {type: causal_lm}\n"
    )
    res = cli("prepare", "--config", str(cfg))
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().count("\n") == 0 and "dir.txt: cannot read" in res.stderr


def test_prepare_builds_the_stores_and_a_run_then_reads_them_cached(tmp_path, cli):
    cfg = tmp_path / "lm.yaml"
    cfg.write_text(
        "name: lm\nseed: 0\n"
        "data: {type: text, paths: ['stdlib:json'], vocab_size: 300, block_size: 16,"
        " val_fraction: 0.3, batch_size: 4}\n"
        "model: {type: hf, kind: causal_lm, config: {model_type: gpt2, n_layer: 1, n_head: 2,"
        " n_embd: 16, n_positions: 16}}\ntask: {type: causal_lm, samples: 0}\n"
        f"trainer: {{max_steps: 2, log_every: 1}}\nlogging: {{root: {tmp_path / 'runs'},"
        " loggers: [jsonl]}\n"
    )
    env = {"TESSERA_CACHE": str(tmp_path / "cache")}
    prep = cli("prepare", "--config", str(cfg), env=env)
    assert prep.returncode == 0, prep.stderr
    lines = [ln for ln in prep.stdout.splitlines() if ln.startswith("store")]
    assert len(lines) == 2 and all("built in" in ln for ln in lines), prep.stdout
    paths = [ln.split()[1].rstrip(":") for ln in lines]
    assert all(str(tmp_path / "cache") in p for p in paths)
    train = cli("--config", str(cfg), env=env)
    assert train.returncode == 0, train.stderr
    banner = [
        ln for ln in (train.stdout + train.stderr).splitlines() if ln.startswith("data     store")
    ]
    assert len(banner) == 2 and all(ln.endswith("tokens (cached)") for ln in banner), banner
    info = json.loads((tmp_path / "runs" / "lm" / "run_info.json").read_text())
    assert info["params"]["data.token_stores"] == paths
    extend = cli("--config", str(cfg), "trainer.max_steps=3", env=env)  # a resume: no tokenizing
    assert extend.returncode == 0, extend.stderr
    assert "resumed at step 2" in extend.stdout + extend.stderr
    banner = [ln for ln in (extend.stdout + extend.stderr).splitlines() if "store " in ln]
    assert [ln.split()[2].rstrip(":") for ln in banner] == paths
    assert all(ln.endswith("(cached)") for ln in banner)
    assert sorted(os.listdir(tmp_path / "cache" / "tokens")) == sorted(
        [os.path.basename(p) for p in paths] + [os.path.basename(p) + ".lock" for p in paths]
    )


class _Terminal:
    """A stream that says it is a terminal, keeping what is written."""

    def __init__(self, tty: bool):
        self.tty, self.text = tty, ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, s: str) -> int:
        self.text += s
        return len(s)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("tty", [True, False])
def test_a_build_shows_a_bar_on_a_terminal_and_plain_lines_otherwise(tty, monkeypatch, capsys):
    """On a terminal: a bar with the files done, the MB read, MB/s and the time left, ended by
    close(); elsewhere: a plain line at most every ``every`` seconds."""
    out = _Terminal(tty)
    monkeypatch.setattr(token_store.sys, "stderr", out)
    monkeypatch.setenv("COLUMNS", "150")  # the terminal's width
    progress = token_store.Progress("train (3 files)", 3, 3_000_000, every=0.0, stream=out)
    for done in (1, 2, 3):
        progress.update(done, done * 1_000_000)
    progress.close()
    assert progress.bar is None
    if tty:
        assert "\x1b[" in out.text  # drawn, not printed line by line
        assert "tokenizing train (3 files)" in out.text and "3/3 files" in out.text
        assert "3.0/3.0 MB" in out.text
    else:
        lines = out.text.strip().splitlines()
        assert len(lines) == 3 and "\x1b[" not in out.text
        assert lines[-1].startswith("store    tokenizing train (3 files): 3/3 files, 3/3 MB,")
