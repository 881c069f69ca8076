"""The optimizer sections of a config: ``optimizer`` with its ``groups`` and ``layer_decay``,
or several ``optimizers`` by ``match``, each with its own ``scheduler``. Checked here before
anything is built (one line per problem, naming its dotted path); built by
:mod:`src.core.param_groups`.
"""

from __future__ import annotations

import re
from typing import Any

from src.core.errors import shown

Section = dict[str, Any]  # a component: {"type": name, **params}, checked by its registry


def regex_error(pattern: Any, where: str) -> None:
    """Raise ValueError naming ``where`` when ``pattern`` is not a regular expression."""
    if not isinstance(pattern, str):
        raise ValueError(f"{where}: a regular expression must be a string (got {shown(pattern)})")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{where}: {shown(pattern)} is not a regular expression ({exc})") from None


def regex_lines(pattern: Any, where: str) -> list[str]:
    try:
        regex_error(pattern, where)
    except ValueError as exc:
        return [str(exc)]
    return []


# Keys of an optimizer section that shape its parameter groups (src/core/param_groups.py); the
# rest is the OPTIMIZERS entry's. In an `optimizers` entry also `match` and `scheduler`.
GROUP_SECTION_KEYS = ("groups", "layer_decay")
MULTI_SECTION_KEYS = ("match", "scheduler")


def optimizer_sections(cfg_or_data: Any) -> list[tuple[str, Section]]:
    """(dotted path, section) of each optimizer: ``optimizer``, or each entry of ``optimizers``."""
    get = cfg_or_data.get if isinstance(cfg_or_data, dict) else lambda k: getattr(cfg_or_data, k)
    many = get("optimizers") or []
    if isinstance(many, list) and many:
        return [(f"optimizers.{i}", s) for i, s in enumerate(many)]
    return [("optimizer", get("optimizer") or {})]


def registry_section(section: Section) -> Section:
    """An optimizer section without the keys the platform reads (groups, match, scheduler)."""
    return {k: v for k, v in section.items() if k not in GROUP_SECTION_KEYS + MULTI_SECTION_KEYS}


def optimizer_structure_errors(path: str, section: Section) -> tuple[list[str], list[tuple]]:
    """Problems of ``groups``/``layer_decay``/``match`` in one optimizer section, and the
    (registry, path, section) triples to check against the registries (group hyper-parameters
    as the optimizer's own, an entry's scheduler)."""
    lines: list[str] = []
    checks: list[tuple] = []
    kind = section.get("type")
    groups = section.get("groups", [])
    if not isinstance(groups, list):
        lines.append(
            f"{path}.groups: a list of {{match: REGEX, lr_mult: ..., ...}} (got {shown(groups)})"
        )
        groups = []
    for i, g in enumerate(groups):
        at = f"{path}.groups.{i}"
        if not isinstance(g, dict):
            lines.append(
                f"{at}: a mapping {{match: REGEX, lr_mult: ..., weight_decay: ...}} "
                f"(got {shown(g)})"
            )
            continue
        if "match" not in g:
            lines.append(f"{at}: needs 'match', a regular expression on parameter names")
        else:
            lines += regex_lines(g["match"], f"{at}.match")
        mult = g.get("lr_mult", 1.0)
        if isinstance(mult, bool) or not isinstance(mult, (int, float)) or not 0 <= mult < 1e6:
            lines.append(f"{at}.lr_mult: a number >= 0 (got {shown(mult)})")
        if len(g) == 1 and "match" in g:
            lines.append(
                f"{at}: sets nothing (give lr_mult, lr, weight_decay or another "
                "hyper-parameter of the optimizer)"
            )
        hyper = {k: v for k, v in g.items() if k not in ("match", "lr_mult")}
        if isinstance(kind, str) and hyper:
            checks.append(("optimizers", at, {"type": kind, **hyper}))
    decay = section.get("layer_decay")
    if decay is not None and (
        isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay <= 1
    ):
        lines.append(f"{path}.layer_decay: a number in (0, 1] (got {shown(decay)})")
    if "match" in section:
        if not path.startswith("optimizers."):
            lines.append(f"{path}.match: only entries of `optimizers` take `match`")
        else:
            lines += regex_lines(section["match"], f"{path}.match")
    if "scheduler" in section:
        sched = section["scheduler"]
        if not path.startswith("optimizers."):
            lines.append(f"{path}.scheduler: the schedule is the top-level `scheduler` section")
        elif not isinstance(sched, dict) or not isinstance(sched.get("type"), str):
            lines.append(
                f"{path}.scheduler: a SCHEDULERS section with a 'type' (got {shown(sched)})"
            )
        else:
            checks.append(("schedulers", f"{path}.scheduler", sched))
    return lines, checks


def optimizers_errors(cfg: Any, defaults: Section) -> list[str]:
    """How ``optimizers`` entries fit together (the last alone may omit `match`)."""
    many = cfg.optimizers
    if not many:
        return []
    lines = []
    if cfg.optimizer != defaults:
        lines.append(
            "optimizers: replaces `optimizer`, which this config sets too; remove "
            "`optimizer` (or, where a base file sets it, give optimizer: {type: adamw})"
        )
    for i, s in enumerate(many[:-1]):
        if "match" not in s:
            lines.append(
                f"optimizers.{i}: needs `match` (only the last entry may omit it and "
                "take every parameter the others do not)"
            )
    if cfg.strategy.get("type") == "deepspeed" and len(many) > 1:
        lines.append(
            "optimizers: DeepSpeed steps one optimizer; use `optimizer` with `groups` "
            "under strategy.type deepspeed"
        )
    return lines
