"""Typed argparse value parsers shared by the verbs, and ``--option key=value`` parsing."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
from pathlib import Path
from typing import Any, Sequence

from mslim_core.errors import ConfigError

__all__ = [
    "fraction",
    "nonnegative_int",
    "parse_options",
    "positive_float",
    "positive_int",
    "timestamped_folder",
]


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A number in (0, 1] (a FLOPs fraction to keep)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1] (the fraction of FLOPs to keep), got {text!r}")
    return value


def parse_options(items: Sequence[str] | None) -> dict[str, Any]:
    """``["key=value", ...]`` to a dict; values are read as JSON (numbers, true/false, null, lists) when they parse.

    ``lasso_strength=1e-4`` gives a float, ``include_stem=true`` a bool, ``ignored_layers=["fc"]`` a list,
    anything else stays a string.
    """
    options: dict[str, Any] = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"--option takes key=value (e.g. --option lasso_strength=1e-4), got {item!r}")
        if key in options:
            raise ConfigError(f"--option {key} is given twice")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        options[key] = value
    return options


def timestamped_folder(prefix: str, parent: str | Path = ".") -> Path:
    """A folder name ``PREFIX-YYYYmmdd-HHMMSS`` under ``parent`` that does not exist yet."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(parent) / f"{prefix}-{stamp}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate
