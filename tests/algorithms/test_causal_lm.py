"""Causal language modelling from scratch: bits per byte and samples."""

import math

import pytest
from helpers import GPT, metrics, run


def test_causal_lm_from_scratch_reports_bpb_and_samples(write_config, tmp_path):
    run(
        write_config(
            {
                "data": {
                    "type": "text",
                    "paths": ["stdlib:json"],
                    "vocab_size": 400,
                    "block_size": 32,
                    "val_fraction": 0.3,
                    "batch_size": 8,
                },
                "model": GPT,
                "task": {"type": "causal_lm", "samples": 1, "max_new_tokens": 5},
                "trainer.max_steps": 4,
                "trainer.eval_every_n_steps": 4,
            }
        )
    )
    rows = metrics(tmp_path / "runs/tiny", drop=())
    val = [r for r in rows if "val/bpb" in r][-1]
    assert val["val/perplexity"] == pytest.approx(math.exp(val["val/loss"]), rel=1e-6)
    assert 0 < val["val/bpb"] < 20
    assert any("text/sample_0" in r for r in rows)
    assert (tmp_path / "runs/tiny/tokenizer/tokenizer.json").exists()
    assert "train/tokens_per_sec" in rows[0]


@pytest.mark.slow
def test_compiling_the_gpt_keeps_its_loss_curve(write_config, tmp_path):
    """lm_stdlib compiles its GPT for speed: the compiled model's losses are the eager model's,
    with dropout as lm_stdlib has it (GPT-2's 0.1; on the CPU a compiled model draws its dropout
    masks with ATen's random numbers, in the eager model's order)."""
    dropout = 0.1
    gpt = {
        **GPT,
        "config": {
            **GPT["config"],
            "activation_function": "gelu_pytorch_tanh",
            "resid_pdrop": dropout,
            "embd_pdrop": dropout,
            "attn_pdrop": dropout,
        },
    }
    curves = {}
    for name, compiled in (("eager", False), ("compiled", True)):
        run(
            write_config(
                {
                    "name": name,
                    "data": {
                        "type": "text",
                        "paths": ["stdlib:json"],
                        "vocab_size": 400,
                        "block_size": 32,
                        "val_fraction": 0.3,
                        "batch_size": 8,
                    },
                    "model": gpt,
                    "task": {"type": "causal_lm", "samples": 0},
                    "trainer.max_steps": 8,
                    "trainer.log_every": 1,
                    "trainer.eval_every_n_steps": 4,
                    "trainer.compile": compiled,
                    "trainer.grad_clip": 1.0,
                }
            )
        )
        curves[name] = [
            (r["step"], r.get("train/loss"), r.get("val/loss"))
            for r in metrics(tmp_path / f"runs/{name}")
        ]
    assert len(curves["eager"]) == len(curves["compiled"]) >= 10
    for (step, *eager), (step_c, *comp) in zip(curves["eager"], curves["compiled"]):
        assert step == step_c
        for e, c in zip(eager, comp):
            assert (e is None) == (c is None) and (e is None or c == pytest.approx(e, rel=1e-4))
