"""What values each schema field accepts, declared on the field and checked in one place.

Every field of `neox.config.schema` carries `metadata={"resume": ..., "domain": ...}` (see
`schema.setting`). `check_domains` walks a composed config against its schema and raises one
`ConfigError` naming the first value outside its field's domain and an example of a valid one.
Checks that relate two fields (min_lr <= lr, heads dividing d_model) stay in `neox.config.plan`.
"""
from __future__ import annotations

import math
from dataclasses import MISSING as NO_DEFAULT, Field, dataclass, fields, is_dataclass
from typing import Any, Iterator, Optional, Sequence, Tuple, get_type_hints

from neox.errors import ConfigError

# What a change of the field on resume means (checkpoint.config_check derives its rules from this).
ERROR = "error"  # the checkpoint's tensors would not fit, or would mean something else
WARN = "warn"  # allowed: training continues with the new value, said once
IGNORE = "ignore"  # bookkeeping (paths, cadence, logging, kernels): never worth a word
RESUME_CLASSES = (ERROR, WARN, IGNORE)


class Domain:
    """The values a field accepts. `problem` returns what is wrong ("must be > 0"), or None."""

    def problem(self, value: Any) -> Optional[str]:
        raise NotImplementedError

    def example(self) -> Optional[str]:
        """A valid value to suggest when the field has no usable default."""
        return None


@dataclass(frozen=True)
class Range(Domain):
    """A finite number between lo and hi; open ends exclude the bound."""

    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    eg: Optional[str] = None  # an example to suggest instead of the field's default

    def text(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        return f"{'<' if self.hi_open else '<='} {_num(self.hi)}"

    def problem(self, value: Any) -> Optional[str]:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"must be a finite number {self.text()}"
        low_bad = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        high_bad = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
        return f"must be {self.text()}" if low_bad or high_bad else None

    def example(self) -> Optional[str]:
        return self.eg

    def fallback(self) -> Optional[str]:
        """The closed lower bound: a valid value when there is no default to suggest."""
        return _num(self.lo) if self.lo is not None and not self.lo_open else None


@dataclass(frozen=True)
class Choices(Domain):
    values: Tuple[Any, ...]

    def problem(self, value: Any) -> Optional[str]:
        return None if value in self.values else f"is not one of {', '.join(map(str, self.values))}"


@dataclass(frozen=True)
class Each(Domain):
    """A list whose every entry lies in `item` (e.g. blend weights)."""

    item: Domain

    def problem(self, value: Any) -> Optional[str]:
        for entry in value:
            why = self.item.problem(entry)
            if why:
                return f"has the entry {entry!r}, but every entry {why}"
        return None

    def example(self) -> Optional[str]:
        return self.item.example()


@dataclass(frozen=True)
class SplitSpec(Domain):
    """Up to three train,valid,test proportions: non-negative, finite, with a positive sum."""

    def problem(self, value: Any) -> Optional[str]:
        return None if split_proportions(value) is not None else (
            "must be up to three comma-separated non-negative train,valid,test proportions with a positive sum")

    def example(self) -> Optional[str]:
        return "'969,30,1'"


def split_proportions(split: Any) -> Optional[list]:
    """`"969,30,1"` (or `969/30/1`) -> [969.0, 30.0, 1.0], trailing ones 0; None when malformed."""
    try:
        weights = [float(p.strip()) for p in str(split).replace("/", ",").split(",")]
    except ValueError:
        return None
    if not 1 <= len(weights) <= 3 or any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        return None
    return weights + [0.0] * (3 - len(weights))


def at_least(n: int) -> Range:
    return Range(lo=n)


POSITIVE = Range(lo=0, lo_open=True)
NON_NEGATIVE = Range(lo=0)
PROBABILITY = Range(lo=0, hi=1, hi_open=True)  # dropout: 1 would zero every activation
PORT = Range(lo=1, hi=65535, eg="29500")
SEED = Range(lo=0, hi=2**32 - 1)  # numpy's seed range, the narrowest of the RNGs seeded


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


# ---------------------------------------------------------------------------------- the walk
def leaf_fields(schema: type, prefix: str = "") -> Iterator[Tuple[str, Field]]:
    """(dotted key, dataclass field) for every leaf of `schema`; nested dataclasses are descended."""
    hints = get_type_hints(schema)
    for f in fields(schema):
        if is_dataclass(hints[f.name]):
            yield from leaf_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f


def check_domains(node: Any, schema: type, prefix: str = "") -> None:
    """Raise ConfigError for the first value of `node` (a config section) outside its field's domain.
    A field whose metadata names `schemas` (the cluster) is checked against the one its `kind` picks."""
    hints = get_type_hints(schema)
    for f in fields(schema):
        key, value = f"{prefix}{f.name}", node.get(f.name)
        if is_dataclass(hints[f.name]):
            check_domains(value, hints[f.name], f"{key}.")
            continue
        by_kind = f.metadata.get("schemas")
        if by_kind is not None and value is not None and value.get("kind") in by_kind:
            check_domains(value, by_kind[value.get("kind")], f"{key}.")
            continue
        domain = f.metadata.get("domain")
        if domain is None or value is None:  # None: the field's "unset" (only Optional fields take it)
            continue
        why = domain.problem(value)
        if why:
            raise ConfigError(f"{key}={_show(value)} {why}{_fix(key, f, domain)}")


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, Sequence):
        return "[" + ", ".join(map(repr, value)) + "]"
    return repr(value)


def _fix(key: str, f: Field, domain: Domain) -> str:
    if isinstance(domain, Choices):
        return ""  # the choices are the fix
    example = domain.example()
    if example is None and f.default not in (NO_DEFAULT, None, "???") and domain.problem(f.default) is None:
        example = _show(f.default)
    if example is None and isinstance(domain, Range):
        example = domain.fallback()
    unset = f", or {key}=null for the default" if f.default is None and not isinstance(domain, Each) else ""
    return f"; set e.g. {key}={example}{unset}" if example else f"; set {key} to a value it allows{unset}"
