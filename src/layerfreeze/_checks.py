"""Argument checks and message pieces shared across the package.

Each returns the value in its canonical form or raises an error that names
what was wrong, what was expected, and the value given.
"""

import math
import operator
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "count",
    "flag",
    "given",
    "groups",
    "listing",
    "multipliers",
    "non_negative",
    "number",
    "params",
    "positive",
]

Multipliers = Mapping[str, float] | Iterable[tuple[str, float]]


def given(value: Any) -> str:
    """`str 'stem'`: a value's type and repr, as an error message shows what it got."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(value).__name__} {text}"


def groups(groups: Sequence[str], what: str = "groups", *, empty: bool = False) -> tuple[str, ...]:
    """Returns `groups` as a tuple after checking it is a list of unique names.

    Args:
      groups: the value to check.
      what: the argument's name, for the messages.
      empty: whether an empty sequence is valid.
    """
    if isinstance(groups, str) or not isinstance(groups, Iterable):
        raise TypeError(
            f"{what} must be a sequence of group names such as ('stem', 'stage1', 'head'), "
            f"got {given(groups)}."
        )
    groups = tuple(groups)
    if not groups and not empty:
        raise ValueError(f"{what} is empty: name at least one top-level group.")
    bad = [g for g in groups if not isinstance(g, str) or not g]
    if bad:
        raise TypeError(f"Group names must be non-empty strings, got {bad!r} in {what} {groups!r}.")
    duplicates = sorted({g for g in groups if groups.count(g) > 1})
    if duplicates:
        raise ValueError(f"Duplicate group name(s) {duplicates} in {groups!r}.")
    return groups


def multipliers(multipliers: Multipliers | None) -> dict[str, float]:
    """Returns `{group: float}` after checking names and values (finite, >= 0)."""
    if multipliers is None:
        return {}
    if isinstance(multipliers, str):
        raise TypeError(f"Learning-rate multipliers must be {{group: float}}, got {multipliers!r}.")
    items = multipliers.items() if isinstance(multipliers, Mapping) else multipliers
    table: dict[str, float] = {}
    for item in items:
        try:
            group, value = item
        except (TypeError, ValueError):
            raise TypeError(
                f"Learning-rate multipliers must be {{group: float}} or (group, float) pairs, "
                f"got the item {item!r}."
            ) from None
        if not isinstance(group, str) or not group:
            raise TypeError(f"A multiplier's group must be a non-empty string, got {group!r}.")
        if group in table:
            raise ValueError(f"Learning-rate multiplier for group {group!r} given twice.")
        table[group] = non_negative(f"the learning-rate multiplier of group {group!r}", value)
    return table


def number(what: str, value: Any) -> float:
    """Returns `value` as a float: a real number (Python, numpy or a JAX scalar), not a bool.

    Strings are refused: `float("0.7")` would accept a value read from the
    wrong place silently.
    """
    if isinstance(value, bool | str | bytes):
        raise TypeError(f"{what} must be a number, got {given(value)}.")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a number, got {given(value)}.") from None


def non_negative(what: str, value: Any) -> float:
    x = number(what, value)
    if not (math.isfinite(x) and x >= 0):
        raise ValueError(f"{what} must be >= 0 (and finite), got {value!r}.")
    return x


def positive(what: str, value: Any) -> float:
    x = number(what, value)
    if not (math.isfinite(x) and x > 0):
        raise ValueError(f"{what} must be > 0 (and finite), got {value!r}.")
    return x


def count(what: str, value: Any) -> int:
    """Returns `value` as an int after checking it is an integer >= 0 (not a bool)."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an integer, got {value!r}.")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(
            f"{what} must be an integer, got {type(value).__name__} {value!r}."
        ) from None
    if number < 0:
        raise ValueError(f"{what} must be >= 0, got {number}.")
    return number


def flag(what: str, value: Any) -> bool:
    """Returns `value` as a bool after checking it is one (`"no"` would be truthy)."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{what} must be True or False, got {given(value)}.")
    return bool(value)


def params(value: Any, what: str = "params") -> Any:
    """Returns `value` after checking it can be a parameter pytree.

    Catches what is plainly no pytree of parameters: None, a string or path,
    a model or an optimizer (passed in the wrong place). Leaves are not
    looked at: this runs wherever a plan is resolved.
    """
    expected = (
        f"{what} must be the parameter pytree (e.g. variables['params'], or its shapes "
        "from jax.eval_shape) or an NNX model"
    )
    if value is None or isinstance(value, str | bytes | os.PathLike):
        raise TypeError(f"{expected}; got {given(value)}.")
    if callable(getattr(value, "init", None)) and callable(getattr(value, "apply", None)):
        raise TypeError(
            f"{expected}; got the model {type(value).__name__} itself. Pass its parameters: "
            "model.init(rng, x)['params']."
        )
    if callable(getattr(value, "init", None)) and callable(getattr(value, "update", None)):
        raise TypeError(
            f"{expected}; got an optax optimizer ({type(value).__name__}). Were two "
            "arguments swapped?"
        )
    return value


def listing(items: Sequence[str], limit: int) -> str:
    """`a, b, c and 4 more`: at most `limit` items shown."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
