"""A model's summary: its layers to a depth, parameter counts, trainable counts and size.

    rows, totals = summarize(task.model, depth=2)

Printed by ``--dry-run``; kept in ``run_info.json`` (``model_summary``) of every run.
"""

from __future__ import annotations

from typing import Any

import torch


def _size(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def summarize(model: torch.nn.Module, depth: int = 3) -> tuple[list[dict[str, Any]], dict]:
    """One row per module down to ``depth`` levels (name, class, parameters, trainable), and the
    totals: parameters, trainable, and the size in MB of parameters and buffers."""
    rows = []
    for name, module in model.named_modules():
        level = name.count(".") + 1 if name else 0
        if not name or level > depth:
            continue
        params = list(module.parameters())
        if not params:
            continue
        rows.append(
            {
                "name": name,
                "type": type(module).__name__,
                "parameters": sum(p.numel() for p in params),
                "trainable": sum(p.numel() for p in params if p.requires_grad),
            }
        )
    params = list(model.parameters())
    totals = {
        "parameters": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "size_mb": round((_size(params) + _size(model.buffers())) / 2**20, 3),
    }
    return rows, totals


def format_summary(rows: list[dict[str, Any]], totals: dict) -> list[str]:
    """Aligned lines: each layer indented by depth, then the totals."""
    table = [("module (parameter names start with it)", "type", "parameters", "trainable")]
    for r in rows:
        indent = "  " * r["name"].count(".")
        table.append((indent + r["name"], r["type"], f"{r['parameters']:,}", f"{r['trainable']:,}"))
    widths = [max(len(t[i]) for t in table) for i in range(4)]
    lines = [
        "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(t, widths))
        ).rstrip()
        for t in table
    ]
    lines.append(
        f"total: {totals['parameters']:,} parameters, {totals['trainable']:,} "
        f"trainable, {totals['size_mb']:.2f} MB (parameters and buffers)"
    )
    return lines
