"""Freeze specs: ordered rules over parameter paths, first full match wins.

A spec is data. It parses from the strings users type on a command line
(`stage1,stage2`, `none`, `all`, `all-but:head`) and resolves against a
parameter pytree to one boolean per leaf (True = frozen).

Rule patterns come in three kinds:

* a *group*: a plain name such as `stage1` or a path prefix such as
  `stage1/Block_0`. It matches that subtree (the name, then `/` or the end).
* a *glob*: a pattern with `*`, `?` or `[`, matched with `fnmatch` against the
  whole path (`*` also crosses `/`), e.g. `*/BatchNorm_*/*`.
* a *regex*: a pattern prefixed with `re:`, matched with `re.fullmatch`, e.g.
  `re:stage[12]/.*`.
"""

import dataclasses
import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from layerfreeze import _paths

__all__ = [
    "FROZEN",
    "TRAINABLE",
    "FreezeSpec",
    "Rule",
    "SpecLike",
    "as_spec",
]

FROZEN = "frozen"
TRAINABLE = "trainable"
_STATES = (FROZEN, TRAINABLE)
_ALL_BUT = "all-but:"
_REGEX_PREFIX = "re:"
_GLOB_CHARS = frozenset("*?[")
# Flax linen names BatchNorm layers `BatchNorm_<i>`; torchvision-style and NNX
# attribute names are usually `bn<i>`.
DEFAULT_BN_PATTERN = r"(?i)(.*/)?[^/]*(batch_?norm[^/]*|bn\d*)/(scale|bias)"

Kind = Literal["all", "group", "glob", "regex"]


@dataclasses.dataclass(frozen=True)
class Rule:
    """One rule of a spec: leaves whose path matches `pattern` get `state`.

    Attributes:
      pattern: a group name or path prefix, a glob, `re:<regex>`, or `*all*`
        (created by `Rule.everything`), which matches every leaf.
      state: `"frozen"` or `"trainable"`.
    """

    pattern: str
    state: str = FROZEN

    def __post_init__(self):
        if not isinstance(self.pattern, str):
            raise TypeError(
                f"A rule's pattern must be a string, got {type(self.pattern).__name__}: "
                f"{self.pattern!r}."
            )
        if not self.pattern.strip():
            raise ValueError(
                "Empty pattern in freeze spec. Valid patterns: a group name such as "
                "'stage1', a glob such as 'stage1/*/kernel', or 're:<regex>'."
            )
        if self.state not in _STATES:
            raise ValueError(f"Rule state must be one of {_STATES}, got {self.state!r}.")
        if self.kind == "regex":
            try:
                re.compile(self.pattern[len(_REGEX_PREFIX) :])
            except re.error as e:
                raise ValueError(f"Invalid regex in freeze rule {self.pattern!r}: {e}.") from e

    @classmethod
    def everything(cls, state: str = FROZEN) -> "Rule":
        """A rule that matches every leaf."""
        return cls("*all*", state)

    @property
    def kind(self) -> Kind:
        if self.pattern == "*all*":
            return "all"
        if self.pattern.startswith(_REGEX_PREFIX):
            return "regex"
        if _GLOB_CHARS & set(self.pattern):
            return "glob"
        return "group"

    def matches(self, path: str) -> bool:
        """Whether the rule's pattern fully matches `path`."""
        kind = self.kind
        if kind == "all":
            return True
        if kind == "regex":
            return re.fullmatch(self.pattern[len(_REGEX_PREFIX) :], path) is not None
        if kind == "glob":
            return fnmatch.fnmatchcase(path, self.pattern)
        prefix = self.pattern.rstrip("/")
        return path == prefix or path.startswith(prefix + "/")

    def __str__(self) -> str:
        text = "all" if self.kind == "all" else self.pattern
        return text if self.state == FROZEN else f"{text} (trainable)"


@dataclasses.dataclass(frozen=True)
class FreezeSpec:
    """Which parameters stay fixed: ordered rules, first full match wins.

    Attributes:
      rules: the rules, in order. The first rule whose pattern fully matches a
        leaf's path decides whether that leaf is frozen.
      default: the state of a leaf that no rule matches (`"trainable"` unless
        the spec says otherwise). Ignored when `strict`.
      strict: require every leaf to be matched by some rule (big_vision
        semantics); an uncovered leaf is an error that lists it.
      train_bn: keep BatchNorm scale and bias trainable inside frozen groups,
        and let those BatchNorm layers keep normalising with batch statistics
        (fastai's `train_bn`). By default a frozen group's BatchNorm is frozen
        through and through: no updates and running statistics unchanged.
      bn_pattern: regex (full match) naming BatchNorm scale/bias leaves for
        `train_bn`.
      bn_modules: paths of BatchNorm modules (`encoder/unit_a/norm1`) whose
        `scale` and `bias` count as BatchNorm parameters for `train_bn`, in
        addition to `bn_pattern`: BatchNorm found by type, whatever its name
        (`layerfreeze.batchnorm_modules(variables)` lists them; NNX models are
        handled by type automatically).

    >>> spec = FreezeSpec.parse("stem,stage1")
    >>> spec.resolve({"stem": {"w": 0}, "stage1": {"w": 0}, "head": {"w": 0}})
    {'head/w': False, 'stage1/w': True, 'stem/w': True}
    """

    rules: tuple[Rule, ...] = ()
    default: str = TRAINABLE
    strict: bool = False
    train_bn: bool = False
    bn_pattern: str = DEFAULT_BN_PATTERN
    bn_modules: tuple[str, ...] = ()

    def __post_init__(self):
        rules = []
        for rule in self.rules:
            if isinstance(rule, Rule):
                rules.append(rule)
            elif isinstance(rule, str):
                rules.append(Rule(rule, FROZEN))
            elif isinstance(rule, Sequence) and len(rule) == 2:
                pattern, state = rule
                rules.append(Rule(pattern, _coerce_state(state)))
            else:
                raise TypeError(
                    f"Freeze rule {rule!r} is not valid: expected a pattern string, "
                    "a Rule, or a (pattern, state) pair with state in "
                    f"{_STATES} (None also means frozen)."
                )
        object.__setattr__(self, "rules", tuple(rules))
        if self.default not in _STATES:
            raise ValueError(f"default must be one of {_STATES}, got {self.default!r}.")
        re.compile(self.bn_pattern)
        if isinstance(self.bn_modules, str):
            raise TypeError(
                "bn_modules must be a sequence of module paths, not the string "
                f"{self.bn_modules!r}."
            )
        object.__setattr__(self, "bn_modules", tuple(self.bn_modules))

    # Construction ---------------------------------------------------------

    @classmethod
    def parse(cls, text: str, **kwargs: Any) -> "FreezeSpec":
        """Parses a spec as typed on a command line.

        Forms:
          * `none`: nothing frozen. (An empty string is an error: it is more
            often a forgotten value than a deliberate "freeze nothing".)
          * `all`: everything frozen.
          * `stage1,stage2`: a comma-separated list of patterns to freeze.
          * `all-but:head` / `all-but:stage4,head`: everything frozen except the
            listed patterns.

        Args:
          text: the spec string.
          **kwargs: other `FreezeSpec` fields (`strict`, `train_bn`, ...).

        Returns:
          The spec.

        >>> FreezeSpec.parse("all-but:head").describe()
        'all-but:head'
        """
        if not isinstance(text, str):
            raise TypeError(f"A freeze spec string was expected, got {type(text).__name__}.")
        stripped = text.strip()
        if not stripped:
            raise ValueError(
                "Empty freeze spec. Write 'none' to freeze nothing, or e.g. 'all', "
                "'stage1,stage2', 'all-but:head'."
            )
        if stripped.lower() == "none":
            return cls((), **kwargs)
        if stripped.lower() == "all":
            return cls((Rule.everything(),), **kwargs)
        if stripped.lower().startswith(_ALL_BUT):
            keep = _split(stripped[len(_ALL_BUT) :], text)
            rules = [Rule(p, TRAINABLE) for p in keep] + [Rule.everything()]
            return cls(tuple(rules), **kwargs)
        return cls(tuple(Rule(p, FROZEN) for p in _split(stripped, text)), **kwargs)

    @classmethod
    def all_but(cls, *patterns: str, **kwargs: Any) -> "FreezeSpec":
        """Freezes every leaf except those matching `patterns`."""
        if not patterns:
            raise ValueError("all_but() needs at least one pattern to keep trainable.")
        rules = [Rule(p, TRAINABLE) for p in patterns] + [Rule.everything()]
        return cls(tuple(rules), **kwargs)

    def replace(self, **changes: Any) -> "FreezeSpec":
        """Returns a copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    # Resolution -------------------------------------------------------------

    def resolve(self, params: Any) -> dict[str, bool]:
        """Maps each leaf path of `params` to True (frozen) or False (trainable).

        Raises:
          ValueError: a rule matches no leaf (the message names the rule and
            lists the groups that exist), or `strict` and a leaf is covered by
            no rule.
        """
        paths = _paths.leaf_paths(params)
        return self.resolve_paths(paths)

    def resolve_paths(self, paths: Sequence[str]) -> dict[str, bool]:
        """Like `resolve`, over a list of `/`-joined leaf paths."""
        if len(set(paths)) != len(paths):
            raise ValueError("Parameter paths are not unique; cannot resolve a freeze spec.")
        bn = re.compile(self.bn_pattern)
        matched = [False] * len(self.rules)
        result: dict[str, bool] = {}
        uncovered = []
        for path in paths:
            state = None
            for i, rule in enumerate(self.rules):
                if rule.matches(path):
                    matched[i] = True
                    if state is None:
                        state = rule.state
            if state is None:
                if self.strict:
                    uncovered.append(path)
                state = self.default
            frozen = state == FROZEN
            if frozen and self.train_bn and (bn.fullmatch(path) or self._in_bn_module(path)):
                frozen = False
            result[path] = frozen
        for rule, hit in zip(self.rules, matched, strict=True):
            if not hit and rule.kind != "all":
                groups = _paths.top_level_groups(paths)
                raise ValueError(
                    f"Freeze rule {rule.pattern!r} matches no parameter. "
                    f"Groups that exist: {', '.join(groups) or '(none: empty params)'}. "
                    "A rule is a group name or path prefix (e.g. "
                    f"'{groups[0] if groups else 'stage1'}'), a glob, or 're:<regex>'."
                )
        if uncovered:
            shown = ", ".join(uncovered[:10]) + (" ..." if len(uncovered) > 10 else "")
            raise ValueError(
                f"Strict freeze spec: {len(uncovered)} parameter(s) are covered by no "
                f"rule: {shown}. Add a rule for them (e.g. ('.*', 'trainable') last)."
            )
        return result

    def frozen_at(self, path: str) -> bool:
        """Whether the first rule matching `path` (else the default) freezes it.

        One path on its own: no rule is required to match, and `strict` does
        not apply. Use `resolve` for a whole pytree.

        >>> FreezeSpec.parse("stem").frozen_at("stem/BatchNorm_0")
        True
        """
        state = next((r.state for r in self.rules if r.matches(path)), self.default)
        frozen = state == FROZEN
        if frozen and self.train_bn:
            if re.fullmatch(self.bn_pattern, path) or self._in_bn_module(path):
                return False
        return frozen

    def _in_bn_module(self, path: str) -> bool:
        module, _, name = path.rpartition("/")
        return name in ("scale", "bias") and module in self.bn_modules

    def describe(self) -> str:
        """A short string that `FreezeSpec.parse` turns back into this spec's rules."""
        rules = self.rules
        if not rules:
            return "none"
        if len(rules) == 1 and rules[0].kind == "all" and rules[0].state == FROZEN:
            return "all"
        if (
            rules[-1].kind == "all"
            and rules[-1].state == FROZEN
            and all(r.state == TRAINABLE for r in rules[:-1])
        ):
            return _ALL_BUT + ",".join(r.pattern for r in rules[:-1])
        if all(r.state == FROZEN for r in rules):
            return ",".join("all" if r.kind == "all" else r.pattern for r in rules)
        return "; ".join(str(r) for r in rules)

    def __str__(self) -> str:
        return self.describe()


SpecLike = FreezeSpec | str | Iterable[Any] | Mapping[str, Any] | None


def as_spec(spec: SpecLike) -> FreezeSpec:
    """Turns what users write into a `FreezeSpec`.

    Accepts a `FreezeSpec`; a string (`FreezeSpec.parse`); `None` (nothing
    frozen); a sequence of patterns to freeze; a sequence of `(pattern, state)`
    pairs (big_vision style, `state` in `"frozen"`, `"trainable"` or `None` for
    frozen); or a mapping `{pattern: state}`.

    >>> as_spec(["stem", ("head", "trainable")]).describe()
    'stem; head (trainable)'
    """
    if isinstance(spec, FreezeSpec):
        return spec
    if spec is None:
        return FreezeSpec()
    if isinstance(spec, str):
        return FreezeSpec.parse(spec)
    if isinstance(spec, Mapping):
        return FreezeSpec(tuple((k, v) for k, v in spec.items()))
    if isinstance(spec, Iterable):
        return FreezeSpec(tuple(spec))
    raise TypeError(
        f"Cannot build a freeze spec from {type(spec).__name__}. Valid: a FreezeSpec, a "
        "string such as 'stage1,stage2', 'none', 'all' or 'all-but:head', a list of "
        "patterns, or a list of (pattern, 'frozen'|'trainable') pairs."
    )


def _coerce_state(state: Any) -> str:
    if state is None or state is True:
        return FROZEN
    if state is False:
        return TRAINABLE
    if state in _STATES:
        return state
    raise ValueError(f"Rule state must be 'frozen', 'trainable' or None (frozen), got {state!r}.")


def _split(body: str, original: str) -> list[str]:
    parts = [p.strip() for p in body.split(",")]
    if any(not p for p in parts):
        raise ValueError(
            f"Empty pattern in freeze spec {original!r}. Use comma-separated group names "
            "such as 'stage1,stage2', or 'none', 'all', 'all-but:head'."
        )
    return parts
