"""Type and range of every size and flag field of a model config, checked before anything is built.

A config.json is input we did not write: a string where a channel count belongs, a float layer
count, or an absurd size (transformer_layers_per_block 10000 builds for minutes and gigabytes before
any other error) must fail at parse time, naming the field. Each config dataclass lists its fields
here with the widest range a Stable Diffusion model plausibly uses (several times the largest real
value), and calls `check_fields` first thing in __post_init__; the model's own consistency checks
(divisibility, block types) follow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Int:
    low: int
    high: int
    optional: bool = False  # None allowed
    per_level: bool = False  # one value, or a list with one per level
    pair: bool = False  # one value, or [height, width]

    def describe(self) -> str:
        what = f"an integer in [{self.low}, {self.high}]"
        if self.per_level:
            what += " or a list of them (one per level)"
        if self.pair:
            what += " or a [height, width] pair of them"
        return what + (" or null" if self.optional else "")


@dataclass(frozen=True)
class IntList:
    low: int
    high: int
    min_len: int = 1
    max_len: int = 8

    def describe(self) -> str:
        return f"a list of {self.min_len} to {self.max_len} integers in [{self.low}, {self.high}]"


@dataclass(frozen=True)
class Number:
    low: float
    high: float
    low_open: bool = False  # low itself excluded

    def describe(self) -> str:
        return f"a finite number in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"


@dataclass(frozen=True)
class Flag:
    per_level: bool = False

    def describe(self) -> str:
        return "true or false" + (" (or a list of them, one per level)" if self.per_level else "")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_ok(value, rule) -> bool:
    return _is_int(value) and rule.low <= value <= rule.high


def _ok(value, rule) -> bool:
    if isinstance(rule, Int):
        if value is None:
            return rule.optional
        if isinstance(value, tuple) and (rule.per_level or (rule.pair and len(value) == 2)):
            return len(value) > 0 and all(_int_ok(v, rule) for v in value)
        return _int_ok(value, rule)
    if isinstance(rule, IntList):
        return (
            isinstance(value, tuple)
            and rule.min_len <= len(value) <= rule.max_len
            and all(_int_ok(v, rule) for v in value)
        )
    if isinstance(rule, Number):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        return (value > rule.low if rule.low_open else value >= rule.low) and value <= rule.high
    if isinstance(rule, Flag):
        if isinstance(value, tuple) and rule.per_level:
            return len(value) > 0 and all(isinstance(v, bool) for v in value)
        return isinstance(value, bool)
    raise TypeError(f"unknown rule {rule!r}")


def check_fields(config, rules: dict) -> None:
    """ValueError naming the first field of `config` whose value breaks its rule."""
    owner = type(config).__name__
    for name, rule in rules.items():
        value = getattr(config, name)
        if not _ok(value, rule):
            shown = repr(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise ValueError(f"{owner}: config field {name!r} = {shown} must be {rule.describe()}")
