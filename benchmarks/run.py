"""Regenerate benchmarks/RESULTS.md with one command:

    python -m benchmarks.run            # full: about an hour on 2 CPU cores
    python -m benchmarks.run --only inference --update     # predict and ONNX only
    python -m benchmarks.run --only sweep --update         # the sweep, pruned or not, 1-2 workers
    python -m benchmarks.run --only ssl,lm --update   # redo some sections, keep the others
    python -m benchmarks.run --only packing --update     # packed against padded fine-tuning
    python -m benchmarks.run --only datascale --update   # a site-packages corpus, ~20 min
    python -m benchmarks.run --only images --update      # 50,000 JPEGs and a ViT, ~25 min
    python -m benchmarks.run --only clusters --update    # SIGTERM to committed checkpoint
    python -m benchmarks.run --quick --out /tmp/RESULTS.md   # every benchmark at a tiny size

Every figure is reported as min / median / max over its repeats. Overhead runs alternate the
variants (A/B/A/B ...) so that drift of the machine hits each alike; ratios are taken per pair.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def stats(xs: list[float], fmt: str = "{:.3f}") -> str:
    if not xs:
        return "n/a"
    return " / ".join(fmt.format(v) for v in (min(xs), statistics.median(xs), max(xs)))


def _python(args: list[str], env_extra: dict | None = None) -> tuple[dict, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1]), wall


def bench_overhead(pairs: int, steps: int, quick: bool = False) -> dict:
    from benchmarks.overhead import OPTIONAL

    variants = (
        ["torch", "ours"]
        if quick
        else ["torch", "ours", "torch_fast"]
        + [v for v, pkg in OPTIONAL.items() if importlib.util.find_spec(pkg)]
    )
    results: dict = {}
    for model in ("mlp",) if quick else ("mlp", "cnn"):
        loop = {v: [] for v in variants}
        whole = {v: [] for v in variants}
        for i in range(pairs):
            order = variants if i % 2 == 0 else list(reversed(variants))
            for v in order:
                rec, wall = _python(
                    [
                        "-m",
                        "benchmarks.overhead",
                        "--variant",
                        v,
                        "--model",
                        model,
                        "--steps",
                        str(steps),
                    ]
                )
                loop[v].append(rec["loop_s"])
                whole[v].append(wall)
        results[model] = {"loop": loop, "whole": whole}
    return results


def bench_ddp(pairs: int, steps: int) -> dict:
    loop: dict[str, list[float]] = {"torch": [], "ours": []}
    for i in range(pairs):
        for v in ["torch", "ours"] if i % 2 == 0 else ["ours", "torch"]:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            args = [
                "-m",
                "torch.distributed.run",
                "--nproc_per_node=2",
                f"--master_port={port}",
                "-m",
                "benchmarks.ddp",
                "--variant",
                v,
                "--steps",
                str(steps),
            ]
            try:
                rec, _ = _python(args, {"OMP_NUM_THREADS": "1"})
            except RuntimeError as exc:  # a free port taken meanwhile: one more try, on another
                print(f"retrying once: {exc}", file=sys.stderr)
                args[3] = f"--master_port={port + 1}"
                rec, _ = _python(args, {"OMP_NUM_THREADS": "1"})
            loop[v].append(rec["loop_s"])
    return loop


def bench_inference(pairs: int, repeat: int, calls: int, quick: bool) -> dict:
    import tempfile

    from benchmarks import inference

    with tempfile.TemporaryDirectory() as root:
        run_dir = inference.prepare(root, quick)
        loop: dict = {"hand": [], "ours": []}
        whole: dict = {"hand": [], "ours": []}
        rows = 0
        for i in range(pairs):
            for v in ("hand", "ours") if i % 2 == 0 else ("ours", "hand"):
                rec, wall = _python(
                    [
                        "-m",
                        "benchmarks.inference",
                        "--variant",
                        v,
                        "--run",
                        run_dir,
                        "--repeat",
                        str(repeat),
                    ]
                )
                loop[v].append(rec["loop_s"])
                whole[v].append(wall)
                rows = rec["rows"]
        lat, _ = _python(
            ["-m", "benchmarks.inference", "--latency", "--run", run_dir, "--calls", str(calls)]
        )
    return {"loop": loop, "whole": whole, "rows": rows, "latency": lat}


def inference_section(res: dict, pairs: int) -> list[str]:
    loop, whole = res["loop"], res["whole"]
    body = [
        f"exp001's CNN (trained by `configs/exp001.yaml`), {res['rows']:,} samples (the "
        f"validation split repeated), batch 64, JSONL rows with the top 5 probabilities, "
        f"{pairs} alternating pairs of fresh processes. `hand` builds the same model, loads the "
        "same checkpoint and writes the same rows in a plain loop. Loop: first batch to file "
        "written; whole: the process's wall time (imports, config, data, checkpoint check "
        "included). Goal: predict's loop <= 1.05x the hand-written loop.",
        "",
        "| variant | loop s | x hand | whole s | x hand |",
        "|---|---|---|---|---|",
    ]
    for v in ("hand", "ours"):
        body.append(
            f"| {v} | {stats(loop[v])} | {stats(ratios(loop[v], loop['hand']))} | "
            f"{stats(whole[v])} | {stats(ratios(whole[v], whole['hand']))} |"
        )
    body += [
        "",
        "Latency per call of the same CNN, onnxruntime (CPU provider) against PyTorch "
        "eager in inference mode, default thread counts, median of blocks of 10 calls "
        "alternating between the two:",
        "",
        "| batch | onnxruntime ms | PyTorch ms | PyTorch / onnxruntime |",
        "|---|---|---|---|",
    ]
    for b, r in res["latency"].items():
        body.append(
            f"| {b} | {r['onnxruntime'] * 1e3:.3f} | {r['pytorch'] * 1e3:.3f} | "
            f"{r['pytorch'] / r['onnxruntime']:.2f} |"
        )
    return body


def ratios(a: list[float], b: list[float]) -> list[float]:
    return [x / y for x, y in zip(a, b)]


def versions() -> str:
    out = [f"python {platform.python_version()}"]
    for pkg in ("torch", "lightning", "transformers", "deepspeed", "timm"):
        if importlib.util.find_spec(pkg):
            from importlib.metadata import version

            try:
                out.append(f"{pkg} {version(pkg)}")
            except Exception:
                pass
    return ", ".join(out)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


BENCHMARKS = (
    "overhead",
    "startup",
    "checkpoint",
    "dataloader",
    "ddp",
    "inference",
    "sweep",
    "ssl",
    "lm",
    "grpo",
    "multimodal",
    "packing",
    "datascale",
    "images",
    "clusters",
    "lmspeed",
    "sslspeed",
)
KEPT = ("Faults",)  # sections written from the fault tests, not by a benchmark here


def write(path: Path, quick: bool, sections: dict) -> None:
    lines = [
        "# Benchmark results",
        "",
        f"Regenerate with `python -m benchmarks.run`{' --quick' if quick else ''}. "
        "Figures are min / median / max over the repeats.",
        "",
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"- machine: {cpu_name()}, {os.cpu_count()} cores, {platform.platform()}",
        f"- versions: {versions()}",
        f"- torch threads per process: {os.environ.get('BENCH_THREADS', '1')}",
        "",
    ]
    for title, body in sections.items():
        lines += [f"## {title}", "", *body, ""]
    path.write_text("\n".join(lines))


def previous_sections(path: Path) -> dict[str, list[str]]:
    """The ``## `` sections of an existing results file, by title."""
    out: dict[str, list[str]] = {}
    title = None
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            title = line[3:]
            out[title] = []
        elif title is not None:
            out[title].append(line)
    for body in out.values():  # write() adds one blank line around each body again
        while body and not body[-1].strip():
            body.pop()
        while body and not body[0].strip():
            body.pop(0)
    return out


def overhead_section(res: dict, pairs: int, steps: int) -> list[str]:
    body = [
        f"digits, batch 64, AdamW lr 1e-3, {steps} steps, fp32, CPU; {pairs} alternating "
        "runs of every variant. `torch`: a hand-written loop over a DataLoader of a "
        "TensorDataset (what people write); `torch_fast`: hand-written with batches gathered "
        "by tensor indexing (no DataLoader). Ratios are per pair, against `torch`. `loop s` of "
        "`ours` is the whole `run()`: the steps and the end-of-run files (curves.png, drawn "
        "with Pillow in about 0.05 s). Goals: loop <= 1.03x, whole process <= 1.10x (CNN "
        "loop <= 1.01x).",
        "",
    ]
    for model, r in res.items():
        body += [
            f"### {model.upper()}",
            "",
            "| variant | loop s | loop / torch | whole process s | whole / torch |",
            "|---|---|---|---|---|",
        ]
        for v in r["loop"]:
            body.append(
                f"| {v} | {stats(r['loop'][v])} | "
                f"{stats(ratios(r['loop'][v], r['loop']['torch']))} | "
                f"{stats(r['whole'][v])} | {stats(ratios(r['whole'][v], r['whole']['torch']))} |"
            )
        body.append("")
    return body


def bench_pairs(
    module: str,
    variants: list[tuple[str, list[str]]],
    cases: dict[str, list[str]],
    common: list[str],
    pairs: int,
    key: str,
) -> dict:
    """``key`` of each variant of each case, one process per run, variants alternating order."""
    out: dict = {}
    for case, args in cases.items():
        got = {v: [] for v, _ in variants}
        for i in range(pairs):
            for v, vargs in variants if i % 2 == 0 else list(reversed(variants)):
                rec, _ = _python(["-m", module, *vargs, *args, *common])
                got[v].append(rec[key])
        out[case] = got
    return out


def lm_speed_section(res: dict) -> list[str]:
    from benchmarks.lm_speed import SHAPES

    lines = [
        "Training tokens per second of a GPT, ours (`configs/lm_stdlib.yaml` as shipped, "
        "`trainer.compile: true` (on the CPU with ATen's random numbers for dropout, "
        "which are faster there than inductor's) and fused AdamW included, at the shape "
        "under test; "
        "`python -m benchmarks.lm_speed`) against a minimal hand-written nanoGPT-style loop "
        "of the same shape (fused QKV, `scaled_dot_product_attention`, tied embeddings, the "
        "same dropout 0.1, AdamW, clipping), eager as people write it, and the same peer "
        "with `torch.compile` (`--compile`). One process per run, alternating, steady state "
        "(the first 10 steps, compilation included, left out), default threads. "
        "Goal: ours / peer >= 1.05.",
        "",
        "| shape | peer tokens/s | ours tokens/s | ours / peer (per pair) "
        "| peer compiled tokens/s | ours / peer compiled (per pair) |",
        "|---|---|---|---|---|---|",
    ]
    for shape, got in res.items():
        s = SHAPES[shape]
        name = f"{shape}: {s['n_layer']} layers, {s['n_head']} heads, {s['n_embd']} wide"
        pc = got["peer compiled"]
        lines.append(
            f"| {name} | {stats(got['peer'], '{:,.0f}')} | "
            f"{stats(got['ours'], '{:,.0f}')} | {stats(ratios(got['ours'], got['peer']))}"
            f" | {stats(pc, '{:,.0f}')} | {stats(ratios(got['ours'], pc))} |"
        )
    return lines


def ssl_speed_section(res: dict) -> list[str]:
    lines = [
        "Training images per second of the shipped self-supervised configs with their "
        "per-sample views (torchvision, per image, in the loader) and with the same "
        "options made for the whole batch on its device (`batch_views`, "
        "`batch_multi_crop`), `python -m benchmarks.ssl_speed`, alternating, one process "
        "per run. Goal: batch / per-sample >= 3.",
        "",
        "| config | per-sample images/s | batch images/s | batch / per-sample (per pair) |",
        "|---|---|---|---|",
    ]
    for config, got in res.items():
        lines.append(
            f"| `{config}` | {stats(got['per-sample'], '{:,.0f}')} | "
            f"{stats(got['batch'], '{:,.0f}')} | "
            f"{stats(ratios(got['batch'], got['per-sample']))} |"
        )
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Regenerate benchmarks/RESULTS.md")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (for tests)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/RESULTS.md"))
    p.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated names")
    p.add_argument(
        "--update",
        action="store_true",
        help="keep the sections of the existing file that this run does not redo",
    )
    args = p.parse_args(argv)
    only = set(args.only.split(","))
    q = args.quick
    pairs, steps = (1, 20) if q else (5, 400)
    sections: dict[str, list[str]] = {}
    if Path(args.out).exists():  # the faults record comes from the tests: always kept
        previous = previous_sections(Path(args.out))
        sections.update(
            previous if args.update else {t: b for t, b in previous.items() if t in KEPT}
        )

    def done(title: str, body: list[str]) -> None:
        """Record a section and rewrite the file now, so a later failure loses nothing."""
        sections[title] = body
        write(Path(args.out), q, sections)

    if "overhead" in only:
        done("Loop overhead", overhead_section(bench_overhead(pairs, steps, q), pairs, steps))

    if "startup" in only:
        from benchmarks import startup

        res = startup.measure(1 if q else 5)
        done(
            "Start-up",
            [
                "Wall time of a fresh process, seconds. Goal: `--help` under 1 s.",
                "",
                "| command | s |",
                "|---|---|",
            ]
            + [f"| `python -m src.main {k}` | {stats(v)} |" for k, v in res.items()],
        )

    if "checkpoint" in only:
        from benchmarks import checkpoint

        res = checkpoint.measure(2 if q else 100, 1 if q else 3)
        n = res.pop("parameters_millions")[0]
        sync = statistics.median(res["ours save+commit"])
        blocked = statistics.median(res["async blocked"])
        done(
            "Checkpoint",
            [
                f"{n:.0f}M parameters in fp32 with AdamW state ({n * 12 / 1000:.2f} GB), same disk, "
                "files fsync'ed in both. `async blocked` is how long training waits with "
                "`checkpoint.async_save: true`: the save call, plus the wait before the next update "
                "for the background copy, which overlaps that step's forward and backward (goal: at "
                "most 10% of the synchronous save).",
                "",
                "| operation | s |",
                "|---|---|",
            ]
            + [f"| {k} | {stats(v)} |" for k, v in res.items()]
            + ["", f"Async save blocks for {100 * blocked / sync:.1f}% of the synchronous save."],
        )

    if "dataloader" in only:
        from benchmarks import dataloader

        res = dataloader.measure(20 if q else 300, 10 if q else 200, 20 if q else 300)
        train = res["exp001 training (samples/s)"]
        done(
            "Data loading",
            [
                "Samples per second delivered by each pipeline alone, against the samples per second "
                "the default classification config trains at (the loader must be faster).",
                "",
                "| pipeline | samples/s | x training rate |",
                "|---|---|---|",
            ]
            + [f"| {k} | {v:,.0f} | {v / train:.1f} |" for k, v in res.items()],
        )

    if "ddp" in only:
        res = bench_ddp(1 if q else 5, 20 if q else 400)
        done(
            "2-process DDP",
            [
                "gloo on CPU, MLP 64-256-256-10, global batch 64, loop seconds of rank 0. "
                "Goal: ours / hand-written <= 1.05.",
                "",
                "| variant | loop s |",
                "|---|---|",
                f"| hand-written DDP | {stats(res['torch'])} |",
                f"| ours | {stats(res['ours'])} |",
                f"| ratio | {stats(ratios(res['ours'], res['torch']))} |",
            ],
        )

    if "inference" in only:
        n = 1 if q else 5
        done(
            "Predict and ONNX",
            inference_section(bench_inference(n, 1 if q else 40, 20 if q else 1000, q), n),
        )

    if "sweep" in only:
        from benchmarks import sweep

        done("Sweeps", sweep.section(sweep.measure(q)))

    if "ssl" in only:
        from benchmarks import ssl

        runs = (
            [("cnn", "simclr"), ("vit", "simclr")]
            if q
            else [(b, m) for b, methods in ssl.BACKBONES.items() for m in methods]
        )
        tiny = ["trainer.max_steps=2", "trainer.max_epochs=null", "callbacks=[]"] if q else []
        results = [ssl.run_method(m, tiny, b) for b, m in runs]
        done(
            "Self-supervised and metric learning on digits",
            ssl.section(results, ssl.run_arcface(tiny)),
        )

    if "grpo" in only:
        from benchmarks import grpo_arith

        done("GRPO on arithmetic", grpo_arith.section(grpo_arith.measure(q)))

    if "multimodal" in only:
        from benchmarks import multimodal

        done("Multimodal on digits", multimodal.section(multimodal.measure(q)))

    if "packing" in only:
        from benchmarks import packing

        done("Packing for fine-tuning", packing.section(packing.measure(1 if q else 3, q)))

    if "datascale" in only:
        from benchmarks import data_scale

        done("Data at scale, text", data_scale.section(data_scale.measure(None, 1 if q else 2, q)))

    if "images" in only:
        import tempfile

        from benchmarks import images

        res = images.measure(quick=q)
        work = Path(tempfile.gettempdir()) / f"tessera-bench-images-{res['images']}"
        aug = images.measure_augment(
            work / "jpegs", work, *((200, 4, 100) if q else (1000, 2000, 2000))
        )
        done("Images at scale", images.section(res) + [""] + images.augment_section(aug))

    if "clusters" in only:
        from benchmarks import clusters

        done("Clusters", clusters.section(clusters.measure(1 if q else 3, q)))

    if q:  # the throughput sections only mean something at full size (tests call their parts)
        only -= {"lmspeed", "sslspeed"}

    if "lmspeed" in only:
        done(
            "Language-model training throughput",
            lm_speed_section(
                bench_pairs(
                    "benchmarks.lm_speed",
                    [
                        ("peer", ["--variant", "peer"]),
                        ("ours", ["--variant", "ours"]),
                        ("peer compiled", ["--variant", "peer", "--compile"]),
                    ],
                    {"base": ["--shape", "base"], "4x": ["--shape", "4x"]},
                    ["--steps", "60"],
                    5,
                    "tokens_per_sec",
                )
            ),
        )

    if "sslspeed" in only:
        done(
            "Self-supervised views throughput",
            ssl_speed_section(
                bench_pairs(
                    "benchmarks.ssl_speed",
                    [("per-sample", ["--views", "sample"]), ("batch", ["--views", "batch"])],
                    {
                        "ssl_simclr_digits": ["--config", "ssl_simclr_digits"],
                        "ssl_dino_digits": ["--config", "ssl_dino_digits"],
                    },
                    ["--steps", "30"],
                    5,
                    "images_per_sec",
                )
            ),
        )

    if "lm" in only:
        from benchmarks import lm

        done("Language models on the standard library", lm.section(lm.measure(q)))

    write(Path(args.out), q, sections)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
