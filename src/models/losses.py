"""Self-supervised losses, vectorised. Shapes: N samples, D dims."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SimCLR's normalised-temperature cross-entropy over the 2N views, in one matrix.

    Each view's positive is its partner; the other 2N - 2 views are negatives.
    """
    z = F.normalize(torch.cat([z1, z2]), dim=-1)  # (2N, D)
    sim = z @ z.T / temperature  # (2N, 2N)
    n = z1.shape[0]
    sim.fill_diagonal_(float("-inf"))  # a view is not its own negative
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, targets)


def info_nce(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float
) -> torch.Tensor:
    """MoCo: logits [q.k+, q.queue] / T with the positive at index 0. q, k: (N, D); queue: (K, D)."""
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    pos = (q * k).sum(-1, keepdim=True)  # (N, 1)
    neg = q @ queue.T  # (N, K)
    logits = torch.cat([pos, neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(p, z), averaged; z is the (stop-gradient) target projection."""
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1)).mean()


def vicreg_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    sim_weight: float = 25.0,
    var_weight: float = 25.0,
    cov_weight: float = 1.0,
    eps: float = 1e-4,
) -> dict[str, torch.Tensor]:
    """Invariance (MSE) + variance (hinge on each dimension's std at 1) + covariance (off-diagonal
    squares / D), per Bardes et al. 2022."""
    n, d = z1.shape
    invariance = F.mse_loss(z1, z2)
    variance = z1.new_zeros(())
    covariance = z1.new_zeros(())
    for z in (z1, z2):
        z = z - z.mean(0)
        std = torch.sqrt(z.var(0) + eps)
        variance = variance + F.relu(1 - std).mean() / 2
        cov = (z.T @ z) / (n - 1)  # (D, D)
        off = cov - torch.diag(torch.diag(cov))
        covariance = covariance + off.pow(2).sum() / d
    loss = sim_weight * invariance + var_weight * variance + cov_weight * covariance
    return {
        "loss": loss,
        "invariance": invariance.detach(),
        "variance": variance.detach(),
        "covariance": covariance.detach(),
    }


def dino_loss(
    student: list[torch.Tensor],
    teacher: list[torch.Tensor],
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
) -> torch.Tensor:
    """Cross-entropy between centred, sharpened teacher distributions (global views only) and
    student distributions of every other view. student: V tensors (N, K); teacher: G tensors."""
    t_probs = [F.softmax((t - center) / teacher_temp, dim=-1).detach() for t in teacher]
    s_logp = [F.log_softmax(s / student_temp, dim=-1) for s in student]
    total, terms = student[0].new_zeros(()), 0
    for ti, t in enumerate(t_probs):
        for si, s in enumerate(s_logp):
            if si == ti:
                continue  # the same view seen by both
            total = total + (-t * s).sum(-1).mean()
            terms += 1
    return total / terms


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Direct Preference Optimisation (Rafailov et al., 2023) from sequence log-probabilities (N,).

    Returns (loss, logits) with logits = beta * ((pi_c - pi_r) - (ref_c - ref_r)) and
    loss = -mean(log sigmoid(logits)).
    """
    logits = beta * ((policy_chosen - policy_rejected) - (ref_chosen - ref_rejected))
    return -F.logsigmoid(logits).mean(), logits
