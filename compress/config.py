"""Typed configs from plain dicts (YAML), validated with the offending key path in the error.

Why not pydantic: stdlib dataclasses keep the dependency list short; this walker covers the
types recipes use (nested dataclasses, Optional, Literal, list/tuple/dict, Path, numbers).

Errors quote the user's value through :func:`short_repr` (bounded: a value built from YAML
aliases can expand to billions of items). ``float`` fields take finite numbers only (NaN and
inf are refused; ``1e-4`` written as a YAML 1.1 string is read as the number). A ``Literal``
with ``"on"``/``"off"`` choices takes YAML 1.1's booleans for them (``latency: off`` read as
False by a YAML 1.1 loader means "off").
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from .errors import AdcError, did_you_mean, short_repr
from .yaml_io import FLOAT_RE

T = TypeVar("T")


def ranged(default: Any, lo: float, hi: float) -> Any:
    """A dataclass field with ``default`` whose value :func:`from_dict` keeps within [lo, hi].

    Why on the field: every numeric recipe key carries its range where it is declared, and a
    test walks every config to make sure none is missing (a value out of range otherwise reaches
    torch as a traceback, or runs for days).
    """
    return dataclasses.field(default=default, metadata={"range": (lo, hi)})


def from_dict(cls: type[T], data: Any, path: str = "recipe") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys, wrong types and failed checks name ``path.key``.

    Fields declared with :func:`ranged` are checked against their range. A dataclass may define
    ``validate(self, path)`` for cross-field checks; it is called last.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise AdcError(f"{path}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        key = unknown[0] if isinstance(unknown[0], str) and len(unknown[0]) <= 80 else short_repr(unknown[0])
        hint = did_you_mean(unknown[0], fields)
        raise AdcError(f"{path}.{key}: unknown key{hint}" if hint else
                       f"{path}.{key}: unknown key (expected one of: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], f"{path}.{name}")
            bounds = f.metadata.get("range")
            if bounds is not None and kwargs[name] is not None:
                check_range(kwargs[name], *bounds, f"{path}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise AdcError(f"{path}.{name}: missing required key")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(path)
    return obj


def to_dict(obj: Any) -> Any:
    """The inverse of :func:`from_dict`, for writing the resolved recipe."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, path)
            except AdcError as exc:
                errors.append(str(exc))
        raise AdcError(errors[0] if len(errors) == 1 else f"{path}: {short_repr(value)} matches none of {_name(tp)}")
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, bool) and {"on", "off"} <= set(choices) and not any(isinstance(c, bool) for c in choices):
            value = "on" if value else "off"  # YAML 1.1 reads on/off/yes/no as booleans
        try:
            ok = value in choices
        except TypeError:
            ok = False
        if not ok:
            raise AdcError(f"{path}: {short_repr(value)} is not one of {', '.join(map(repr, choices))}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise AdcError(f"{path}: expected a list, got {type(value).__name__} {short_repr(value)}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise AdcError(f"{path}: expected {len(args)} values, got {len(value)}")
            return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        out = [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple or tp is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise AdcError(f"{path}: expected a mapping, got {type(value).__name__}")
        args = get_args(tp) or (Any, Any)
        return {_convert(args[0], k, f"{path}"): _convert(args[1], v, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise AdcError(f"{path}: expected true/false, got {short_repr(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise AdcError(f"{path}: expected an integer, got {short_repr(value)}")
        return value
    if tp is float:
        if isinstance(value, str) and FLOAT_RE.match(value.strip()):
            value = float(value.strip().lower().lstrip("+").replace(".inf", "inf").replace(".nan", "nan"))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise AdcError(f"{path}: expected a number, got {short_repr(value)}")
        return check_finite(float(value), path)
    if tp is str:
        if not isinstance(value, str):
            raise AdcError(f"{path}: expected a string, got {short_repr(value)}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)) or "\0" in str(value):
            raise AdcError(f"{path}: expected a path, got {short_repr(value)}")
        return Path(value).expanduser()
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise AdcError(f"{path}: cannot read {short_repr(value)} as {_name(tp)}")


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def check_range(value: float, lo: float, hi: float, path: str, *, hi_open: bool = False) -> None:
    """Raise unless lo <= value <= hi (or < hi when ``hi_open``); NaN is outside every range."""
    ok = lo <= value < hi if hi_open else lo <= value <= hi
    if not ok:
        raise AdcError(f"{path}: {short_repr(value)} is outside [{lo}, {hi}{')' if hi_open else ']'}")


def check_finite(value: float, path: str) -> float:
    """``value`` if it is a finite number, else one line naming ``path``."""
    if not math.isfinite(value):
        raise AdcError(f"{path}: expected a finite number, got {short_repr(value)}")
    return value


def check_positive(value: float, path: str) -> float:
    """``value`` if it is a finite number > 0 (a learning rate, a weight that must act), else one line."""
    check_finite(value, path)
    if not value > 0:
        raise AdcError(f"{path}: expected a number > 0, got {short_repr(value)}")
    return value


class Number:
    """An argparse ``type``: an int (or float) within [lo, hi], else argparse's one ``error:`` line, exit 2.

    Why here, beside :func:`ranged`: the command line's numbers get ranges as the recipe's do.
    ``type=int`` lets ``--threads -3`` or ``--repeats 10**9`` through to torch; every numeric flag
    of every command uses this (a test walks the parsers), and the range shows in the error.
    """

    def __init__(self, kind: type, lo: float, hi: float):
        self.kind, self.lo, self.hi = kind, lo, hi
        self.__name__ = kind.__name__  # argparse names the type in its messages

    def __call__(self, text: str):
        import argparse
        import math

        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {'an integer' if self.kind is int else 'a number'} "
                                             f"in [{self.lo}, {self.hi}]") from None
        if not (isinstance(value, int) or math.isfinite(value)) or not self.lo <= value <= self.hi:
            raise argparse.ArgumentTypeError(f"{text}: expected a value in [{self.lo}, {self.hi}]")
        return value


def int_in(lo: int, hi: int) -> Number:
    """argparse type: an integer in [lo, hi]."""
    return Number(int, lo, hi)


def float_in(lo: float, hi: float) -> Number:
    """argparse type: a finite number in [lo, hi]."""
    return Number(float, lo, hi)


__all__ = ["ranged", "int_in", "float_in", "Number", "from_dict", "to_dict", "check_range", "check_finite", "check_positive", "short_repr", "typing"]
