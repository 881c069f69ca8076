"""Predictions of a trained run on its validation split, another data section, or prompts.

    python -m src.main predict --run experiments/exp001                  # val split -> JSONL
    python -m src.main predict --run experiments/exp001 --out preds.csv --split train
    python -m src.main predict --run experiments/exp001 --data type=image_folder root=photos/
    python -m src.main predict --run experiments/lm_stdlib --prompts prompts.txt --temperature 0.7
    torchrun --nproc-per-node 2 -m src.main predict experiments/exp001   # RUN without --run

Each process predicts its share of the samples (``r, r + world, ...``, no padding), the main
process gathers them and writes exactly one row per sample, in dataset order, with its index as
``id``. What a row holds follows the task: classification and sequence classification the
predicted label, its name and the top-k probabilities (and the true label where the data has
one); metric learning an L2-normalised ``embedding``; self-supervised tasks ``features``;
causal LMs the ``text`` continuing each prompt. ``.jsonl`` (default), ``.csv`` (labels) or
``.npy`` (the one array output, row ``i`` = sample ``i``).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Optional, Protocol

import numpy as np
import torch

from src.core.errors import ArgumentParser, UserError
from src.run.inference import load_run, positional_run

FORMATS = (".jsonl", ".csv", ".npy")


def shard_batches(n: int, batch_size: int, rank: int, world: int) -> list[list[int]]:
    """This process's samples ``rank, rank + world, ...`` in batches; no sample twice, none
    left out, none padded (a process may get one batch fewer, or none)."""
    mine = list(range(rank, n, world))
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


class _Run(Protocol):
    """What prediction reads of a run: a loaded one (LoadedRun) or an experiment in memory."""

    task: Any
    cfg: Any


def predict(
    run: _Run,
    dataset,
    batch_size: int,
    strategy=None,
    options=None,
    progress: bool = True,
    device: Optional[torch.device] = None,
) -> Optional[dict[str, Any]]:
    """Predict every sample of ``dataset``; on the main process returns ``{"id": (N,) array,
    output name: (N, ...) array or list}`` in dataset order (None on the others)."""
    from torch.utils.data import DataLoader

    from src.data.loader import collate_fn
    from src.distributed.base import move_batch

    rank = strategy.rank if strategy else 0
    world = strategy.world_size if strategy else 1
    device = strategy.device if strategy else (device or torch.device("cpu"))
    task = run.task.to(device)
    batches = shard_batches(len(dataset), batch_size, rank, world)
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collate_fn(dataset),
        num_workers=run.cfg.data.num_workers,
    )
    outputs: dict[str, list] = {}
    ids: list[np.ndarray] = []
    bar = _progress(len(batches), progress and rank == 0)
    with torch.inference_mode():
        for idx, batch in zip(batches, loader):
            batch = move_batch(batch, device)
            idx_t = torch.as_tensor(idx)
            out = task.predict_step(batch, ids=idx_t, **(options or {}))
            if (
                isinstance(batch, dict)
                and torch.is_tensor(batch.get("labels"))
                and batch["labels"].ndim == 1
            ):
                out["target"] = batch["labels"]
            if "prompt" in batch:
                out = {"prompt": batch["prompt"], **out}
            for name, value in out.items():
                value = value.cpu().numpy() if torch.is_tensor(value) else list(value)
                outputs.setdefault(name, []).append(value)
            ids.append(np.asarray(idx))
            bar.advance()
    bar.close()
    local = {name: _concat(parts) for name, parts in outputs.items()}
    local["id"] = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    if world > 1:
        import torch.distributed as dist

        gathered: list[Any] | None = [None] * world if rank == 0 else None
        dist.gather_object(local, gathered, dst=0)
        if gathered is None:
            return None
        parts = [g for g in gathered if len(g["id"])]
        local = {k: _concat([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(local["id"], kind="stable")
    result = {
        k: (v[order] if isinstance(v, np.ndarray) else [v[i] for i in order])
        for k, v in local.items()
    }
    if not np.array_equal(result["id"], np.arange(len(dataset))):  # the contract, checked
        raise RuntimeError(f"predict: gathered {len(result['id'])} rows for {len(dataset)} samples")
    return result


def _concat(parts: list) -> Any:
    if parts and isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    return [x for p in parts for x in p]


class _progress:
    """A rich progress bar on a terminal (nothing otherwise, and nothing on other ranks)."""

    def __init__(self, total: int, show: bool):
        import sys

        self.bar = None
        if show and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import Progress

            self.bar = Progress(console=Console(stderr=True), transient=True)
            self.bar.start()
            self.task = self.bar.add_task("predict", total=total)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def rows(result: dict[str, Any], class_names: list[str], top_k: int) -> list[dict[str, Any]]:
    """One JSON-able record per sample (arrays turned into Python lists once, not per row)."""
    ids = result["id"].tolist()
    extra = {
        name: (v.tolist() if isinstance(v, np.ndarray) else v)
        for name, v in result.items()
        if name not in ("id", "probs", "target")
    }
    targets = result["target"].tolist() if "target" in result else None
    probs = result.get("probs")
    if probs is not None:
        k = min(top_k, probs.shape[1])
        top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        top_labels = top.tolist()
        top_p = np.take_along_axis(probs, top, axis=1)
        top_probs, rounded = top_p[:, 0].tolist(), np.round(top_p.astype(np.float64), 6).tolist()
    names = {i: n for i, n in enumerate(class_names)}
    out = []
    for i, id_ in enumerate(ids):
        row: dict[str, Any] = {"id": id_}
        for name, values in extra.items():
            row[name] = values[i]
        if probs is not None:
            labels = top_labels[i]
            row.update(
                label=labels[0],
                name=names.get(labels[0], str(labels[0])),
                prob=top_probs[i],
                top_k=[
                    {"label": c, "name": names.get(c, str(c)), "prob": p}
                    for c, p in zip(labels, rounded[i])
                ],
            )
        if targets is not None:
            row.update(target=targets[i], target_name=names.get(targets[i], str(targets[i])))
        out.append(row)
    return out


def write(result: dict[str, Any], out: Path, class_names: list[str], top_k: int) -> None:
    """``out`` (.jsonl, .csv or .npy), written whole or not at all."""
    from src.run.inference import atomic_path

    suffix = out.suffix.lower()
    arrays = [
        k
        for k, v in result.items()
        if k not in ("id", "target") and isinstance(v, np.ndarray) and v.ndim == 2
    ]
    if suffix == ".npy" and len(arrays) != 1:
        raise UserError(
            f"--out {out}: .npy holds one array; these predictions are "
            f"{', '.join(k for k in result if k != 'id')}: use .jsonl"
        )
    if suffix == ".csv" and arrays and "probs" not in arrays:
        raise UserError(
            f"--out {out}: a CSV row holds single values; {arrays[0]} is a vector "
            "per sample: use .npy or .jsonl"
        )
    with atomic_path(out) as tmp:
        if suffix == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, result[arrays[0]])
            return
        records = rows(result, class_names, top_k)
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            if suffix == ".jsonl":
                encode = json.JSONEncoder(ensure_ascii=False).encode  # one encoder, not one per row
                f.writelines(encode(r) + "\n" for r in records)
            else:
                fields = [k for k in records[0] if k != "top_k"] if records else ["id"]
                w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
                w.writeheader()
                w.writerows(records)


def main(argv: list[str]) -> int:
    p = ArgumentParser(
        prog="python -m src.main predict",
        description="Predict with a trained run: its validation split by default.",
    )
    p.add_argument(
        "--run",
        help="the run folder (experiments/<name>); its latest committed "
        "checkpoint unless --checkpoint",
    )
    p.add_argument("--checkpoint", help="a step folder, checkpoints/ or checkpoints/latest")
    p.add_argument("--config", help="the config to build the model from (default: the run's)")
    p.add_argument(
        "--split",
        choices=("val", "train"),
        default="val",
        help="which split of the run's data (default val)",
    )
    p.add_argument(
        "--data",
        nargs="+",
        metavar="KEY=VALUE",
        default=[],
        help="another data section, e.g. --data type=image_folder root=photos/ "
        "(validated like the config)",
    )
    p.add_argument("--prompts", help="causal LM: a .txt (one per line) or .jsonl file of prompts")
    p.add_argument(
        "--out",
        help="output file: .jsonl (default), .csv or .npy; default "
        "RUN/predictions/<split>-step_<N>.jsonl (with --data: <split>-<type>-<hash>-step_<N>.jsonl)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        help="samples per process and forward (default: the run's eval batch size)",
    )
    p.add_argument("--top-k", type=int, default=5, help="probabilities kept per row (default 5)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="causal LM: tokens per prompt")
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="causal LM: 0 (default) is greedy, above samples",
    )
    p.add_argument("--top-p", type=float, default=1.0, help="causal LM: nucleus sampling mass")
    p.add_argument(
        "--device",
        default="auto",
        help="auto (cuda > mps > cpu), cpu, cuda:1 ...; under torchrun each process "
        "takes its local GPU",
    )
    p.add_argument(
        "--trust-pickles",
        action="store_true",
        help="read the checkpoint without checking its pickles (files you trust)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="[RUN] key.path=value",
        help="the run folder may also come first without --run (torchrun reads "
        "--run as its own --run-path); then config overrides, as for training",
    )
    args = p.parse_args(argv)
    args.run = positional_run(args, p.prog)
    out = Path(args.out) if args.out else None
    if out is not None and out.suffix.lower() not in FORMATS:
        raise UserError(f"--out: {out}: write .jsonl, .csv or .npy")
    for flag, value, low in (
        ("--batch-size", args.batch_size, 1),
        ("--top-k", args.top_k, 1),
        ("--max-new-tokens", args.max_new_tokens, 1),
    ):
        if value is not None and value < low:
            raise UserError(f"{flag}: {value} is below {low}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UserError("--temperature must be >= 0 and --top-p in (0, 1]")
    bad = [d for d in args.data if "=" not in d]
    if bad:
        raise UserError(f"--data: {bad[0]!r} is not KEY=VALUE (e.g. type=image_folder)")
    overrides = [f"data.{d}" for d in args.data] + list(args.overrides)

    strategy = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: share the samples
        from src.core.registry import STRATEGIES
        from src.run.catalog import load_builtins

        load_builtins()
        strategy = STRATEGIES.build({"type": "ddp"}, "strategy")
        strategy.setup()
    try:
        return _predict(args, out, overrides, strategy)
    finally:
        if strategy is not None:
            strategy.teardown()


def _predict(args, out: Optional[Path], overrides: list[str], strategy) -> int:
    from src.distributed.base import pick_device

    device = None if strategy is not None else pick_device(args.device, "--device")
    run = load_run(args.run, args.checkpoint, args.config, overrides, args.trust_pickles)
    if args.prompts:
        from src.data.prompts import PromptDataset

        dataset, split = PromptDataset(args.prompts), "prompts"
    else:
        split = args.split
        dataset = run.data.val if split == "val" else run.data.train
        if dataset is None or len(dataset) == 0:
            raise UserError(
                f"--split {split}: the run's data has no {split} split (set "
                "data.val_fraction, or use --split train)"
            )
    if out is None:
        base = run.run_dir / "predictions" if run.run_dir else Path("predictions")
        tag = split
        if args.data:  # other data: a name of its own, never the run's own split's file
            import hashlib

            digest = hashlib.sha256("\n".join(args.data).encode()).hexdigest()[:8]
            tag = f"{split}-{run.cfg.data.type}-{digest}"
        out = base / f"{tag}-step_{run.step:08d}.jsonl"
    d = run.cfg.data
    batch_size = args.batch_size or d.eval_batch_size or d.batch_size
    options = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=run.cfg.seed,
    )
    result = predict(run, dataset, batch_size, strategy, options, device=device)
    if result is None:  # not the main process
        return 0
    names = list(run.data.info.class_names) or [
        str(i) for i in range(run.data.info.num_classes or 0)
    ]
    write(result, out, names, args.top_k)
    line = (
        f"wrote {out}: {len(result['id'])} rows ({split} split of {run.cfg.name}, step {run.step})"
        if split != "prompts"
        else f"wrote {out}: {len(result['id'])} rows"
    )
    if "probs" in result and "target" in result:
        acc = float((result["probs"].argmax(1) == result["target"]).mean())
        line += f"; accuracy {acc:.4f}"
    print(line)
    return 0
