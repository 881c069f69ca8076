"""Losses and heads against small cases worked out by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from src.models.heads import DINOHead, GeM, MarginHead
from src.models.losses import byol_loss, dino_loss, info_nce, nt_xent, vicreg_loss


def test_nt_xent_matches_the_formula_on_two_pairs():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = 0.5
    # view 0 (=e1): positive is view 2 (e1, sim 1); negatives: view 1 (e2, 0), view 3 (e2, 0)
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2 * math.exp(0)))
    assert nt_xent(z1, z2, t).item() == pytest.approx(expected, rel=1e-6)  # all 4 views alike


def test_info_nce_positive_first():
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[1.0, 0.0]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    t = 1.0
    expected = -math.log(math.e / (math.e + 1 + math.exp(-1)))
    assert info_nce(q, k, queue, t).item() == pytest.approx(expected, rel=1e-6)


def test_byol_loss_is_two_minus_two_cosine():
    p = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    z = torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    assert byol_loss(p, z).item() == pytest.approx((2.0 + 0.0) / 2)


def test_vicreg_terms():
    z1 = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    z2 = z1.clone()
    out = vicreg_loss(z1, z2, 1.0, 1.0, 1.0, eps=0.0)
    assert out["invariance"] == 0
    # std of dim 0 = sqrt(2) (> 1, no hinge); dim 1 = 0 -> hinge 1; mean over dims 0.5, /2 per view
    assert out["variance"].item() == pytest.approx(0.5)
    assert out["covariance"].item() == pytest.approx(0.0)


def test_dino_loss_skips_same_view_pairs():
    s = [torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])]
    t = [torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 0.0]])]
    loss = dino_loss(s, t, torch.zeros(1, 2), student_temp=1.0, teacher_temp=1.0)
    # pairs (t0, s1) and (t1, s0): -(0.5 log 0.75 + 0.5 log 0.25) and -(log 0.5)
    expected = (-(0.5 * math.log(0.75) + 0.5 * math.log(0.25)) + math.log(2)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_arcface_adds_the_angular_margin_to_the_true_class_only():
    head = MarginHead(2, 3, "arcface", scale=2.0, margin=0.3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    emb = torch.tensor([[math.cos(0.5), math.sin(0.5)]])
    logits = head(emb, torch.tensor([0]))
    assert logits.shape == (1, 3)
    assert logits[0, 0].item() == pytest.approx(2 * math.cos(0.8), rel=1e-5)
    assert logits[0, 1].item() == pytest.approx(2 * math.sin(0.5), rel=1e-5)
    cos = MarginHead(2, 3, "cosface", scale=2.0, margin=0.3)
    with torch.no_grad():
        cos.weight.copy_(head.weight)
    assert cos(emb, torch.tensor([0]))[0, 0].item() == pytest.approx(2 * (math.cos(0.5) - 0.3))


def test_subcenter_head_takes_the_nearest_centre():
    head = MarginHead(4, 5, "arcface", subcenters=3)
    assert head.weight.shape == (15, 4)
    emb = torch.randn(6, 4)
    full = F.linear(F.normalize(emb), F.normalize(head.weight)).view(6, 5, 3).amax(-1)
    torch.testing.assert_close(head.cosine(emb), full)
    assert head(emb, torch.arange(6) % 5).shape == (6, 5)


def test_gem_with_p1_is_average_pooling():
    x = torch.rand(2, 3, 4, 4) + 0.1
    torch.testing.assert_close(GeM(p=1.0)(x), x.mean(dim=(-2, -1)))
    assert GeM()(x).shape == (2, 3)


def test_dino_head_frozen_prototypes_get_zero_gradients_and_bn_standardises():
    torch.manual_seed(0)
    head = DINOHead(8, out_dim=6, hidden=16, bottleneck=4, use_bn=True)
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in head.mlp) == 2
    x = torch.randn(5, 8)
    out = head(x, last_grad=torch.tensor(0.0))
    assert torch.allclose(out, head(x))  # freezing changes gradients, not outputs
    out.square().sum().backward()
    last = head.last.parametrizations.weight.original1
    assert torch.count_nonzero(last.grad) == 0  # zero, not None: DDP sees every parameter
    assert head.mlp[0].weight.grad.abs().sum() > 0
    head.zero_grad()
    head(x).square().sum().backward()
    full = last.grad.clone()
    assert full.abs().sum() > 0
    head.zero_grad()
    head(x, last_grad=torch.tensor(1.0)).square().sum().backward()
    assert torch.allclose(last.grad, full)
