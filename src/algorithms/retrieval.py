"""Retrieval metrics on embeddings with FAISS: Recall@k and mAP@R (leave-one-out on one split)."""

from __future__ import annotations

import numpy as np
import torch


def retrieval_metrics(emb: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """Every sample queries all the others by cosine similarity.

    Recall@k: a same-label sample is among the k nearest. mAP@R (Musgrave et al., 2020): with R
    the number of other samples of the query's label, the mean over queries of
    (1/R) * sum_{i<=R} precision@i * relevant(i).
    """
    import faiss

    x = torch.nn.functional.normalize(emb.float(), dim=1).cpu().numpy().astype(np.float32)
    y = labels.cpu().numpy()
    counts = np.bincount(y)
    r_max = int(counts[y].max() - 1)
    depth = min(len(y), max(max(ks), r_max) + 1)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    _, nn_idx = index.search(x, depth)
    # drop each query itself (normally first; ties can move it)
    own = nn_idx == np.arange(len(y))[:, None]
    neighbours = np.stack([row[~mine][: depth - 1] for row, mine in zip(nn_idx, own)])
    rel = y[neighbours] == y[:, None]  # (N, depth-1)
    out = {f"recall@{k}": float(rel[:, :k].any(1).mean()) for k in ks}
    R = counts[y] - 1
    precision = np.cumsum(rel, axis=1) / np.arange(1, rel.shape[1] + 1)
    within = np.arange(rel.shape[1])[None, :] < R[:, None]
    ap = (precision * rel * within).sum(1) / np.maximum(R, 1)
    out["map@r"] = float(ap[R > 0].mean()) if (R > 0).any() else 0.0
    return out
