"""Pruner configuration: the pydantic base model, validation with readable errors, recipes.

Every algorithm's options are a ``PrunerConfig`` subclass with ``extra="forbid"``, so a
misspelt option is an error that names the field and the allowed ones.
"""

from __future__ import annotations

import difflib
import json
import tomllib
from pathlib import Path
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mslim_core.errors import ConfigError


class PrunerConfig(BaseModel):
    """Options shared by every algorithm; subclasses add their own fields."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, validate_assignment=True)

    flops_target: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="Fraction of the original FLOPs (multiply-accumulates) to keep, in (0, 1].",
    )
    ignored_layers: list[Any] = Field(
        default_factory=list,
        description="Layers (qualified names or modules) whose output channels are never removed.",
    )
    check_equivalence: bool = Field(
        True,
        description="After removing channels, compare the smaller model with the original "
        "(removed channels zeroed) on the example inputs and fail on a mismatch.",
    )


def _describe_field(config_cls: type[BaseModel], field: str) -> str:
    """A short 'what is allowed' text for one field, from its type and constraints."""
    info = config_cls.model_fields.get(field)
    if info is None:
        return ""
    parts: list[str] = []
    for meta in info.metadata:
        for attr, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{symbol} {value}")
    annotation = getattr(info.annotation, "__name__", None) or str(info.annotation)
    text = f"a {annotation}" if annotation else "a value"
    if parts:
        text += " " + " and ".join(parts)
    return text


def format_validation_error(algo: str, config_cls: type[BaseModel], error: ValidationError) -> str:
    """Turn a pydantic ValidationError into one message naming each bad field and value."""
    allowed = sorted(config_cls.model_fields)
    lines: list[str] = []
    for item in error.errors():
        field = ".".join(str(p) for p in item.get("loc", ()))
        value = item.get("input")
        if not field:  # a check across several options
            lines.append(f"the options of algorithm {algo!r} do not fit together: {item.get('msg')}")
        elif item.get("type") == "extra_forbidden":
            close = difflib.get_close_matches(field, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            lines.append(
                f"unknown option {field!r} (value {value!r}) for algorithm {algo!r}{hint} "
                f"Allowed options: {', '.join(allowed)}."
            )
        else:
            top = str((item.get("loc") or ("",))[0])
            allowed_text = _describe_field(config_cls, top)
            lines.append(
                f"option {field!r} = {value!r} is invalid for algorithm {algo!r}: {item.get('msg')}"
                + (f" (allowed: {allowed_text})" if allowed_text else "")
            )
    return "\n".join(lines)


def build_config(algo: str, config_cls: type[PrunerConfig], options: Mapping[str, Any]) -> PrunerConfig:
    """Validate ``options`` against ``config_cls``; raise ConfigError with a readable message."""
    try:
        return config_cls(**dict(options))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(algo, config_cls, exc)) from None


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a recipe (TOML or JSON) into a flat dict of options; ``algo`` may be one of them."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file {str(path)!r} does not exist (expected a .toml or .json file)")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        elif suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
        else:
            raise ConfigError(f"recipe file {str(path)!r} has suffix {suffix!r}; allowed: .toml, .json")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"recipe file {str(path)!r} is not valid {suffix[1:].upper()}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe file {str(path)!r} must hold a table/object of options, got {type(data).__name__}")
    return data


def merge_recipe(recipe: str | Path | None, options: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """Options from a recipe file overridden by explicit ones; returns (algo from recipe, options)."""
    merged: dict[str, Any] = {}
    algo: str | None = None
    if recipe is not None:
        data = load_recipe(recipe)
        algo = data.pop("algo", None)
        if algo is not None and not isinstance(algo, str):
            raise ConfigError(f"recipe {str(recipe)!r}: 'algo' must be a string, got {algo!r}")
        merged.update(data)
    merged.update(options)
    return algo, merged
