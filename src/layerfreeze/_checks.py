"""Argument checks and message pieces shared across the package.

Each returns the value in its canonical form or raises an error that names
what was wrong, what was expected, and the value given.
"""

import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["count", "groups", "listing", "multipliers", "non_negative", "number", "positive"]

Multipliers = Mapping[str, float] | Iterable[tuple[str, float]]


def groups(groups: Sequence[str]) -> tuple[str, ...]:
    """Returns `groups` as a tuple after checking it is a list of unique names."""
    if isinstance(groups, str) or not isinstance(groups, Iterable):
        raise TypeError(
            f"groups must be a sequence of group names such as ('stem', 'stage1', 'head'), "
            f"got {groups!r}."
        )
    groups = tuple(groups)
    if not groups:
        raise ValueError("groups is empty: name at least one top-level group.")
    bad = [g for g in groups if not isinstance(g, str) or not g]
    if bad:
        raise TypeError(f"Group names must be non-empty strings, got {bad!r} in {groups!r}.")
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
    if isinstance(value, bool):
        raise TypeError(f"{what} must be a number, got {value!r}.")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a number, got {value!r}.") from None


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


def listing(items: Sequence[str], limit: int) -> str:
    """`a, b, c and 4 more`: at most `limit` items shown."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
