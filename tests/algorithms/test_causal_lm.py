"""Causal language modelling from scratch: bits per byte and samples."""
import math

import pytest

from helpers import GPT
from helpers import metrics, run


def test_causal_lm_from_scratch_reports_bpb_and_samples(write_config, tmp_path):
    run(write_config({"data": {"type": "text", "paths": ["stdlib:json"], "vocab_size": 400,
                               "block_size": 32, "val_fraction": 0.3, "batch_size": 8},
                      "model": GPT, "task": {"type": "causal_lm", "samples": 1,
                                             "max_new_tokens": 5},
                      "trainer.max_steps": 4, "trainer.eval_every_n_steps": 4}))
    rows = metrics(tmp_path / "runs/tiny", drop=())
    val = [r for r in rows if "val/bpb" in r][-1]
    assert val["val/perplexity"] == pytest.approx(math.exp(val["val/loss"]), rel=1e-6)
    assert 0 < val["val/bpb"] < 20
    assert any("text/sample_0" in r for r in rows)
    assert (tmp_path / "runs/tiny/tokenizer/tokenizer.json").exists()
    assert "train/tokens_per_sec" in rows[0]
