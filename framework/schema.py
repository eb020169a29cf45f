"""A plugin's constructor signature is its config schema, constraints included.

Bounds are declared beside the type with annotated-types (the markers pydantic reads too)::

    def __init__(self, bits: Annotated[int, Interval(ge=2, le=8)] = 4,
                 group_size: Annotated[int, Ge(1)] | None = 128,
                 basis: Literal["global", "per_layer"] = "global"): ...

and checked the same way on both paths into a plugin: framework.config checks a YAML node
against them before anything is built (so a bad value fails in a second, with its config
key, not after a model has loaded), and every Stage subclass checks them when it is called
from Python (``checked``). What a signature cannot say (a file that must exist, one
argument that rules out another) stays in the constructor as a ConfigError.
"""

from __future__ import annotations

import functools
import inspect
import operator
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

import annotated_types as at

from framework.errors import ConfigError


def type_hints(obj: Any) -> dict[str, Any]:
    """The annotations of a class's constructor (or a function), Annotated extras kept."""
    fn = obj.__init__ if inspect.isclass(obj) else obj
    try:
        return typing.get_type_hints(fn, include_extras=True)
    except Exception:  # an annotation that cannot be resolved: nothing to check against
        return {}


def strip_annotated(hint: Any) -> Any:
    """The type under Annotated[...] (unions of them too): what a value's type is checked
    against."""
    origin = typing.get_origin(hint)
    if origin is typing.Annotated:
        return strip_annotated(typing.get_args(hint)[0])
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(hint)
        stripped = [strip_annotated(h) for h in members]
        # rebuilt with | so that `int | None` still reads so in messages
        return hint if stripped == list(members) else functools.reduce(operator.or_, stripped)
    return hint


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(x: Any) -> str:
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)


# a bound marker's sides: (attribute, symbol, test)
_SIDES: tuple[tuple[str, str, Callable[[Any, Any], bool]], ...] = (
    ("gt", ">", operator.gt),
    ("ge", ">=", operator.ge),
    ("lt", "<", operator.lt),
    ("le", "<=", operator.le),
)
_BOUND_MARKERS = (at.Gt, at.Ge, at.Lt, at.Le, at.Interval)


def _sides(marker: Any) -> list[tuple[str, str, Callable[[Any, Any], bool], Any]]:
    """(attribute, symbol, test, bound) of each side an annotated-types bound marker sets
    (Gt, Ge, Lt, Le: one; Interval: one or two); none for other metadata."""
    if not isinstance(marker, _BOUND_MARKERS):
        return []
    return [
        (attr, symbol, test, getattr(marker, attr))
        for attr, symbol, test in _SIDES
        if getattr(marker, attr, None) is not None
    ]


def bound_text(marker: Any) -> str | None:
    """A bound marker as a user reads it: ">= 1", "in (0, 1)", "in [2, 8]"; None for
    metadata that is not a bound."""
    sides = _sides(marker)
    if len(sides) == 2:
        (low, _, _, lo), (high, _, _, hi) = sides
        left, right = "(" if low == "gt" else "[", ")" if high == "lt" else "]"
        return f"in {left}{_number(lo)}, {_number(hi)}{right}"
    if len(sides) == 1:
        _, symbol, _, bound = sides[0]
        return f"{symbol} {_number(bound)}"
    return None


def _bound_problem(value: float, marker: Any) -> str | None:
    """Why a number breaks one bound marker, or None (NaN breaks every bound)."""
    if all(test(value, bound) for _, _, test, bound in _sides(marker)):
        return None
    return f"{value!r} must be {bound_text(marker)}"


def constraint_problem(value: Any, hint: Any) -> str | None:
    """Why ``value`` breaks the bounds or choices ``hint`` declares, as a phrase to follow the
    argument's name ("0 must be >= 1", "'pca' is not one of global, per_layer"); None when
    it keeps them or the hint declares none. NaN keeps no bound. Types are not checked here
    (framework.config checks them on the YAML path; Python callers may pass richer ones)."""
    origin = typing.get_origin(hint)
    if origin is typing.Annotated:
        base, *markers = typing.get_args(hint)
        if _is_number(value):
            for marker in markers:
                if why := _bound_problem(value, marker):
                    return why
        return constraint_problem(value, base)
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        if value in choices and type(value) in {type(c) for c in choices}:
            return None
        return f"{value!r} is not one of {', '.join(map(str, choices))}"
    if origin in (list, tuple, Sequence) and isinstance(value, list | tuple):
        element = typing.get_args(hint)[:1]
        for i, item in enumerate(value if element else ()):
            if why := constraint_problem(item, element[0]):
                return f"entry {i}: {why}"
        return None
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(hint)
        if value is None and type(None) in members:
            return None
        problems = [constraint_problem(value, m) for m in members if m is not type(None)]
        if any(p is None for p in problems):
            return None
        return problems[0] if problems else None
    return None


def checked(init: Callable[..., None]) -> Callable[..., None]:
    """Wrap a constructor so that its arguments are checked against their annotated
    constraints on every call (a ConfigError naming the argument), defaults included."""
    signature = inspect.signature(init)
    hints: dict[str, Any] | None = None

    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
        nonlocal hints
        if hints is None:  # resolved on first use: the module's names exist by then
            hints = type_hints(init)
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        for name, value in bound.arguments.items():
            if name in hints and (why := constraint_problem(value, hints[name])):
                raise ConfigError(name, why)
        init(self, *args, **kwargs)

    return wrapper
