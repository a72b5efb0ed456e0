"""What values each field of the schema may take, declared beside the field, and the check of them.

    dim: int = field_in(256, gt=0, le=2**17)                 # a positive int, at most 131072
    paths: list[str] = field_in(list, items=Domain(nonempty=True, path=True))
    check_domains(cfg)     # ConfigError naming the first field out of its domain, its value, and the domain

Every number must also be finite (no nan, no inf), every string of a ``list[str]`` a string. What
combinations of values can run (a head count that divides the width, a world size the launcher can
start) is :mod:`fmtrain.validation`'s to say, after this.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any

PATH_COMPONENT_BYTES = 255  # NAME_MAX of Linux file systems
PATH_BYTES = 4095  # PATH_MAX - 1


class ConfigError(ValueError):
    """A config value that fmtrain refuses, with the field, the value and what would be valid."""

    def __init__(self, key: str, value: object, expected: str) -> None:
        self.key, self.value, self.expected = key, value, expected
        super().__init__(f"{key}={value!r} is invalid: {expected}")

    def __reduce__(self) -> tuple[type, tuple[str, object, str]]:
        # Rebuilt from its fields when it crosses a process (a Ray Tune trial's error reaches the driver).
        return type(self), (self.key, self.value, self.expected)


ConfigError.__module__ = "fmtrain.config"  # its public home, in messages and pickles (a Ray trial's error)


@dataclass(frozen=True)
class Domain:
    """The values a field may take (``None`` is always allowed for an optional field)."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    choices: tuple[Any, ...] = ()
    nonempty: bool = False  # a string or list: not empty
    path: bool = False  # a file-system path: each component <= 255 bytes, the whole <= 4095
    length: int | None = None  # a list or tuple of exactly this many items
    items: Domain | None = None  # each item of a list or tuple

    def describe(self) -> str:
        """``must be positive and <= 131072``, ``valid choices are a, b``, ..."""
        if self.choices:
            return "valid choices are " + ", ".join(str(c) for c in self.choices)
        bounds = []
        if self.gt == 0 and self.ge is None:
            bounds.append("positive")
        elif self.ge == 0 and self.gt is None:
            bounds.append("non-negative")
        elif self.gt is not None:
            bounds.append(f"> {_number(self.gt)}")
        elif self.ge is not None:
            bounds.append(f">= {_number(self.ge)}")
        if self.lt is not None:
            bounds.append(f"< {_number(self.lt)}")
        if self.le is not None:
            bounds.append(f"<= {_number(self.le)}")
        return "must be " + " and ".join(bounds) if bounds else "must be set"

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is outside this domain, or None."""
        if isinstance(value, bool):
            return None if not self.choices or value in self.choices else self.describe()
        if isinstance(value, int | float):
            if not math.isfinite(value):
                return "must be a finite number"
            if self.choices and value not in self.choices:
                return self.describe()
            low_ok = (self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge)
            high_ok = (self.lt is None or value < self.lt) and (self.le is None or value <= self.le)
            return None if low_ok and high_ok else self.describe()
        if isinstance(value, str):
            if self.nonempty and not value.strip():
                return "must not be empty"
            if self.choices and value not in self.choices:
                return self.describe()
            if self.path:
                return path_problem(value)
        if isinstance(value, list | tuple):
            if self.nonempty and not value:
                return "must not be empty"
            if self.length is not None and len(value) != self.length:
                return f"must have exactly {self.length} values"
        return None


def _number(x: float) -> str:
    """A bound as a reader types it: 1048576, 0.01, 1e+12."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e10 else f"{x:g}"


def path_problem(path: str) -> str | None:
    """Why ``path`` cannot be a path on Linux (a component or the whole too long), or None."""
    if len(path.encode()) > PATH_BYTES:
        return f"is {len(path.encode())} bytes long; paths are at most {PATH_BYTES}"
    longest = max(path.split("/"), key=lambda part: len(part.encode()))
    if len(longest.encode()) > PATH_COMPONENT_BYTES:
        size = len(longest.encode())
        return f"has a name of {size} bytes ({longest[:24]}...); each name in a path is at most {PATH_COMPONENT_BYTES}"
    return None


def field_in(default: Any, **domain: Any) -> Any:
    """A dataclass field with its :class:`Domain`; a callable default (``list``, ``dict``) is a factory."""
    metadata = {"domain": Domain(**domain)}
    if callable(default):
        return dataclasses.field(default_factory=default, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check_domains(node: Any, prefix: str = "") -> None:
    """Refuse the first field of ``node`` (a schema dataclass, recursively) that is outside its domain,
    is a number that is not finite, or a list whose items are not of the declared type."""
    hints = typing.get_type_hints(type(node))
    for f in dataclasses.fields(node):
        key, value = f"{prefix}{f.name}", getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            check_domains(value, f"{key}.")
            continue
        if value is None:
            continue
        domain = f.metadata.get("domain", Domain())
        if (problem := domain.problem(value)) is not None:
            raise ConfigError(key, value, problem)
        if isinstance(value, list | tuple):
            _check_items(key, value, hints[f.name], domain.items or Domain())


def _check_items(key: str, values: list[Any] | tuple[Any, ...], hint: Any, domain: Domain) -> None:
    item_types = [t for t in typing.get_args(hint) if t is not Ellipsis]
    expected: tuple[type, ...] = tuple(_plain(t) for t in item_types) or (object,)
    if float in expected:
        expected = (*expected, int)  # an int is a float's value too
    for value in values:
        if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
            names = " or ".join(sorted({t.__name__ for t in expected}))
            raise ConfigError(key, list(values), f"each item must be a {names}, not {value!r}")
        if (problem := domain.problem(value)) is not None:
            raise ConfigError(key, list(values), f"each item: {problem}")


def _plain(hint: Any) -> type:
    plain: type = typing.get_origin(hint) or hint
    return plain
