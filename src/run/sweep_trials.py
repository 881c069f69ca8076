"""How a sweep keeps its trials in the Optuna study: the attributes it sets on each trial, the
values of a choice axis as stored, and which trials count toward the budget."""

from __future__ import annotations

import json
from typing import Any

# user attributes of a trial
RUN, HOST, PID, RETRY_OF, ERROR, SURPLUS, STEPS, INTERRUPTED, THREADS = (
    "run",
    "host",
    "pid",
    "retry_of",
    "error",
    "surplus",
    "steps",
    "interrupted",
    "threads",
)


def _primitive(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def stored_choices(dist) -> list[Any]:
    """A choice axis as Optuna stores it: the values themselves, or, when one of them is a list
    or a mapping (which Optuna cannot store), every value as its JSON text."""
    if all(_primitive(v) for v in dist.choice):
        return list(dist.choice)
    return [json.dumps(v, sort_keys=True) for v in dist.choice]


def decoded(params: dict[str, Any], space: dict) -> dict[str, Any]:
    """A trial's parameters as the experiment config reads them."""
    out = {}
    for k, v in params.items():
        dist = space.get(k)
        json_axis = (
            dist is not None
            and dist.choice is not None
            and not all(_primitive(c) for c in dist.choice)
        )
        out[k] = json.loads(v) if json_axis and isinstance(v, str) else v
    return out


def interrupted(t) -> bool:
    """A failed trial that did not fail on its own parameters: stopped, or its process died."""
    from optuna.trial import TrialState

    return t.state == TrialState.FAIL and ERROR not in t.user_attrs and SURPLUS not in t.user_attrs


def counted(t) -> bool:
    """Does this trial count toward the budget (it has an outcome, or is under way)?"""
    from optuna.trial import TrialState

    if t.state == TrialState.FAIL:
        return ERROR in t.user_attrs
    return True
