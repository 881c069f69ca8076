"""Each benchmark runs once at a tiny size, so `python -m benchmarks.run` keeps working.
(No timing is asserted here: the figures live in benchmarks/RESULTS.md.)"""

import subprocess
import sys

import pytest
from conftest import ROOT

# each `--only` name of benchmarks.run and the section it writes: one test each, so that a
# broken benchmark is named by its test and the sections run side by side under pytest -n
SECTIONS = {
    "overhead": "## Loop overhead",
    "startup": "## Start-up",
    "checkpoint": "## Checkpoint",
    "dataloader": "## Data loading",
    "ddp": "## 2-process DDP",
    "inference": "## Predict and ONNX",
    "sweep": "## Sweeps",
    "ssl": "## Self-supervised and metric learning on digits",
    "lm": "## Language models on the standard library",
    "grpo": "## GRPO on arithmetic",
    "multimodal": "## Multimodal on digits",
    "packing": "## Packing for fine-tuning",
    "datascale": "## Data at scale, text",
    "images": "## Images at scale",
    "clusters": "## Clusters",
}


def test_every_benchmark_has_a_smoke_test():
    """The default ``--only`` of benchmarks.run is SECTIONS plus the throughput benchmarks, which
    --quick skips (test_the_throughput_benchmarks_run_their_variants runs their parts)."""
    from benchmarks.run import BENCHMARKS

    assert set(BENCHMARKS) == set(SECTIONS) | {"lmspeed", "sslspeed"}


@pytest.mark.slow
@pytest.mark.parametrize("only", list(SECTIONS))
def test_each_benchmark_runs_at_a_tiny_size(tmp_path, only):
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--only", only, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert SECTIONS[only] in text and "n/a" not in text
    if only == "overhead":
        assert "| ours |" in text
    if only == "ssl":
        assert "| simclr |" in text


def test_results_file_is_committed_and_complete():
    text = (ROOT / "benchmarks/RESULTS.md").read_text()
    for section in (
        "## Loop overhead",
        "## Start-up",
        "## Checkpoint",
        "## Data loading",
        "## 2-process DDP",
        "## Predict and ONNX",
        "## Sweeps",
        "## Self-supervised and metric learning on digits",
    ):
        assert section in text


def test_recorded_sweep_meets_its_goals():
    """The "Sweeps" table of RESULTS.md: the shipped sweep finds >= 0.97; with Hyperband >= 40% of
    trials are pruned, in under half the steps of the same sweep unpruned, best within 0.01."""
    import re

    text = (ROOT / "benchmarks/RESULTS.md").read_text().split("## Sweeps", 1)[1].split("\n## ")[0]
    rows = {}
    for m in re.finditer(
        r"^\| (\w+) \| (\d) \| (\d+) \| (\d+) \(\d+%\) \| (\d+) \| ([\d,]+) \| "
        r"([\d.]+) \| (\d+) \|$",
        text,
        re.M,
    ):
        pruner, workers, trials, pruned, failed, steps, best, wall = m.groups()
        rows[pruner, int(workers)] = (
            int(trials),
            int(pruned),
            int(steps.replace(",", "")),
            float(best),
            int(wall),
        )
    assert set(rows) == {("hyperband", 1), ("none", 1), ("hyperband", 2), ("none", 2)}
    for workers in (1, 2):
        trials, pruned, steps, best, _ = rows["hyperband", workers]
        trials_n, _, steps_n, best_n, _ = rows["none", workers]
        assert trials == trials_n == 24 and best >= 0.97 and best_n >= 0.97
        assert pruned >= 0.4 * trials and steps < steps_n / 2 and abs(best - best_n) <= 0.01


def test_recorded_multimodal_results_meet_their_goals():
    """CLIP: zero-shot top-1 >= 0.85 and image->text R@1 >= 0.80 in <= 10 min; the VLM: >= 0.90
    exact match on "What digit is this?" in <= 15 min (both stages), far above the untrained."""
    import re

    text = (ROOT / "benchmarks/RESULTS.md").read_text().split("## Multimodal on digits", 1)[1]
    text = text.split("\n## ")[0]
    num = r"([\d.]+)"
    clip = {
        m.group(1): [float(x) for x in m.groups()[1:6]]
        for m in re.finditer(
            rf"^\| (random init|trained) \| {num} \| {num} \| {num} \| {num} \| {num} \|",
            text,
            re.M,
        )
    }
    zero_shot, i2t = clip["trained"][:2]
    assert zero_shot >= 0.85 and i2t >= 0.80 and clip["random init"][0] < 0.3
    assert float(re.search(rf"^\| trained \|.* \| {num} \|$", text, re.M).group(1)) <= 10
    vlm = {
        m.group(1): (float(m.group(2)), float(m.group(3)))
        for m in re.finditer(
            rf"^\| ([^|]+?) \| {num} \| [\d.]+ \| [\d.]+ \| [\d.]+ \| ([\d.]+|-) \|$",
            text.replace("| - |", "| 0 |"),
            re.M,
        )
    }
    digit, minutes = vlm["stage 2 (+ LoRA)"]
    assert digit >= 0.90 and minutes + vlm["stage 1 (projector)"][1] <= 15
    assert vlm["untrained projector"][0] < 0.2


def _ratio_medians(title: str) -> dict[str, float]:
    """The median of the last column (a per-pair ratio, min / median / max) of each row."""
    import re

    text = (ROOT / "benchmarks/RESULTS.md").read_text().split(f"## {title}", 1)[1]
    text = text.split("\n## ")[0]
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"^\| ([^|]+?) \|.*\| [\d.]+ / ([\d.]+) / [\d.]+ \|$", text, re.M)
    }


def test_recorded_whole_process_overhead_meets_its_goal():
    """A whole run of the tiny workloads (MLP and CNN on digits, start-up and end-of-run files
    included) takes at most 1.10x the hand-written script (median of the per-pair ratios)."""
    text = (ROOT / "benchmarks/RESULTS.md").read_text().split("## Loop overhead", 1)[1]
    text = text.split("\n## ")[0]
    for model in ("MLP", "CNN"):
        table = text.split(f"### {model}", 1)[1].split("\n### ")[0]
        row = next(line for line in table.splitlines() if line.startswith("| ours |"))
        whole = float(row.rstrip(" |").split("|")[-1].split("/")[1])
        assert whole <= 1.10, (model, whole)


def test_recorded_batch_views_are_three_times_the_per_sample_ones():
    got = _ratio_medians("Self-supervised views throughput")
    assert set(got) == {"`ssl_simclr_digits`", "`ssl_dino_digits`"}
    assert all(r >= 3.0 for r in got.values()), got


def test_recorded_lm_throughput_is_five_percent_above_the_hand_written_gpt():
    """ours / the nanoGPT-style peer (eager, as people write it), median of the per-pair ratios,
    at lm_stdlib's shape and at the 4x one."""
    text = (ROOT / "benchmarks/RESULTS.md").read_text()
    text = text.split("## Language-model training throughput", 1)[1].split("\n## ")[0]
    rows = [
        line.split("|")[1:-1]
        for line in text.splitlines()
        if line.startswith("| base") or line.startswith("| 4x")
    ]
    assert [r[0].split(":")[0].strip() for r in rows] == ["base", "4x"]
    for r in rows:
        assert float(r[3].split("/")[1]) >= 1.05, r


def test_the_throughput_benchmarks_run_their_variants():
    """The throughput sections run only at full size; their parts run here: both SSL view paths
    on the shipped config, and the hand-written GPT peer."""
    from benchmarks import lm_speed, ssl_speed

    for views in ("sample", "batch"):
        assert ssl_speed.images_per_sec("ssl_simclr_digits", views, 10) > 0
    tiny = {**lm_speed.SHAPES["base"], "n_layer": 1, "n_embd": 32, "n_head": 2, "block": 16}
    assert lm_speed.peer(tiny, 3) > 0
    assert lm_speed.peer(tiny, 3, compiled=True) > 0


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("checks", ["bf16_loss_parity,fp16_loss_parity", "decoder_fsdp_mfu"])
def test_the_gpu_script_runs_its_reduced_form_on_the_cpu(checks):
    """benchmarks.gpu's precision parity and decoder-throughput checks, on the CPU: the loss of
    bf16 autocast and of fp16 with a GradScaler is compared with fp32's, and a tiny Llama-style
    decoder trains under FSDP2 with activation checkpointing and reports its MFU."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.gpu",
            "--device",
            "cpu",
            "--only",
            checks,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = {
        line.split("|")[1].strip(): line
        for line in proc.stdout.splitlines()
        if line.startswith("| ") and "---" not in line
    }
    if checks == "decoder_fsdp_mfu":
        assert "ok (" in lines["decoder_fsdp_mfu"] and "MFU" in lines["decoder_fsdp_mfu"]
        return
    assert "ok" in lines["fp32_reference"]
    for name in ("bf16_loss_parity", "fp16_loss_parity"):
        assert "ok (loss " in lines[name] and "vs fp32" in lines[name]


def test_dpo_pairs_differ_only_in_the_person_of_the_opening_verb(tmp_path):
    import json

    from benchmarks.dpo_data import third_person, write_pairs

    assert write_pairs(tmp_path / "pairs.jsonl", limit=50) == 50
    rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    for r in rows:
        (cv, crest), (rv, rrest) = r["chosen"].split(" ", 1), r["rejected"].split(" ", 1)
        assert crest == rrest and cv == third_person(rv) != rv
    assert third_person("Push") == "Pushes" and third_person("Do") == "Does"
