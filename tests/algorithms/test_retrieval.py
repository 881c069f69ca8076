"""Retrieval metrics by hand."""

import pytest
import torch

from src.algorithms.retrieval import retrieval_metrics


def test_retrieval_metrics_by_hand():
    emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.8, 0.2]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    out = retrieval_metrics(emb, labels, ks=(1, 2))
    # sample 4 (label 1) is nearest to the label-0 pair: its top-1 and top-2 are misses
    assert out["recall@1"] == pytest.approx(4 / 5)
    assert out["recall@2"] == pytest.approx(4 / 5)
    # mAP@R: queries 0 and 1 (R=1) hit; 2 and 3 (R=2) find each other then sample 4; sample 4
    # (R=2) finds the two label-0 samples first: AP 0
    assert out["map@r"] == pytest.approx((1 + 1 + 1 + 1 + 0) / 5)
