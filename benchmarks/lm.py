"""Language models on real text nobody here wrote: the Python standard library's own source.

- lm_stdlib: a small GPT trained from scratch (configs/lm_stdlib.yaml, at most 10 minutes on the
  CPU); its validation bits per byte next to ``xz -9e`` on each held-out file.
- LoRA (and QLoRA when bitsandbytes is installed) on the ``email`` package, starting from that
  GPT: held-out perplexity of the package before and after.
- LoRA on the packaged MiniLM: which package a docstring comes from (configs/minilm_docstrings.yaml).
- DPO on docstring pairs (configs/dpo_docstrings.yaml): preference accuracy before and after.
- PPO with a reward function (configs/ppo_docstrings.yaml): the reward over training.
"""

from __future__ import annotations

import importlib.util
import json
import lzma
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def xz_bits_per_byte(path: Path) -> tuple[float, int]:
    data = path.read_bytes()
    packed = lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)
    return 8 * len(packed) / max(len(data), 1), len(data)


@torch.no_grad()
def evaluate(exp) -> dict[str, float]:
    """The task's validation metrics for the weights it has now (no training)."""
    task = exp.task
    task.eval()
    for batch, _ in exp.val_loader:
        task(batch, stage="val")
    out = task.validation_epoch_end(lambda t: t)
    task.train()
    return {k: float(v) for k, v in out.items()}


def last_val(run_dir: Path, key: str) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    return [r for r in rows if key in r][-1]


def build(config: str, overrides: list[str]):
    from src.run.experiment import build as build_exp
    from src.run.experiment import prepare

    cfg, origins = prepare(str(ROOT / config), overrides)
    return build_exp(cfg, origins)


def run_lm_stdlib(root: str, quick: bool) -> dict:
    from src.run.export import export_hf

    ov = [f"logging.root={root}", "logging.loggers=[jsonl]"]
    if quick:
        # compilation has its own tests (tests/algorithms/test_causal_lm.py)
        ov += ["trainer.max_steps=3", "trainer.eval_every_n_steps=3", "data.max_files=20"]
        ov += ["trainer.compile=false"]
    exp = build("configs/lm_stdlib.yaml", ov)
    t0 = time.perf_counter()
    exp.run()
    minutes = (time.perf_counter() - t0) / 60
    run_dir = exp.run_dir
    val = last_val(run_dir, "val/bpb")
    files = [Path(f) for f in exp.data.info.extra["val_files"]]
    per_file = [xz_bits_per_byte(f) for f in files]
    xz_total = sum(b * n for b, n in per_file) / sum(n for _, n in per_file)
    step = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    export_hf(str(ROOT / "configs/lm_stdlib.yaml"), ov, step, Path(root) / "lm_stdlib_hf")
    return {
        "bpb": val["val/bpb"],
        "perplexity": val["val/perplexity"],
        "minutes": minutes,
        "steps": exp.derived["total_steps"],
        "files": len(files),
        "xz_total": xz_total,
        "xz_files": [b for b, _ in per_file],
        "hf": str(Path(root) / "lm_stdlib_hf"),
    }


def run_adapter(root: str, base: str, adapter: str, quick: bool) -> dict:
    ov = [
        f"logging.root={root}",
        "logging.loggers=[jsonl]",
        f"model.path={base}",
        f"data.tokenizer={base}",
        f"name=lm_email_{adapter}",
        f"model.adapter.type={adapter}",
    ]
    if quick:
        ov += ["trainer.max_steps=2", "trainer.eval_every_n_steps=2", "data.max_files=10"]
    if adapter == "qlora":
        # bitsandbytes' CPU kernels repack 4-bit weights for inference on the first eval pass,
        # and training after that fails: evaluate a separate instance, and only at the end
        ov += ["trainer.eval_every_n_steps=2" if quick else "trainer.eval_every_n_steps=200"]
    before = evaluate(build("configs/lora_email.yaml", ov))
    exp = build("configs/lora_email.yaml", ov)
    t0 = time.perf_counter()
    exp.run()
    after = last_val(exp.run_dir, "val/perplexity")
    return {
        "adapter": adapter,
        "ppl_before": before["perplexity"],
        "ppl_after": after["val/perplexity"],
        "trainable": exp.derived["trainable_parameters"],
        "total": exp.derived["model_parameters"],
        "minutes": (time.perf_counter() - t0) / 60,
    }


def run_minilm(root: str, quick: bool) -> dict:
    ov = [f"logging.root={root}", "logging.loggers=[jsonl]"]
    if quick:
        ov += ["trainer.max_steps=2", "trainer.max_epochs=null", "trainer.eval_every_n_steps=2"]
        ov += ["data.packages=[json,http]", "data.max_length=32"]
    exp = build("configs/minilm_docstrings.yaml", ov)
    t0 = time.perf_counter()
    exp.run()
    val = last_val(exp.run_dir, "val/accuracy")
    return {
        "accuracy": val["val/accuracy"],
        "chance": 1 / exp.data.info.num_classes,
        "classes": exp.data.info.num_classes,
        "val": len(exp.data.val),
        "trainable": exp.derived["trainable_parameters"],
        "total": exp.derived["model_parameters"],
        "minutes": (time.perf_counter() - t0) / 60,
    }


def run_dpo(root: str, base: str, quick: bool) -> dict:
    ov = [
        f"logging.root={root}",
        "logging.loggers=[jsonl]",
        f"model.path={base}",
        f"data.tokenizer={base}",
        f"data.path={Path(root) / 'pairs.jsonl'}",
    ]
    if quick:
        ov += ["trainer.max_steps=2", "trainer.eval_every_n_steps=2"]
    exp = build("configs/dpo_docstrings.yaml", ov)
    before = evaluate_dpo(exp)
    t0 = time.perf_counter()
    exp.run()
    after = last_val(exp.run_dir, "val/chosen_preferred")
    return {
        "before": before,
        "after": after["val/chosen_preferred"],
        "reward_accuracy": after["val/preference_accuracy"],
        "margin": after["val/reward_margin"],
        "minutes": (time.perf_counter() - t0) / 60,
        "pairs": len(exp.data.train) + len(exp.data.val),
        "val": len(exp.data.val),
    }


def run_ppo(root: str, base: str, quick: bool) -> dict:
    ov = [
        f"logging.root={root}",
        "logging.loggers=[jsonl]",
        f"model.path={base}",
        f"data.tokenizer={base}",
    ]
    if quick:
        ov += ["trainer.max_steps=2", "trainer.eval_every_n_steps=2", "trainer.log_every=1"]
    exp = build("configs/ppo_docstrings.yaml", ov)
    t0 = time.perf_counter()
    exp.run()
    rows = [json.loads(line) for line in (exp.run_dir / "metrics.jsonl").open()]
    train = [r for r in rows if "train/reward" in r]
    val = [r for r in rows if "val/reward" in r]
    task = exp.cfg.task
    return {
        "first": train[0]["train/reward"],
        "last": train[-1]["train/reward"],
        "kl": train[-1]["train/kl"],
        "val_reward": val[-1]["val/reward"],
        "val_kl": val[-1]["val/kl"],
        "kl_start": task.get("kl_coef", 0.05),
        "kl_target": task.get("kl_target"),
        "ppo_epochs": task.get("ppo_epochs", 2),
        "batch_size": exp.cfg.data.batch_size,
        "kl_coef": train[-1]["train/kl_coef"],
        "steps": exp.derived["total_steps"],
        "minutes": (time.perf_counter() - t0) / 60,
    }


@torch.no_grad()
def evaluate_dpo(exp) -> float:
    """Held-out pairs where the policy (adapter on, eval mode as the trainer evaluates: no
    dropout) gives the chosen answer the higher log-probability."""
    hits, n = 0.0, 0
    task = exp.task
    task.eval()
    for batch, _ in exp.val_loader:
        out = task(batch, stage="val")
        bs = batch["chosen_input_ids"].shape[0]
        hits += float(out["chosen_preferred"]) * bs
        n += bs
    task.train()
    return hits / max(n, 1)


def measure(quick: bool = False) -> dict:
    from benchmarks.dpo_data import write_pairs

    root = tempfile.mkdtemp()
    write_pairs(Path(root) / "pairs.jsonl", limit=24 if quick else 400)
    out = {"lm": run_lm_stdlib(root, quick)}
    base = out["lm"]["hf"]
    adapters = ["lora"] + (["qlora"] if importlib.util.find_spec("bitsandbytes") else [])
    out["adapters"] = [run_adapter(root, base, a, quick) for a in adapters]
    out["minilm"] = run_minilm(root, quick)
    out["dpo"] = run_dpo(root, base, quick)
    out["ppo"] = run_ppo(root, base, quick)
    return out


def stdlib_section(lm: dict) -> list[str]:
    xz = lm["xz_files"]
    return [
        "### Small GPT from scratch (`configs/lm_stdlib.yaml`)",
        "",
        f"{lm['steps']} steps in {lm['minutes']:.1f} minutes; {lm['files']} held-out files.",
        "",
        "| held-out files | bits per byte |",
        "|---|---|",
        f"| GPT (val/bpb) | {lm['bpb']:.3f} |",
        f"| xz -9e, all held-out bytes | {lm['xz_total']:.3f} |",
        f"| xz -9e per file: min / median / max | {min(xz):.3f} / {statistics.median(xz):.3f}"
        f" / {max(xz):.3f} |",
        "",
        f"Validation perplexity (per BPE token): {lm['perplexity']:.2f}.",
    ]


def section(r: dict) -> list[str]:
    body = [
        "Corpus: the standard library's own `.py` files (no tests), split by file with seed 0.",
        "",
        *stdlib_section(r["lm"]),
        "",
        "### Adapters on the `email` package, from the GPT above",
        "",
        "| adapter | held-out perplexity before | after | trainable / total parameters | minutes |",
        "|---|---|---|---|---|",
    ]
    for a in r["adapters"]:
        body.append(
            f"| {a['adapter']} | {a['ppl_before']:.2f} | {a['ppl_after']:.2f} | "
            f"{a['trainable']:,} / {a['total']:,} | {a['minutes']:.1f} |"
        )
    if len(r["adapters"]) == 1:
        body += ["", "QLoRA: bitsandbytes is not installed here (`pip install -e .[quant]`)."]
    m = r["minilm"]
    body += [
        "",
        "### LoRA on the packaged MiniLM: which package a docstring comes from",
        "",
        f"{m['classes']} packages, {m['val']} held-out docstrings (split by file).",
        "",
        "| val accuracy | chance | trainable / total parameters | minutes |",
        "|---|---|---|---|",
        f"| {m['accuracy']:.4f} | {m['chance']:.4f} | {m['trainable']:,} / {m['total']:,} | "
        f"{m['minutes']:.1f} |",
    ]
    return body + dpo_section(r["dpo"]) + ppo_section(r["ppo"])


def dpo_section(d: dict) -> list[str]:
    """The DPO subsection (redone alone by ``python -m benchmarks.lm dpo <base>``)."""
    return [
        "",
        "### DPO on docstring pairs (`configs/dpo_docstrings.yaml`)",
        "",
        f"{d['pairs']} pairs ({d['val']} held out: functions DPO does not train on) on a "
        "documented style choice (`benchmarks/dpo_data.py`): the prompt is a function's "
        "signature, the chosen answer its docstring's summary line in the descriptive style "
        'of Google\'s Python style guide ("Returns the ..."), the rejected one the line as '
        'the standard library wrote it, in PEP 257\'s imperative ("Return the ..."). The '
        "GPT above is the policy and the reference. `chosen preferred`: held-out pairs where "
        "the policy itself (adapter on, no dropout) gives the chosen answer the higher "
        "log-probability; reward accuracy: where it does so by more than the reference.",
        "",
        "| chosen preferred before | after | change | reward accuracy after | "
        "reward margin after (nats) | minutes |",
        "|---|---|---|---|---|---|",
        f"| {d['before']:.4f} | {d['after']:.4f} | {d['after'] - d['before']:+.4f} | "
        f"{d['reward_accuracy']:.4f} | {d['margin']:.2f} | {d['minutes']:.1f} |",
        "",
        "The pairs recorded here before (`benchmarks/dpo_data.py` as of commit d53848c: "
        "another function's docstring, of any length, as the rejected answer) left the "
        "held-out preference where it was (0.5375 before and after): there an answer's "
        "summed log-probability is decided by its length, a gap of tens of nats that a DPO "
        "margin of 1.5 (5.6 after 3x the steps) does not close.",
    ]


def ppo_section(p: dict) -> list[str]:
    """The PPO subsection (redone alone by ``python -m benchmarks.lm ppo <base>``)."""
    return [
        "",
        "### PPO (`configs/ppo_docstrings.yaml`)",
        "",
        "Prompts: standard-library function headers; reward: occurrences of `return` in "
        f"the completion (capped at 3); per-token KL penalty to the starting model, "
        f"coefficient {p['kl_start']} adapted toward a KL of {p['kl_target']} nats per "
        "completion (train figures: mean of the last logged interval; val: held-out "
        f"prompts at the end). Each rollout serves ppo_epochs = {p['ppo_epochs']} updates, all "
        f"on its own batch: {p['steps']} steps are {p['steps'] // p['ppo_epochs']} batches of "
        f"{p['batch_size']} prompts, each prompt sampled once per batch. (The figures recorded "
        "before 2026-12 came from a trainer that drew a new batch for every step while the "
        "rollout was reused, so half the batches were never answered.)",
        "",
        "| reward, first interval | reward, last | KL, last | val reward | val KL | "
        "KL coefficient at the end | steps | minutes |",
        "|---|---|---|---|---|---|---|---|",
        f"| {p['first']:.3f} | {p['last']:.3f} | {p['kl']:.2f} | {p['val_reward']:.3f} | "
        f"{p['val_kl']:.2f} | {p['kl_coef']:.3f} | {p['steps']} | {p['minutes']:.1f} |",
    ]


def update_subsection(lines: list[str], results: Path) -> None:
    """Replace the subsection whose heading is ``lines[0]`` in ``results``."""
    text = results.read_text().split("\n")
    start = text.index(lines[0])
    end = next(
        (i for i in range(start + 1, len(text)) if text[i].startswith(("## ", "### "))), len(text)
    )
    results.write_text("\n".join(text[:start] + lines + [""] + text[end:]).rstrip("\n") + "\n")


def update(what: str, base: str, results: Path) -> None:
    """Rerun the lm_stdlib GPT alone, or PPO or DPO alone from an exported GPT (the lm_stdlib
    one), and replace its subsection."""
    from benchmarks.dpo_data import write_pairs

    root = tempfile.mkdtemp()
    if what == "stdlib":
        lm = run_lm_stdlib(root, quick=False)
        print(f"exported to {lm['hf']}")
        update_subsection(stdlib_section(lm), results)
        return
    if what == "ppo":
        lines = ppo_section(run_ppo(root, base, quick=False))
    else:
        write_pairs(Path(root) / "pairs.jsonl")
        lines = dpo_section(run_dpo(root, base, quick=False))
    update_subsection(lines[1:], results)


if __name__ == "__main__":
    import sys

    if not (
        sys.argv[1:] == ["stdlib"] or sys.argv[1:2] in (["ppo"], ["dpo"]) and len(sys.argv) == 3
    ):
        sys.exit("usage: python -m benchmarks.lm stdlib | ppo|dpo <exported lm_stdlib hf folder>")
    update(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else "", ROOT / "benchmarks/RESULTS.md")
