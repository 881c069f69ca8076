"""GRPO on arithmetic: a small GPT learns ``a+b=`` by supervised fine-tuning
(configs/arith_sft.yaml), then GRPO with an exact-answer reward (configs/grpo_arith.yaml).
Held-out accuracy: greedy answers to the 500 problems no config trains on, before GRPO (the
supervised model), every 50 GRPO steps, and of a model with random weights.

    python -m benchmarks.run --only grpo --update
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def build(config: str, overrides: list[str]):
    from src.run.experiment import build as build_exp
    from src.run.experiment import prepare

    cfg, origins = prepare(str(ROOT / config), overrides)
    return build_exp(cfg, origins)


@torch.no_grad()
def accuracy(exp) -> float:
    """Greedy exact-answer accuracy of the run's model on its validation problems, now."""
    task, hits, n = exp.task, 0.0, 0
    task.eval()
    for batch, _ in exp.val_loader:
        out = task(batch, stage="val")
        hits += float(out["reward/exact_answer"]) * len(batch["input_ids"])
        n += len(batch["input_ids"])
    task.train()
    return hits / n


def measure(quick: bool = False) -> dict:
    from src.run.export import main as export_main

    root = tempfile.mkdtemp(prefix="grpo_arith_")
    common = [f"logging.root={root}", "logging.loggers=[jsonl]"]
    sft_ov = common + (["trainer.max_steps=4", "trainer.eval_every_n_steps=4"] if quick else [])
    sft = build("configs/arith_sft.yaml", sft_ov)
    t0 = time.perf_counter()
    sft.run()
    sft_minutes = (time.perf_counter() - t0) / 60
    hf = Path(root) / "arith_sft_hf"
    export_main(["--run", str(sft.run_dir), "--format", "hf", "--out", str(hf)])
    grpo_ov = common + ["needs={}", f"data.tokenizer={hf}", f"model.path={hf}"]
    if quick:
        grpo_ov += [
            "trainer.max_steps=2",
            "trainer.eval_every_n_steps=2",
            "trainer.log_every=1",
            "data.batch_size=4",
        ]
    grpo = build("configs/grpo_arith.yaml", grpo_ov)
    before = accuracy(grpo)
    t0 = time.perf_counter()
    grpo.run()
    minutes = (time.perf_counter() - t0) / 60
    rows = [json.loads(line) for line in (grpo.run_dir / "metrics.jsonl").open()]
    curve = [
        (r["step"], r["val/reward/exact_answer"]) for r in rows if "val/reward/exact_answer" in r
    ]
    train = [r for r in rows if "train/reward" in r]
    # control: the supervised run 200 steps longer instead of GRPO (more of the same data)
    steps = sft.derived["total_steps"] + (0 if quick else 200)
    longer = build(
        "configs/arith_sft.yaml", sft_ov + ["name=arith_sft_longer", f"trainer.max_steps={steps}"]
    )
    longer.run()
    longer_grpo = build("configs/grpo_arith.yaml", grpo_ov + ["name=grpo_longer"])
    longer_grpo.task.model.load_state_dict(longer.task.model.state_dict())
    # the same GPT with random weights (the supervised config's model section, not trained)
    rand = build("configs/arith_sft.yaml", common + ["name=arith_random", "trainer.max_steps=1"])
    rand_grpo = build("configs/grpo_arith.yaml", grpo_ov + ["name=grpo_random"])
    rand_grpo.task.model.load_state_dict(rand.task.model.state_dict())
    return {
        "before": before,
        "curve": curve,
        "sft_minutes": sft_minutes,
        "minutes": minutes,
        "random": accuracy(rand_grpo),
        "val": len(grpo.data.val),
        "longer": accuracy(longer_grpo),
        "longer_steps": longer.derived["total_steps"],
        "train_reward_first": train[0]["train/reward"],
        "train_reward_last": train[-1]["train/reward"],
        "zero_std_first": train[0]["train/frac_reward_zero_std"],
        "zero_std_last": train[-1]["train/frac_reward_zero_std"],
        "steps": grpo.derived["total_steps"],
        "sft_steps": sft.derived["total_steps"],
    }


def section(r: dict) -> list[str]:
    after = r["curve"][-1][1]
    curve = ", ".join(f"{acc:.3f} (step {s})" for s, acc in r["curve"])
    return [
        "A 2-layer GPT (128 wide, one token per character) learns to add two numbers below 100: "
        f"supervised fine-tuning on 2,000 worked problems (`configs/arith_sft.yaml`, "
        f"{r['sft_steps']} steps, {r['sft_minutes']:.1f} min), then GRPO "
        f"(`configs/grpo_arith.yaml`: 64 problems x G = 8 sampled answers a step, reward 1 for "
        f"the exact answer, {r['steps']} steps). Accuracy: greedy answers to {r['val']} "
        "held-out problems (the same for both configs). "
        "`python -m benchmarks.run --only grpo --update`.",
        "",
        "| random weights | after supervised (GRPO before) | GRPO after | change | GRPO minutes "
        "| supervised for as many more steps instead |",
        "|---|---|---|---|---|---|",
        f"| {r['random']:.3f} | {r['before']:.3f} | {after:.3f} | "
        f"{100 * (after - r['before']):+.1f} points | {r['minutes']:.1f} | {r['longer']:.3f} "
        f"({r['longer_steps']} steps) |",
        "",
        f"Held-out accuracy during GRPO: {curve}. Mean reward of the sampled answers "
        f"(temperature 1): {r['train_reward_first']:.3f} in the first logged interval, "
        f"{r['train_reward_last']:.3f} in the last; groups whose 8 answers all scored alike "
        f"(no gradient): {r['zero_std_first']:.0%} -> {r['zero_std_last']:.0%}.",
    ]
