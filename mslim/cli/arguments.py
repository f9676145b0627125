"""Typed argparse value parsers shared by the verbs, and ``--option key=value`` parsing."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

from mslim_core.errors import ConfigError

__all__ = [
    "add_latency_arguments",
    "fraction",
    "nonnegative_int",
    "parse_options",
    "positive_float",
    "positive_int",
    "timestamped_folder",
]


def _number(text: str, kind: type, ok: Callable[[float], bool], expected: str) -> Any:
    """``kind(text)`` when it parses and passes ``ok``; otherwise an argparse error saying what was expected."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _number(text, int, lambda v: v >= 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    """A finite number > 0."""
    return _number(text, float, lambda v: math.isfinite(v) and v > 0, "a positive number")


def fraction(text: str) -> float:
    """A number in (0, 1] (a FLOPs fraction to keep)."""
    return _number(text, float, lambda v: 0.0 < v <= 1.0, "a number in (0, 1] (the fraction of FLOPs to keep)")


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


def add_latency_arguments(p: argparse.ArgumentParser) -> None:
    """``--no-latency``, ``--channels-last`` and ``--latency-runtime``: how a run times its models."""
    from mslim.latency import RUNTIMES

    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--channels-last", action="store_true",
                   help="time latency in channels-last memory format (often faster on CPUs; see docs/deployment.md)")
    p.add_argument("--latency-runtime", choices=RUNTIMES, default="torch",
                   help="time latency in eager torch or, exported, in ONNX Runtime (needs mslim[deploy]; "
                   "see docs/deployment.md)")
