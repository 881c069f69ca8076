"""Parameter groups, freezing and several optimizers, by regular expressions on parameter names.

    freeze: ["^model\\.patch_embed\\."]
    optimizer:
      type: adamw
      lr: 1.0e-3
      weight_decay: 0.05
      groups:
        - {match: "^model\\.blocks\\.[0-5]\\.", lr_mult: 0.1}
        - {match: "\\.bias$", weight_decay: 0.0}
      layer_decay: 0.75

Names are the task's: ``model.`` + the model's own parameter names (``--dry-run`` prints them
with the resolved table). The rules:

- A parameter starts from the optimizer's values and the task's default (biases and norm weights,
  every parameter with ``ndim <= 1``, get no weight decay).
- Each key (``lr_mult``, ``lr``, ``weight_decay``, any hyper-parameter of the optimizer) is taken
  from the **first** group that matches the parameter and sets that key; groups that set other
  keys still apply. So ``{match: blocks.[0-5], lr_mult: 0.1}`` and ``{match: bias$,
  weight_decay: 0}`` together give a bias in block 3 both.
- ``lr`` = (the group's ``lr`` or the optimizer's) x ``lr_mult`` x the layer factor
  ``layer_decay ** (L + 1 - layer)`` (embeddings are layer 0, block ``i`` is ``i + 1``, the rest
  ``L + 1``). Schedulers scale each group from this base, so the ratios hold at every step.
- A pattern that matches no trainable parameter is an error naming it.
- ``optimizers:`` gives each parameter to the first entry whose ``match`` finds it (the last entry
  may omit ``match`` and takes the rest); each entry has its own groups and ``scheduler``.

Parameters with the same resolved values share one torch param group, in the order the task
lists its parameters, so a rebuilt optimizer lines up with its checkpoint.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from typing import Any, Protocol

import torch

from src.core.config import ExperimentConfig
from src.core.errors import ConfigError, shown
from src.core.optimizer_config import optimizer_sections, registry_section
from src.core.registry import OPTIMIZERS, SCHEDULERS


class Task(Protocol):
    """What parameter grouping reads of a task: its named parameters and its own groups."""

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]: ...

    def parameter_groups(self) -> list[dict[str, Any]]: ...


_LAYER = re.compile(r"\.(?:blocks|layers|layer|h|block)\.(\d+)\.")
_EMBED = re.compile(
    r"(?:^|\.)(?:patch_embed|pos_embed|cls_token|reg_token|dist_token|"
    r"mask_token|embeddings|embed_tokens|wte|wpe|embed)(?:\.|$)"
)


def _examples(names: list[str], n: int = 3) -> str:
    shown_names = ", ".join(names[:n])
    return f"{shown_names}, ... ({len(names)} in all)" if len(names) > n else shown_names


def apply_freeze(task: torch.nn.Module, patterns: list[str]) -> int:
    """Set ``requires_grad=False`` on every parameter a pattern of ``freeze`` finds; returns how
    many tensors it froze. A pattern that finds nothing is a ConfigError naming it."""
    named = list(task.named_parameters())
    frozen = 0
    for i, pattern in enumerate(patterns):
        rx = re.compile(pattern)
        hit = [p for n, p in named if rx.search(n)]
        if not hit:
            raise ConfigError(
                f"freeze.{i}: {shown(pattern)} matches no parameter (names look "
                f"like {_examples([n for n, _ in named])})"
            )
        for p in hit:
            if p.requires_grad:
                frozen += 1
            p.requires_grad_(False)
    return frozen


def _default_lr(kind: str, section: dict) -> float:
    if "lr" in section:
        return float(section["lr"])
    entry = OPTIMIZERS.get(kind)
    p = inspect.signature(entry).parameters.get("lr")
    default = p.default if p is not None else None
    if isinstance(default, (int, float)):
        return float(default)
    if isinstance(default, torch.Tensor):
        return float(default)
    raise ConfigError(f"optimizer.lr: optimizer '{kind}' has no default learning rate; give lr")


def _layers(names: list[str]) -> tuple[dict[str, int], int]:
    """Layer id of each name for layer-wise lr decay: 0 embeddings, i + 1 block i, L + 1 rest."""
    ids = {}
    for n in names:
        m = _LAYER.search(n)
        ids[n] = int(m.group(1)) + 1 if m else (0 if _EMBED.search(n) else None)
    depth = max((v for v in ids.values() if v is not None), default=0)
    return {n: (depth + 1 if v is None else v) for n, v in ids.items()}, depth


class MultiOptimizer:
    """Several optimizers stepped as one: ``param_groups`` lists all their groups (so gradient
    unscaling, clipping and logging see every parameter), the state is one per optimizer."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = list(optimizers)
        self.defaults = self.optimizers[0].defaults

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> dict:
        return {k: v for o in self.optimizers for k, v in o.state.items()}

    def step(self, closure=None):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("optimizers", [])
        if len(saved) != len(self.optimizers):
            raise ValueError(
                f"the checkpoint holds {len(saved)} optimizers, the config {len(self.optimizers)}"
            )
        for o, s in zip(self.optimizers, saved):
            o.load_state_dict(s)


class MultiScheduler:
    """One scheduler per optimizer of a :class:`MultiOptimizer` (``None`` where it has none)."""

    def __init__(self, schedulers: list):
        self.schedulers = schedulers

    def step(self) -> None:
        for s in self.schedulers:
            if s is not None:
                s.step()

    def state_dict(self) -> dict:
        return {"schedulers": [s.state_dict() if s is not None else None for s in self.schedulers]}

    def load_state_dict(self, state: dict) -> None:
        for s, saved in zip(self.schedulers, state["schedulers"]):
            if s is not None and saved is not None:
                s.load_state_dict(saved)


def optimizers_of(optimizer) -> list:
    """The torch optimizers behind ``optimizer`` (one, or those of a MultiOptimizer)."""
    return list(getattr(optimizer, "optimizers", [optimizer]))


def _entries(task: Task, cfg: ExperimentConfig) -> list[tuple[str, dict, list]]:
    """(path, section, [(name, param, task default hyper-parameters)]) per optimizer."""
    names = {id(p): n for n, p in task.named_parameters()}
    params: list[tuple[str, torch.Tensor, dict]] = []
    for g in task.parameter_groups():
        extra = {k: v for k, v in g.items() if k != "params"}
        params += [(names.get(id(p), f"param_{len(params)}"), p, extra) for p in g["params"]]
    sections = optimizer_sections(cfg)
    out: list[tuple[str, dict, list]] = [(path, s, []) for path, s in sections]
    for name, p, extra in params:
        for _, s, bucket in out:
            if "match" not in s or re.search(s["match"], name):
                bucket.append((name, p, extra))
                break
        else:
            left = [
                n
                for n, _, _ in params
                if not any("match" not in s or re.search(s["match"], n) for _, s, _ in out)
            ]
            raise ConfigError(
                f"optimizers: no entry matches {_examples(left)}; add a last "
                "entry without `match` to train them, or freeze them"
            )
    for path, s, bucket in out:
        if "match" in s and not bucket:
            raise ConfigError(
                f"{path}.match: {shown(s['match'])} matches no trainable parameter "
                "that an earlier entry has not taken"
            )
    return out


def build_optimizer(task: Task, cfg: ExperimentConfig) -> tuple[Any, list[dict]]:
    """The optimizer (a MultiOptimizer for ``optimizers:``) over ``task``'s trainable parameters,
    and the resolved table: one row per param group."""
    optimizers, table = [], []
    for path, section, bucket in _entries(task, cfg):
        kind = section["type"]
        base_lr = _default_lr(kind, section)
        user_groups = section.get("groups") or []
        rx = [re.compile(g["match"]) for g in user_groups]
        hits = [0] * len(user_groups)
        decay = section.get("layer_decay")
        layer, depth = _layers([n for n, _, _ in bucket]) if decay is not None else ({}, 0)
        if decay is not None and depth == 0:
            raise ConfigError(
                f"{path}.layer_decay: found no numbered blocks (blocks.N, "
                "layers.N, layer.N, h.N) among the parameter names"
            )
        merged: dict[tuple, dict] = {}
        for name, p, extra in bucket:
            values = dict(extra)
            set_by, labels = set(), []
            mult, lr = 1.0, base_lr
            for i, (g, r) in enumerate(zip(user_groups, rx)):
                if not r.search(name):
                    continue
                hits[i] += 1
                took = False
                for key, v in g.items():
                    if key == "match" or key in set_by:
                        continue
                    set_by.add(key)
                    took = True
                    if key == "lr_mult":
                        mult = float(v)
                    elif key == "lr":
                        lr = float(v)
                    else:
                        values[key] = v
                if took:
                    labels.append(f"groups.{i}")
            if "weight_decay" in extra and "weight_decay" not in set_by:
                labels.append("no_decay")
            if decay is not None:
                mult *= decay ** (depth + 1 - layer[name])
                labels.append(f"layer {layer[name]}")
            values["lr"] = lr * mult
            label = "+".join(labels) or "default"
            key = (label, tuple(sorted((k2, repr(v)) for k2, v in values.items())))
            group = merged.setdefault(key, {"params": [], **values, "name": label})
            group["params"].append(p)
        for i, n in enumerate(hits):
            if n == 0:
                raise ConfigError(
                    f"{path}.groups.{i}.match: {shown(user_groups[i]['match'])} "
                    f"matches no trainable parameter of this optimizer (names "
                    f"look like {_examples([n for n, _, _ in bucket])})"
                )
        groups = list(merged.values())
        opt = OPTIMIZERS.build(registry_section(section), path, params=groups)
        for g in opt.param_groups:
            table.append(
                {
                    "optimizer": path,
                    "type": kind,
                    "group": g.get("name", "default"),
                    "tensors": len(g["params"]),
                    "parameters": sum(p.numel() for p in g["params"]),
                    "lr": g["lr"],
                    "weight_decay": g.get("weight_decay"),
                }
            )
        optimizers.append(opt)
    if len(optimizers) == 1:
        return optimizers[0], table
    return MultiOptimizer(optimizers), table


def build_scheduler(cfg: ExperimentConfig, optimizer, total_steps: int):
    """The schedule of each optimizer: its entry's ``scheduler`` or the top-level one."""
    opts = optimizers_of(optimizer)
    if len(opts) == 1 and not cfg.optimizers:
        return SCHEDULERS.build(
            cfg.scheduler, "scheduler", optimizer=optimizer, total_steps=total_steps
        )
    scheds = []
    for (path, section), opt in zip(optimizer_sections(cfg), opts):
        own = section.get("scheduler")
        scheds.append(
            SCHEDULERS.build(
                own or cfg.scheduler,
                f"{path}.scheduler" if own else "scheduler",
                optimizer=opt,
                total_steps=total_steps,
            )
        )
    if len(scheds) == 1:
        return scheds[0]
    return MultiScheduler(scheds) if any(s is not None for s in scheds) else None


def format_table(table: list[dict]) -> list[str]:
    """The resolved groups as aligned lines, for the start of a run and ``--dry-run``."""
    rows = [("optimizer", "group", "tensors", "parameters", "lr", "weight_decay")]
    for r in table:
        wd = r["weight_decay"]
        rows.append(
            (
                f"{r['optimizer']} ({r['type']})",
                r["group"],
                str(r["tensors"]),
                f"{r['parameters']:,}",
                f"{r['lr']:.4g}",
                "-" if wd is None else f"{wd:g}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]


def group_lr_metrics(table: list[dict]) -> list[tuple[str, int]]:
    """(metric name, index in ``optimizer.param_groups``) of each distinct group: the lr of
    ``groups.0`` is logged as ``train/lr/groups.0`` (``train/lr/optimizers.1/default`` with
    several optimizers)."""
    several = len({r["optimizer"] for r in table}) > 1
    out, seen = [], set()
    for i, r in enumerate(table):
        name = f"train/lr/{r['optimizer']}/{r['group']}" if several else f"train/lr/{r['group']}"
        if name not in seen:
            seen.add(name)
            out.append((name, i))
    return out


def write_param_groups(run_dir, table: list[dict]) -> None:
    """``param_groups.json`` in the run folder: the table the run trains with."""
    import json
    from pathlib import Path

    (Path(run_dir) / "param_groups.json").write_text(json.dumps(table, indent=1) + "\n")


def shapes_groups(cfg: ExperimentConfig) -> bool:
    """Whether the config shapes parameter groups (then the table is printed at start)."""
    return bool(
        cfg.optimizers
        or cfg.freeze
        or cfg.optimizer.get("groups")
        or cfg.optimizer.get("layer_decay") is not None
    )


__all__ = [
    "apply_freeze",
    "build_optimizer",
    "build_scheduler",
    "MultiOptimizer",
    "MultiScheduler",
    "optimizers_of",
    "format_table",
    "shapes_groups",
    "write_param_groups",
    "group_lr_metrics",
]
