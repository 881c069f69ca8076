"""Images at scale: the training data path on a folder of JPEGs, from the folder, from tar shards
and from the decode cache, against a hand-written torchvision ``ImageFolder`` + ``DataLoader``
with the same workers and transforms; and the data time of a start (cold, and resumed).

The folder: N JPEGs (96x96, quality 90, 10 classes) made from scikit-learn's digits with colour,
scale and noise, written once under the benchmark's work folder. Each variant is a fresh process
(as a user runs), alternating pairs; a variant reads ``--batches`` batches of 256 images resized
to 32x32 with 2 loader workers, from the loader's start to its last batch.

    python -m benchmarks.images [--images 50000] [--pairs 2]   # prints the section
    python -m benchmarks.run --only images --update             # into RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BATCH, WORKERS, SIZE = 256, 2, 32
VARIANTS = ("torchvision", "image_folder", "shards", "decode_cache")


def make_folder(root: Path, n: int, side: int = 96) -> None:
    """n JPEGs in root/<digit>/: each a digit upscaled, tinted, placed and noised."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(0)
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for c in range(10):
        (tmp / str(c)).mkdir(parents=True)
    for i in range(n):
        k = int(rng.integers(len(d.images)))
        digit = Image.fromarray((d.images[k] * 15).astype(np.uint8))
        s = int(rng.integers(side // 2, side))
        glyph = np.asarray(digit.resize((s, s), Image.Resampling.BILINEAR), dtype=np.float32) / 240
        canvas = np.zeros((side, side), np.float32)
        y, x = rng.integers(0, side - s + 1, 2)
        canvas[y : y + s, x : x + s] = glyph
        fg, bg = rng.uniform(0.4, 1.0, 3), rng.uniform(0.0, 0.4, 3)
        img = canvas[..., None] * fg + (1 - canvas[..., None]) * bg
        img = np.clip(img + rng.normal(0, 0.06, img.shape), 0, 1)
        Image.fromarray((img * 255).astype(np.uint8)).save(
            tmp / str(d.target[k]) / f"{i:06d}.jpg", quality=90
        )
    os.rename(tmp, root)


def _loader(variant: str, folder: Path, shards: Path):
    """(the training data path's iterable of batches, seconds to build the data) of a variant."""
    import PIL.Image  # noqa: F401  (imports are not the data's time)
    import torch
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    import src.data  # noqa: F401

    t0 = time.perf_counter()
    if variant == "torchvision":
        tf = v2.Compose(
            [
                v2.ToImage(),
                v2.RGB(),
                v2.Resize((SIZE, SIZE), antialias=True),
                v2.ToDtype(torch.float32, scale=True),
            ]
        )
        ds = ImageFolder(str(folder), transform=tf)
        data_s = time.perf_counter() - t0
        loader = torch.utils.data.DataLoader(
            ds, batch_size=BATCH, shuffle=True, num_workers=WORKERS, drop_last=True
        )
        return loader, data_s
    from src.core.registry import DATASETS
    from src.data.loader import TrainLoader
    from src.data.samplers import ShardedBatchSampler

    section = {"type": "image_folder", "root": str(folder), "image_size": SIZE}
    if variant == "shards":
        section = {"type": "shards", "paths": str(shards), "image_size": SIZE}
    if variant == "decode_cache":
        section["decode_cache"] = True
    section["val_fraction"] = 0.0
    dm = DATASETS.build(section, "data", seed=0)
    data_s = time.perf_counter() - t0
    loader = TrainLoader(
        dm.train, ShardedBatchSampler(len(dm.train), BATCH, seed=0), seed=0, num_workers=WORKERS
    )
    loader.set_epoch(0)
    return loader, data_s


def one(variant: str, folder: Path, shards: Path, batches: int) -> dict:
    loader, data_s = _loader(variant, folder, shards)
    t0 = time.perf_counter()
    n = epoch = 0
    while n < batches:  # epochs again if one holds fewer batches (a small folder)
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for _ in loader:
            n += 1
            if n == batches:
                break
        epoch += 1
    seconds = time.perf_counter() - t0
    return {"images_per_s": batches * BATCH / seconds, "data_s": data_s}


def _run(args: list[str], cache: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TESSERA_CACHE": str(cache)}
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.images", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"benchmarks.images {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(
    images: int = 50_000, pairs: int = 2, quick: bool = False, work: str | None = None
) -> dict:
    if quick:
        images, pairs = 600, 1
    base = Path(work or tempfile.gettempdir()) / f"tessera-bench-images-{images}"
    folder, shards, cache = base / "jpegs", base / "shards", base / "cache"
    t0 = time.perf_counter()
    if not folder.is_dir():
        make_folder(folder, images)
    made = time.perf_counter() - t0
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(shards, ignore_errors=True)
    # pack checks the images with a cache of its own, so the runs' first start is a cold one
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TESSERA_CACHE": str(base / "pack-cache")}
    shutil.rmtree(base / "pack-cache", ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "src.main", "pack", "--from", str(folder), "--out", str(shards)],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    pack_s = time.perf_counter() - t0
    batches = 3 if quick else 100
    common = ["--folder", str(folder), "--shards", str(shards), "--batches", str(batches)]
    # the first start of each (an empty cache for the listing, indexes and decoded array)
    cold = {v: _run(["--variant", v, *common, "--batches", "1"], cache) for v in VARIANTS}
    res: dict = {v: [] for v in VARIANTS}
    for i in range(pairs):
        for v in VARIANTS if i % 2 == 0 else tuple(reversed(VARIANTS)):
            res[v].append(_run(["--variant", v, *common], cache))
    return {
        "images": images,
        "made_s": made,
        "pack_s": pack_s,
        "shard_bytes": sum(f.stat().st_size for f in shards.glob("*.tar")),
        "shards": len(list(shards.glob("*.tar"))),
        "batches": batches,
        "cold": cold,
        "runs": res,
    }


# random resized crops and colour jitter (timm's defaults), no flips: digits are not symmetric
AUGMENT = {"crop_scale": [0.5, 1.0], "hflip": 0.0}


def measure_augment(
    folder: Path, work: Path, train: int, steps: int, val: int = 2000, only=("none", "timm")
) -> dict:
    """A small timm ViT trained from scratch on ``train`` JPEGs of the folder, held-out accuracy
    on 2,000 others: with timm augmentation (random resized crop, RandAugment) and without."""
    import yaml

    files = sorted(folder.glob("*/*.jpg"))
    order = np.random.default_rng(1).permutation(len(files))
    subsets = {"train": order[:train], "val": order[train : train + val]}
    for name, idx in subsets.items():
        root = work / f"vit_{name}"
        shutil.rmtree(root, ignore_errors=True)
        for i in idx:
            f = files[i]
            (root / f.parent.name).mkdir(parents=True, exist_ok=True)
            os.symlink(f, root / f.parent.name / f.name)
    out = {}
    for label, augment in (("none", "none"), ("timm", AUGMENT)):
        if label not in only:
            continue
        cfg = {
            "name": f"vit_{label}",
            "seed": 0,
            "data": {
                "type": "image_folder",
                "root": str(work / "vit_train"),
                "val_root": str(work / "vit_val"),
                "image_size": SIZE,
                "augment": augment,
                "batch_size": 64,
                "num_workers": WORKERS,
            },
            "model": {
                "type": "timm",
                "name": "vit_tiny_patch16_224",
                "img_size": SIZE,
                "patch_size": 8,
                "depth": 6,
            },
            "task": {"type": "classification"},
            "optimizer": {"type": "adamw", "lr": 1e-3, "weight_decay": 0.05},
            "scheduler": {"type": "warmup_cosine", "warmup_steps": steps // 20},
            "trainer": {
                "max_steps": steps,
                "eval_every_n_epochs": None,
                "eval_every_n_steps": steps,
                "log_every": 50,
                "grad_clip": 1.0,
            },
            "checkpoint": {"every_n_steps": steps},
            "logging": {"root": str(work / "runs"), "loggers": ["jsonl"]},
        }
        shutil.rmtree(work / "runs" / cfg["name"], ignore_errors=True)
        path = work / f"vit_{label}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "src.main", "--config", str(path)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), "TESSERA_CACHE": str(work / "cache")},
            check=True,
            capture_output=True,
        )
        rows = [json.loads(x) for x in (work / "runs" / cfg["name"] / "metrics.jsonl").open()]
        acc = [r["val/accuracy"] for r in rows if "val/accuracy" in r][-1]
        train_acc = [r["train/accuracy"] for r in rows if "train/accuracy" in r][-1]
        out[label] = {
            "val_accuracy": acc,
            "train_accuracy": train_acc,
            "seconds": time.perf_counter() - t0,
        }
    return {"train": train, "val": val, "steps": steps, **out}


def augment_section(res: dict) -> list[str]:
    return [
        f"Augmentation: timm's ViT-Tiny (depth 6, patch 8, {SIZE}x{SIZE}) trained from scratch on "
        f"{res['train']:,} of the JPEGs for {res['steps']} steps of 64, evaluated on {res['val']:,} others "
        f"(`val_root`); `augment: {json.dumps(AUGMENT)}` against `augment: none`.",
        "",
        "| augment | held-out accuracy | last logged train accuracy | s |",
        "|---|---|---|---|",
        *(
            f"| {k} | {r['val_accuracy']:.4f} | {r['train_accuracy']:.4f} | {r['seconds']:.0f} |"
            for k, r in ((k, res[k]) for k in ("none", "timm"))
        ),
    ]


def section(res: dict) -> list[str]:
    def med(v: str, key: str) -> float:
        return statistics.median(r[key] for r in res["runs"][v])

    peer = med("torchvision", "images_per_s")
    rows = [
        "| data path | images/s | x torchvision | data time, first start (s) | resumed start (s) |",
        "|---|---|---|---|---|",
    ]
    names = {
        "torchvision": "hand-written `ImageFolder` + `DataLoader`",
        "image_folder": "`image_folder`",
        "shards": "`shards` (packed by `pack`)",
        "decode_cache": "`image_folder` with `decode_cache: true`",
    }
    for v in VARIANTS:
        rate = med(v, "images_per_s")
        rows.append(
            f"| {names[v]} | {rate:,.0f} | {rate / peer:.2f} | {res['cold'][v]['data_s']:.1f} | "
            f"{med(v, 'data_s'):.2f} |"
        )
    per_pair = {
        v: [
            r["images_per_s"] / p["images_per_s"]
            for r, p in zip(res["runs"][v], res["runs"]["torchvision"])
        ]
        for v in VARIANTS[1:]
    }
    return [
        f"{res['images']:,} JPEGs (96x96, 10 classes, digits with colour, scale and noise); every "
        f"variant reads {res['batches']} batches of {BATCH} resized to {SIZE}x{SIZE} in [0, 1] with "
        f"{WORKERS} loader workers, a fresh process each, alternating, median of the pairs. The data "
        "time is building the dataset (listing, checking, indexing, decoding) before the loader "
        "starts: at the first start (empty cache; the torchvision peer checks nothing) and at "
        "every later one, as a resumed run starts. Goals: >= 1.0x the peer from the folder and "
        "from shards, >= 3x with the decode cache, a resumed start's data time <= 2 s.",
        "",
        *rows,
        "",
        "Per pair, x torchvision: "
        + "; ".join(f"{v} " + " / ".join(f"{x:.2f}" for x in xs) for v, xs in per_pair.items())
        + ".",
        f"`pack` wrote {res['shards']} shard{'s' * (res['shards'] != 1)}, "
        f"{res['shard_bytes'] / 1e6:,.0f} MB, in "
        f"{res['pack_s']:.0f} s (checking every image first).",
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", choices=VARIANTS)
    p.add_argument("--folder")
    p.add_argument("--shards")
    p.add_argument("--batches", type=int, default=100)
    p.add_argument("--images", type=int, default=50_000)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--work", help="where the JPEG folder, shards and cache are kept")
    p.add_argument("--augment", action="store_true", help="only the augmentation comparison")
    p.add_argument("--steps", type=int, default=2000, help="training steps of each ViT run")
    p.add_argument("--train", type=int, default=1000, help="training images of the ViT runs")
    p.add_argument("--only", default="none,timm", help="augment variants to run (none,timm)")
    args = p.parse_args(argv)
    if args.augment:
        work = Path(args.work or tempfile.gettempdir()) / f"tessera-bench-images-{args.images}"
        if not (work / "jpegs").is_dir():
            make_folder(work / "jpegs", args.images)
        print(
            "\n".join(
                augment_section(
                    measure_augment(
                        work / "jpegs", work, args.train, args.steps, only=args.only.split(",")
                    )
                )
            )
        )
        return 0
    if args.variant:
        print(json.dumps(one(args.variant, Path(args.folder), Path(args.shards), args.batches)))
        return 0
    print("\n".join(section(measure(args.images, args.pairs, work=args.work))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
