"""Data at scale, text: a real corpus (an installed environment's site-packages: its .py, .txt
and .md files, hundreds of MB nobody wrote for this) through the token store.

- First start: ``python -m src.main prepare`` of lm_stdlib on the corpus with a saved tokenizer
  and an empty cache (tokenizing every file into the store), against a nanoGPT-style prepare
  (``python -m benchmarks.data_scale peer``: the same tokenizer, batch-encoded, appended to one
  uint16 ``np.memmap``), each a whole fresh process, alternating.
- Second start: a 1-step lm_stdlib run on the cached stores, from the command to its end, on the
  corpus and on a 10 MB part of it, alternating; wall time and peak resident memory of the
  process (``wait4``).

    python -m benchmarks.data_scale [--corpus FOLDER] [--pairs N]   # prints the section
    python -m benchmarks.run --only datascale --update              # into RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _timed(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, peak resident GB) of one process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    out, err = proc.communicate()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} failed:\n{out[-2000:]!r}\n{err[-3000:]!r}")
    return wall, usage.ru_maxrss / 1e6  # KiB on Linux


def peer(files_list: Path, tokenizer: str, out: Path) -> None:
    """nanoGPT's prepare, with the run's tokenizer: encode in batches, write one uint16 map."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    files = files_list.read_text().splitlines()
    chunks, total = [], 0
    batch: list[str] = []
    size = 0

    def flush():
        nonlocal total
        for ids in tok(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            arr = np.asarray(ids + [tok.eos_token_id], dtype=np.uint16)
            chunks.append(arr)
            total += len(arr)

    for f in files:
        batch.append(Path(f).read_text(encoding="utf-8", errors="replace"))
        size += len(batch[-1])
        if size >= 8_000_000:
            flush()
            batch, size = [], 0
    if batch:
        flush()
    m = np.memmap(out, dtype=np.uint16, mode="w+", shape=(total,))
    i = 0
    for arr in chunks:
        m[i : i + len(arr)] = arr
        i += len(arr)
    m.flush()
    print(json.dumps({"tokens": total}))


def _config(tmp: Path, name: str, paths: list[str], tok: Path) -> Path:
    import yaml

    cfg = yaml.safe_load((ROOT / "configs/lm_stdlib.yaml").read_text())
    cfg["name"] = name
    cfg["data"].update(paths=paths, tokenizer=str(tok))
    cfg["trainer"].update(max_steps=1, compile=False, eval_every_n_steps=None, log_every=1)
    cfg["task"]["samples"] = 0
    cfg["checkpoint"] = {"save_last": False}
    cfg["logging"] = {"root": str(tmp / "runs"), "loggers": ["jsonl"]}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def measure(corpus: str | None = None, pairs: int = 2, quick: bool = False) -> dict:
    from src.data.text import resolve_files, train_tokenizer

    corpus = corpus or sysconfig.get_paths()["purelib"]
    files = resolve_files([corpus])
    if quick:  # a few MB, for the smoke test
        files = files[:: max(1, len(files) // 200)][:200]
    total = sum(f.stat().st_size for f in files)
    small, size = [], 0
    for i in np.random.default_rng(0).permutation(len(files)):
        if size >= (total / 8 if quick else 10e6):
            break
        small.append(files[i])
        size += files[i].stat().st_size
    tmp = Path(tempfile.mkdtemp(prefix="bench-datascale-"))
    tok = tmp / "tok"
    train_tokenizer(resolve_files(["stdlib:json"]), 4096).save_pretrained(str(tok))
    (tmp / "files.txt").write_text("\n".join(str(f) for f in files))
    big_cfg = _config(tmp, "big", [str(f) for f in files] if quick else [corpus], tok)
    small_cfg = _config(tmp, "small", [str(f) for f in small], tok)
    base = {**os.environ, "PYTHONPATH": str(ROOT)}
    res: dict = {"corpus": corpus, "files": len(files), "bytes": total, "small_bytes": size,
                 "ours": [], "peer": [], "big": [], "small": []}  # fmt: skip
    for i in range(pairs):  # first start: an empty cache each time
        cache = tmp / f"cache{i}"
        env = {**base, "TESSERA_CACHE": str(cache)}
        res["ours"].append(
            _timed([sys.executable, "-m", "src.main", "prepare", "--config", str(big_cfg)], env)
        )
        shutil.rmtree(cache, ignore_errors=True)
        res["peer"].append(
            _timed(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.data_scale",
                    "peer",
                    str(tmp / "files.txt"),
                    str(tok),
                    str(tmp / "peer.bin"),
                ],
                base,
            )  # fmt: skip
        )
        (tmp / "peer.bin").unlink()
    env = {**base, "TESSERA_CACHE": str(tmp / "cache")}
    for cfg in (big_cfg, small_cfg):  # the stores, built once
        _timed([sys.executable, "-m", "src.main", "prepare", "--config", str(cfg)], env)
    for _ in range(pairs):
        for key, cfg in (("big", big_cfg), ("small", small_cfg)):
            shutil.rmtree(tmp / "runs", ignore_errors=True)
            res[key].append(_timed([sys.executable, "-m", "src.main", "--config", str(cfg)], env))
    shutil.rmtree(tmp, ignore_errors=True)
    return res


def section(res: dict) -> list[str]:
    def med(key: str, i: int) -> float:
        return statistics.median(r[i] for r in res[key])

    mb = res["bytes"] / 1e6
    ratio = [p[0] / o[0] for o, p in zip(res["ours"], res["peer"])]
    dt = [b[0] - s[0] for b, s in zip(res["big"], res["small"])]
    mem = [b[1] / s[1] for b, s in zip(res["big"], res["small"])]
    return [
        f"Corpus: {res['files']:,} .py/.txt/.md files, {mb:,.0f} MB, of `{res['corpus']}` "
        "(an installed environment). One BPE (4,096, trained on the json package) for both. "
        "Whole fresh processes, alternating; median of the pairs. Goals: first start >= 0.9x the "
        "peer's throughput; a second start at most 3 s longer than on 10 MB, and at most 1.25x "
        "its peak memory.",
        "",
        "| first start (empty cache) | s | MB/s | peak GB |",
        "|---|---|---|---|",
        f"| ours: `prepare` (train + val stores) | {med('ours', 0):.1f} | "
        f"{mb / med('ours', 0):.2f} | {med('ours', 1):.2f} |",
        f"| nanoGPT-style prepare (one uint16 memmap) | {med('peer', 0):.1f} | "
        f"{mb / med('peer', 0):.2f} | {med('peer', 1):.2f} |",
        "",
        f"Throughput ours / peer per pair: {' / '.join(f'{r:.2f}' for r in sorted(ratio))}.",
        "",
        "| second start (cached), a 1-step run | s | peak GB |",
        "|---|---|---|",
        f"| {mb:,.0f} MB corpus | {med('big', 0):.1f} | {med('big', 1):.2f} |",
        f"| {res['small_bytes'] / 1e6:,.0f} MB part of it | {med('small', 0):.1f} | "
        f"{med('small', 1):.2f} |",
        "",
        f"Per pair: {' / '.join(f'{d:+.1f} s' for d in dt)} longer, "
        f"{' / '.join(f'{m:.2f}x' for m in mem)} the memory.",
    ]


if __name__ == "__main__":
    if sys.argv[1:2] == ["peer"]:
        peer(Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
        sys.exit(0)
    ap = argparse.ArgumentParser(prog="python -m benchmarks.data_scale")
    ap.add_argument("--corpus", default=None)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    print("\n".join(section(measure(a.corpus, 1 if a.quick else a.pairs, a.quick))))
