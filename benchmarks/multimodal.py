"""Multimodal on digits: CLIP (configs/clip_digits.yaml) and the two-stage vision-language model
(configs/vlm_digits_stage1.yaml, then configs/vlm_digits.yaml), each against its untrained start.

The VLM reads the GPT that configs/lm_stdlib.yaml trains (made here, or given: ``python -m
benchmarks.multimodal <exported lm_stdlib hf folder>``) and the image tower of the CLIP run.

    python -m benchmarks.run --only multimodal --update
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
CLIP_KEYS = (
    "val/zeroshot_top1",
    "val/i2t_recall@1",
    "val/t2i_recall@1",
    "val/i2t_recall@5",
    "val/t2i_recall@5",
)
KINDS = ("digit", "even", "plus_one")


def experiment(config: str, overrides: list[str]):
    from src.run.api import Experiment

    return Experiment.from_yaml(ROOT / config, overrides)


def train(exp) -> tuple[dict, float]:
    """(the last validation row, minutes of the run)."""
    t0 = time.perf_counter()
    exp.fit()
    minutes = (time.perf_counter() - t0) / 60
    rows = [json.loads(x) for x in (exp.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "val/loss" in r][-1], minutes


def measure(quick: bool = False, lm_folder: Optional[str] = None) -> dict:
    root = tempfile.mkdtemp(prefix="multimodal_")
    common = [f"logging.root={root}", "logging.loggers=[jsonl]"]
    short = ["trainer.max_steps=3", "trainer.eval_every_n_steps=3", "data.val_fraction=0.02"]
    short = short if quick else []
    out: dict = {}

    clip = experiment("configs/clip_digits.yaml", common + short)
    out["clip_random"] = clip.evaluate()  # a fresh run folder: the untrained towers
    out["clip"], out["clip_minutes"] = train(clip)
    out["clip_steps"], out["clip_val"] = clip.derived["total_steps"], len(clip.data.val)

    if lm_folder is None:
        from benchmarks.lm import run_lm_stdlib

        lm = run_lm_stdlib(root, quick)
        lm_folder, out["lm_minutes"] = lm["hf"], lm["minutes"]
    vlm_ov = (
        common
        + short
        + [
            "needs={}",
            f"data.tokenizer={lm_folder}",
            f"task.lm.path={lm_folder}",
            f"task.vision_init={clip.run_dir}",
        ]
    )
    one = experiment("configs/vlm_digits_stage1.yaml", vlm_ov)
    out["vlm_random"] = one.evaluate()  # the untrained projector before the GPT
    out["stage1"], out["stage1_minutes"] = train(one)
    two = experiment("configs/vlm_digits.yaml", vlm_ov + [f"task.init={one.run_dir}"])
    out["stage2"], out["stage2_minutes"] = train(two)
    # control: stage 2 alone, its projector untrained (what stage 1 adds)
    alone = experiment(
        "configs/vlm_digits.yaml", vlm_ov + ["name=vlm_digits_alone", "task.init=null"]
    )
    out["alone"], out["alone_minutes"] = train(alone)
    out["vlm_steps"] = (one.derived["total_steps"], two.derived["total_steps"])
    out["vlm_val"] = len(two.data.val)
    return out


def section(r: dict) -> list[str]:
    def clip_row(name: str, m: dict, minutes: str) -> str:
        return f"| {name} | " + " | ".join(f"{m[k]:.3f}" for k in CLIP_KEYS) + f" | {minutes} |"

    def vlm_row(name: str, m: dict, minutes: str) -> str:
        return (
            f"| {name} | "
            + " | ".join(f"{m[f'val/exact_match/{k}']:.3f}" for k in KINDS)
            + f" | {m['val/exact_match']:.3f} | {minutes} |"
        )

    gain = r["stage2"]["val/exact_match/digit"] - r["alone"]["val/exact_match/digit"]
    verdict = (
        f"Stage 1 adds nothing measurable here: stage 2 from an untrained projector gets "
        f"{r['alone']['val/exact_match/digit']:.3f} on the digit question in as many steps "
        "(the projector and LoRA learn together on a task this small)."
        if abs(gain) < 0.01
        else f"Stage 1 changes stage 2's digit accuracy by {100 * gain:+.1f} points against "
        "stage 2 from an untrained projector."
    )
    s1, s2 = r["vlm_steps"]
    lm = f" (the GPT itself: {r['lm_minutes']:.1f} min)" if "lm_minutes" in r else ""
    return [
        "CLIP (`configs/clip_digits.yaml`): the default CNN as image tower, the packaged MiniLM "
        f"locked as text tower (LiT), {r['clip_steps']} steps of 256 (image, caption) pairs. "
        f"Metrics on the {r['clip_val']} validation images, captioned with templates never "
        'trained on ("a picture of a seven", "the handwritten digit 7", ...): zero-shot '
        "top-1 from class-name prompts made of those templates, and Recall@k over the distinct "
        "validation captions (image -> text: one of its captions is among the k nearest). "
        "`python -m benchmarks.run --only multimodal --update`.",
        "",
        "| CLIP | zero-shot top-1 | i2t R@1 | t2i R@1 | i2t R@5 | t2i R@5 | minutes |",
        "|---|---|---|---|---|---|---|",
        clip_row("random init", r["clip_random"], "-"),
        clip_row("trained", r["clip"], f"{r['clip_minutes']:.1f}"),
        "",
        "Vision-language model: the CLIP run's image tower (frozen) -> an MLP projector -> 16 "
        "token embeddings before the GPT of `configs/lm_stdlib.yaml`" + lm + ". Stage 1 "
        f"(`configs/vlm_digits_stage1.yaml`, {s1} steps): the projector alone, the GPT frozen. "
        f"Stage 2 (`configs/vlm_digits.yaml`, {s2} steps): from stage 1's projector, with LoRA "
        f"on the GPT. Exact-match accuracy of greedy answers to the {r['vlm_val']} validation "
        'questions (3 per image: "What digit is this?" -> "seven", "Is this digit '
        'even?" -> "no", "What is this digit plus one?" -> "eight").',
        "",
        "| VLM | digit | even | plus one | all | minutes |",
        "|---|---|---|---|---|---|",
        vlm_row("untrained projector", r["vlm_random"], "-"),
        vlm_row("stage 1 (projector)", r["stage1"], f"{r['stage1_minutes']:.1f}"),
        vlm_row("stage 2 (+ LoRA)", r["stage2"], f"{r['stage2_minutes']:.1f}"),
        vlm_row("stage 2 alone (no stage 1)", r["alone"], f"{r['alone_minutes']:.1f}"),
        "",
        verdict,
    ]


if __name__ == "__main__":  # python -m benchmarks.multimodal [lm_stdlib hf folder]
    result = measure(lm_folder=sys.argv[1] if len(sys.argv) > 1 else None)
    print("\n".join(section(result)))
