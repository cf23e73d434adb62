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
* a *block selector*: a path prefix followed by `[i]` or a slice `[start:stop]`
  of integers, and optionally a deeper path, e.g. `Transformer/encoderblock[:6]`
  or `Transformer/encoderblock[-2:]/MlpBlock_3`. It selects blocks along the
  leading axis of *stacked* leaves, the layout of blocks run by `nn.scan` or
  `nnx.scan` (every leaf under the prefix has the same leading axis, the
  depth). Python's slice rules apply, except that a selector reaching outside
  the depth, or selecting nothing, is an error. A bracket holding only an
  integer or an integer slice is always a block selector; for a glob
  character class of digits write a range (`stage[1-2]`) or use `re:`.

Rules resolve block by block: for each block of a stacked leaf, the first rule
that matches that block decides. A leaf frozen in some blocks and trainable in
others is *partly frozen*: `layerfreeze.freeze`, `layerfreeze.value_and_grad`,
`layerfreeze.train` and `layerfreeze.summary` honour it block by block
(`FreezeSpec.resolve_blocks`); plain per-leaf optax labels cannot express it
(`frozen_mask` raises).
"""

import dataclasses
import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import jax
import numpy as np

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
# `<prefix>[<selector>]<rest>`: a block selector over stacked leaves.
_BLOCK_RULE = re.compile(r"(?P<base>[^*?\[\]]+?)\[(?P<sel>[^\]]*)\](?P<rest>/[^*?\[\]]+)?")
_SELECTOR = re.compile(r"\s*(?P<start>[-+]?\d*)\s*(?P<colon>:)?\s*(?P<stop>[-+]?\d*)\s*")
_BLOCK_FORMS = (
    "valid block selectors: [i] (one block), [start:stop], [:stop], [start:] with "
    "integers, negative counting from the end"
)
# Flax linen names BatchNorm layers `BatchNorm_<i>`; torchvision-style and NNX
# attribute names are usually `bn<i>`.
DEFAULT_BN_PATTERN = r"(?i)(.*/)?[^/]*(batch_?norm[^/]*|bn\d*)/(scale|bias)"

Kind = Literal["all", "group", "glob", "regex", "block"]

FrozenBlocks = bool | tuple[bool, ...]
"""A leaf's frozen state: one bool, or one bool per block of a stacked leaf."""


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
        if self.kind == "block":
            self.selector  # noqa: B018 (validates the selector)
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
        match = _BLOCK_RULE.fullmatch(self.pattern)
        if match and re.fullmatch(r"[\s\d:+-]*", match["sel"]):
            return "block"
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
        if kind == "block":
            prefix = self.stack + self.selector[2]
        return path == prefix or path.startswith(prefix + "/")

    @property
    def stack(self) -> str:
        """A block selector's path prefix: the stacked subtree it selects blocks of."""
        match = _BLOCK_RULE.fullmatch(self.pattern)
        if self.kind != "block" or match is None:
            raise ValueError(f"Freeze rule {self.pattern!r} is not a block selector.")
        return match["base"].rstrip("/")

    @property
    def selector(self) -> tuple[int | None, int | None, str]:
        """A block selector's `(start, stop, rest)`; `stop` None = to the end.

        `[i]` is `(i, i + 1)`, except `[-1]`, which is `(-1, None)`.
        """
        match = _BLOCK_RULE.fullmatch(self.pattern)
        sel = _SELECTOR.fullmatch(match["sel"]) if match else None
        if sel is None or (not sel["colon"] and not sel["start"]):
            raise ValueError(
                f"Freeze rule {self.pattern!r} has an empty or malformed block selector; "
                f"{_BLOCK_FORMS}, e.g. 'Transformer/encoderblock[:6]'."
            )
        if sel["stop"] and not sel["colon"]:  # pragma: no cover (the regex forbids it)
            raise ValueError(f"Malformed block selector in {self.pattern!r}; {_BLOCK_FORMS}.")
        start = int(sel["start"]) if sel["start"] else None
        stop = int(sel["stop"]) if sel["stop"] else None
        if not sel["colon"]:
            assert start is not None
            stop = start + 1 if start != -1 else None
        return start, stop, match["rest"] or ""

    def blocks(self, depth: int) -> range:
        """The blocks a block selector picks out of a stack of `depth`.

        Raises:
          ValueError: the selector reaches outside `0..depth-1` or selects
            nothing; the message names the depth and the valid forms.
        """
        start, stop, _ = self.selector
        for bound in (start, stop):
            if bound is not None and not -depth <= bound <= depth:
                raise ValueError(
                    f"Block selector {self.pattern!r} reaches outside the stack "
                    f"{self.stack!r} of depth {depth} (blocks 0..{depth - 1}); {_BLOCK_FORMS}."
                )
        picked = range(depth)[slice(start, stop)]
        if not picked:
            raise ValueError(
                f"Block selector {self.pattern!r} selects no block of the stack "
                f"{self.stack!r} of depth {depth}; {_BLOCK_FORMS}."
            )
        return picked

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

        A leaf that block selectors freeze in some blocks only is partly
        frozen; here it counts as trainable (False). `resolve_blocks` gives the
        per-block answer.

        Raises:
          ValueError: a rule matches no leaf (the message names the rule and
            lists the groups that exist), `strict` and a leaf is covered by
            no rule, or a block selector does not fit its stack.
        """
        return {p: f is True for p, f in self.resolve_blocks(params).items()}

    def resolve_blocks(self, params: Any) -> dict[str, FrozenBlocks]:
        """Like `resolve`, with one bool per block for partly frozen stacked leaves.

        A leaf gets a tuple (one entry per index of its leading axis, True =
        frozen) when block selectors freeze some of its blocks and not
        others; every other leaf gets one bool.

        >>> import numpy as np
        >>> spec = FreezeSpec.parse("blocks[:2]")
        >>> stack = {"w": np.zeros((3, 4, 4)), "b": np.zeros((3, 4))}
        >>> spec.resolve_blocks({"blocks": stack, "head": np.zeros(4)})
        {'blocks/b': (True, True, False), 'blocks/w': (True, True, False), 'head': False}
        """
        flat, _ = jax.tree_util.tree_flatten_with_path(params)
        paths = [_paths.path_str(_paths.keypath_names(k)) for k, _ in flat]
        shapes = [tuple(np.shape(leaf)) for _, leaf in flat]
        return self._resolve(paths, shapes)

    def resolve_paths(self, paths: Sequence[str]) -> dict[str, bool]:
        """Like `resolve`, over a list of `/`-joined leaf paths.

        Block selectors need the leaves' shapes: use `resolve` for specs that
        have them.
        """
        if any(rule.kind == "block" for rule in self.rules):
            raise ValueError(
                f"The spec {self.describe()!r} has block selectors, which need the leaves' "
                "shapes: resolve it against the params (FreezeSpec.resolve)."
            )
        return {p: f is True for p, f in self._resolve(list(paths), None).items()}

    def _resolve(
        self, paths: Sequence[str], shapes: Sequence[tuple[int, ...]] | None
    ) -> dict[str, FrozenBlocks]:
        if len(set(paths)) != len(paths):
            raise ValueError("Parameter paths are not unique; cannot resolve a freeze spec.")
        hits = [[i for i, r in enumerate(self.rules) if r.matches(p)] for p in paths]
        picked = self._check_stacks(paths, shapes, hits)
        bn = re.compile(self.bn_pattern)
        result: dict[str, FrozenBlocks] = {}
        uncovered = []
        for n, path in enumerate(paths):
            if any(i in picked for i in hits[n]):
                assert shapes is not None
                blocks = range(shapes[n][0])
                states = [self._state_at(hits[n], picked, row) for row in blocks]
            else:
                states = [self._state_at(hits[n], picked, None)]
            if None in states:
                if self.strict:
                    uncovered.append(path)
                states = [self.default if s is None else s for s in states]
            frozen = tuple(s == FROZEN for s in states)
            if any(frozen) and self.train_bn and (bn.fullmatch(path) or self._in_bn_module(path)):
                frozen = (False,) * len(frozen)
            result[path] = frozen[0] if len(set(frozen)) == 1 else frozen
        matched = {i for h in hits for i in h}
        for i, rule in enumerate(self.rules):
            if i not in matched and rule.kind != "all":
                groups = _paths.top_level_groups(paths)
                raise ValueError(
                    f"Freeze rule {rule.pattern!r} matches no parameter. "
                    f"Groups that exist: {', '.join(groups) or '(none: empty params)'}. "
                    f"{_variables_hint(rule, paths)}"
                    "A rule is a group name or path prefix (e.g. "
                    f"'{groups[0] if groups else 'stage1'}'), a glob, 're:<regex>', or a "
                    "block selector over stacked blocks (e.g. 'Transformer/encoderblock[:6]')."
                )
        if uncovered:
            shown = ", ".join(uncovered[:10]) + (" ..." if len(uncovered) > 10 else "")
            raise ValueError(
                f"Strict freeze spec: {len(uncovered)} parameter(s) are covered by no "
                f"rule: {shown}. Add a rule for them (e.g. ('.*', 'trainable') last)."
            )
        return result

    def _check_stacks(
        self,
        paths: Sequence[str],
        shapes: Sequence[tuple[int, ...]] | None,
        hits: Sequence[Sequence[int]],
    ) -> dict[int, frozenset[int]]:
        """For each block selector that matches, the blocks it picks; checks the stacks."""
        used = {i for rules in hits for i in rules if self.rules[i].kind == "block"}
        picked = {}
        for i in sorted(used):
            rule = self.rules[i]
            stack = Rule(rule.stack)
            found: dict[int, str] = {}  # leading axis -> a path, over the whole stack
            count = 0
            for path, shape in zip(paths, shapes or [()] * len(paths), strict=True):
                if not stack.matches(path):
                    continue
                if not shape:
                    raise ValueError(
                        f"Block selector {rule.pattern!r}: {path!r} is a scalar; block "
                        "selectors select along the leading axis of stacked leaves (blocks "
                        "run by nn.scan / nnx.scan)."
                    )
                found.setdefault(shape[0], path)
                count += 1
            if count < 2:
                raise ValueError(
                    f"Block selector {rule.pattern!r}: {rule.stack!r} is a single leaf, not a "
                    "stack of blocks. Block selectors apply to the subtree of stacked blocks "
                    "(nn.scan / nnx.scan), e.g. 'Transformer/encoderblock[:6]'."
                )
            if len(found) > 1:
                shown = ", ".join(f"{p} ({d})" for d, p in sorted(found.items()))
                raise ValueError(
                    f"Block selector {rule.pattern!r}: {rule.stack!r} is not a stack of "
                    f"blocks; the leading axes of its leaves differ: {shown}. Block selectors "
                    "apply to stacked leaves (nn.scan / nnx.scan), whose leaves all have the "
                    "depth as leading axis; select unrolled blocks by name instead (e.g. "
                    "'encoderblock_0')."
                )
            (depth,) = found
            picked[i] = frozenset(rule.blocks(depth))
        return picked

    def _state_at(
        self, hits: Sequence[int], picked: Mapping[int, frozenset[int]], row: int | None
    ) -> str | None:
        """The state of the first rule that matches at block `row` (None: whole leaf)."""
        for i in hits:
            if row is None or i not in picked or row in picked[i]:
                return self.rules[i].state
        return None

    def frozen_at(self, path: str) -> bool:
        """Whether the first rule matching `path` (else the default) freezes it.

        One path on its own: no rule is required to match, and `strict` does
        not apply. Use `resolve` for a whole pytree. A path whose first
        matching rule is a block selector is not frozen as a whole: False.

        >>> FreezeSpec.parse("stem").frozen_at("stem/BatchNorm_0")
        True
        """
        rule = next((r for r in self.rules if r.matches(path)), None)
        if rule is not None and rule.kind == "block":
            return False  # frozen in some blocks at most: not frozen as a whole
        frozen = (self.default if rule is None else rule.state) == FROZEN
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
    if callable(getattr(spec, "init", None)) and callable(getattr(spec, "update", None)):
        # An optax optimizer is a NamedTuple: iterated as rules it would fail obscurely.
        raise TypeError(
            f"Cannot build a freeze spec from an optax optimizer ({type(spec).__name__}): "
            "the spec says what to freeze, e.g. 'stage1,stage2' or 'all-but:head', and the "
            "optimizer is a separate argument (freeze(optimizer, spec), make_steps(model, "
            f"optimizer, spec, params)). Were two arguments swapped? {_VALID_SPECS}"
        )
    if isinstance(spec, Mapping):
        return FreezeSpec(tuple((k, v) for k, v in spec.items()))
    if isinstance(spec, Iterable):
        return FreezeSpec(tuple(spec))
    raise TypeError(f"Cannot build a freeze spec from {type(spec).__name__}. {_VALID_SPECS}")


_VALID_SPECS = (
    "Valid: a FreezeSpec, a string such as 'stage1,stage2', 'none', 'all' or "
    "'all-but:head', a list of patterns, or a list of (pattern, 'frozen'|'trainable') pairs."
)


def _variables_hint(rule: Rule, paths: Sequence[str]) -> str:
    """A sentence for a rule that matches under `params/` of a flax variables dict, else ''."""
    inner = [p.split("/", 1)[1] for p in paths if p.startswith("params/")]
    if not any(rule.matches(p) for p in inner):
        return ""
    return (
        "These look like a flax variables dict ({'params': ..., 'batch_stats': ...}): the rule "
        "matches inside 'params': pass variables['params']. "
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
