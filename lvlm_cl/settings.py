"""Typed settings with declared ranges, checked by one strict loader (peft's ``LoraConfig`` style).

A component's settings are a frozen dataclass deriving from ``Settings``; each field has a type, a default,
a one-line help and, for a number, its allowed range, all declared on the field with ``setting``::

    @dataclass(frozen=True)
    class LwFSettings(Settings):
        alpha: float = setting(1.0, low=0, help="weight of the distillation term (0 turns it off)")
        temperature: float = setting(2.0, above=0, help="softmax temperature T")

``build(LwFSettings, {"alpha": 0.5}, owner="method 'lwf'")`` returns the settings or raises a
``SettingsError`` naming the owner, the setting, what it allows and the value given:

- an unknown key: ``method 'lwf' has no setting 'beta'; its settings: ['alpha', 'temperature']``;
- a wrong type: ``int``, ``float``, ``bool``, ``str`` and ``Literal[...]`` (the choices of a string) are
  told apart (YAML's ``true`` is not a number, ``1.5`` is not an integer, ``"1"`` is not a number); an
  integer is taken for a ``float`` field (and stored as a float); ``X | None`` also takes null;
- a number that is not finite, or outside its field's range: ``method 'lwf': setting 'temperature' must be
  a finite number > 0, got 0``.

Rules that tie several fields together (one of two budgets, a rank divisible by a count) cannot be declared on a
field: a settings class states them in ``resolve``, which ``build`` calls with the keys the user gave.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Union

from lvlm_cl.errors import UserError

SEED_MAX = 2 ** 32 - 1      # what every random generator takes (numpy's, torch's, random's)
# PyYAML (YAML 1.1) reads an exponent without a dot (1e-4) as a string; a setting never takes a number as text.
_YAML_TEXT_NUMBER = re.compile(r"[-+]?[0-9]+[eE][-+]?[0-9]+")


class SettingsError(ValueError, UserError):
    """A setting's value is not what its field allows; the message names the owner, the setting and the value."""


@dataclass(frozen=True)
class Range:
    """The numbers a field allows: ``low``/``high`` inclusive bounds, or exclusive with ``low_open``/``high_open``
    (None: unbounded on that side)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def describe(self, integer: bool) -> str:
        """``>= 1``, ``> 0 and <= 1``, or ``from 0 to 4294967295`` (an integer's closed range); "" unbounded."""
        if integer and self.low is not None and self.high is not None and not (self.low_open or self.high_open):
            return f"from {_number(self.low)} to {_number(self.high)}"
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {_number(self.low)}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {_number(self.high)}")
        return " and ".join(parts)


def _number(x: float) -> str:
    """A bound as written: ``1``, ``0.5``, ``4294967295`` (not ``4.29497e+09``)."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def setting(default: Any, *, help: str, low: float | None = None, high: float | None = None,
            above: float | None = None, below: float | None = None) -> Any:
    """A settings field: its default, its one-line help (what docs/methods.md says of it) and, for a number,
    its range: ``low``/``high`` inclusive, ``above``/``below`` exclusive (give at most one of each pair)."""
    if low is not None and above is not None or high is not None and below is not None:
        raise TypeError("setting(): give low or above, and high or below, not both")
    metadata: dict[str, Any] = {"help": help}
    if any(b is not None for b in (low, high, above, below)):
        metadata["range"] = Range(low=above if above is not None else low, high=below if below is not None else high,
                                  low_open=above is not None, high_open=below is not None)
    return dataclasses.field(default=default, metadata=metadata)


def seed_setting(help: str = "seeds the method's random choices") -> Any:
    """A ``seed`` field: an integer from 0 to 2**32 - 1, what every random generator takes; default 0."""
    return setting(0, low=0, high=SEED_MAX, help=help)


@dataclass(frozen=True)
class Settings:
    """Base of every settings dataclass (subclasses are ``@dataclass(frozen=True)`` too): no fields here."""

    def resolve(self, given: frozenset[str]) -> Settings:
        """Cross-field rules that no single field can declare, given the keys the user set: raise ``ValueError``
        with a message naming the settings involved, or return the settings to use (``self``, or a copy in
        which a given key displaces another field's default). Every field is already checked on its own."""
        return self


def fields(cls: type[Settings]) -> dict[str, dataclasses.Field]:
    """Setting name -> its dataclass field (``metadata``: ``help``, and ``range`` for a number)."""
    return {f.name: f for f in dataclasses.fields(cls)}


def defaults(cls: type[Settings]) -> dict[str, Any]:
    """Setting name -> default, in declaration order."""
    return {name: f.default for name, f in fields(cls).items()}


def types_of(cls: type[Settings]) -> dict[str, Any]:
    """Setting name -> its annotation, resolved (``int``, ``float | None``, ``Literal['a', 'b']`` ...)."""
    hints = typing.get_type_hints(cls)
    return {name: hints[name] for name in fields(cls)}


def allowed(tp: Any, rng: Range | None) -> str:
    """What a field of type ``tp`` with range ``rng`` allows, in words: ``an integer >= 1``, ``a finite number
    > 0 and <= 1``, ``one of ['a', 'b']``, ``true or false``, each ``, or null`` when None is allowed."""
    base, nullable = _base(tp)
    if typing.get_origin(base) is Literal:
        words = f"one of {list(typing.get_args(base))}"
    elif base is bool:
        words = "true or false"
    elif base is str:
        words = "a string"
    else:
        bounds = rng.describe(integer=base is int) if rng is not None else ""
        words = ("an integer" if base is int else "a finite number") + (f" {bounds}" if bounds else "")
    return words + (", or null" if nullable else "")


def check_value(value: Any, tp: Any, rng: Range | None) -> tuple[bool, Any]:
    """(whether ``value`` is allowed by a field of type ``tp`` and range ``rng``, the value to store: an
    integer given for a float field becomes a float)."""
    base, nullable = _base(tp)
    if value is None:
        return nullable, None
    if typing.get_origin(base) is Literal:
        return isinstance(value, str) and value in typing.get_args(base), value
    if base is bool or base is str:
        return isinstance(value, base), value
    if isinstance(value, bool) or not isinstance(value, (int, float)):    # YAML's true is not a number
        return False, value
    if base is int:
        return isinstance(value, int) and (rng is None or value in rng), value
    try:
        number = float(value)
    except OverflowError:             # an integer beyond any float
        return False, value
    return math.isfinite(number) and (rng is None or number in rng), number


def build(cls: type[Settings], args: Mapping[str, Any], *, owner: str) -> Settings:
    """``cls`` from ``args`` (a recipe's mapping), strictly: unknown keys, wrong types, numbers that are not
    finite or out of their field's range, strings outside their choices, and broken cross-field rules
    (``resolve``) each raise a ``SettingsError`` that starts with ``owner`` (``method 'replay'``)."""
    declared, hints = fields(cls), types_of(cls)
    unknown = sorted(set(args) - set(declared), key=str)
    if unknown:
        raise SettingsError(f"{owner} has no setting {unknown[0]!r}; its settings: {sorted(declared)}")
    values = {}
    for key, value in args.items():
        rng = declared[key].metadata.get("range")
        ok, values[key] = check_value(value, hints[key], rng)
        if not ok:
            hint = ""
            if isinstance(value, str) and _YAML_TEXT_NUMBER.fullmatch(value):
                hint = f" (YAML reads {value} as text: write it with a dot, e.g. {re.sub('[eE]', '.0e', value, 1)})"
            raise SettingsError(f"{owner}: setting {key!r} must be {allowed(hints[key], rng)}, got {value!r}{hint}")
    try:
        return cls(**values).resolve(frozenset(args))
    except ValueError as e:
        raise SettingsError(f"{owner}: {e}") from None


def _base(tp: Any) -> tuple[Any, bool]:
    """(the type a field holds, whether it also takes None) for an annotation ``X`` or ``X | None``; a TypeError
    (a bug in the settings class, not the user's) for a type the checker does not know."""
    options = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)
    nullable = type(None) in options
    rest = [o for o in options if o is not type(None)]
    known = len(rest) == 1 and (rest[0] in (int, float, bool, str) or (
        typing.get_origin(rest[0]) is Literal and all(isinstance(a, str) for a in typing.get_args(rest[0]))))
    if not known:
        raise TypeError(f"a setting's type is int, float, bool, str or a Literal of strings, or one of them | None; "
                        f"not {tp}")
    return rest[0], nullable


__all__ = ["SEED_MAX", "Range", "Settings", "SettingsError", "allowed", "build", "check_value", "defaults",
           "fields", "seed_setting", "setting", "types_of"]
