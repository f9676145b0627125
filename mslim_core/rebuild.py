"""Describe a model's module tree as JSON, and rebuild that tree on a freshly built model.

A pruned model differs from the model it came from only in its standard layers: convs,
linears and norms with fewer channels, layers replaced by fused ones (a conv that gained a
bias), layers replaced by ``nn.Identity``, modules added or dropped by a fusion. So a file
needs no pickled code: ``describe_modules`` lists every module by qualified name with its
type and, for the standard types below, its constructor arguments; ``rebuild_modules``
walks a fresh original model, keeps what matches, and builds the standard layers that
differ. Custom module types are never built from a file, only matched by name and type.

Rebuildable types: Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear, BatchNorm1d/2d/3d,
GroupNorm, LayerNorm, PReLU, Identity, and the containers Sequential, ModuleList, ModuleDict.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from mslim_core.errors import CheckpointError

__all__ = ["Change", "REBUILDABLE_TYPES", "describe_modules", "rebuild_modules", "type_name"]


def type_name(cls: type) -> str:
    """``torch.nn.Conv2d`` for torch.nn's public classes, ``module.QualName`` for any other class."""
    if getattr(nn, cls.__name__, None) is cls:
        return f"torch.nn.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _tuple_or_str(value: Any) -> Any:
    return value if isinstance(value, str) else [int(v) for v in value]


@dataclass(frozen=True)
class _LayerSpec:
    """How to read a standard layer's constructor arguments and build it again."""

    cls: type[nn.Module]
    describe: Callable[[nn.Module], dict[str, Any]]
    build: Callable[[dict[str, Any]], nn.Module]
    fixed: tuple[str, ...] = ()  # arguments pruning never changes: a difference means another model


def _conv_args(m: nn.Module) -> dict[str, Any]:
    groups = int(m.groups)
    w = m.weight
    if m.transposed:
        in_ch, out_ch = int(w.shape[0]), int(w.shape[1]) * groups
    else:
        in_ch, out_ch = int(w.shape[1]) * groups, int(w.shape[0])
    args = {
        "in_channels": in_ch,
        "out_channels": out_ch,
        "kernel_size": _tuple_or_str(m.kernel_size),
        "stride": _tuple_or_str(m.stride),
        "padding": _tuple_or_str(m.padding),
        "dilation": _tuple_or_str(m.dilation),
        "groups": groups,
        "bias": m.bias is not None,
        "padding_mode": str(m.padding_mode),
    }
    if m.transposed:
        args["output_padding"] = _tuple_or_str(m.output_padding)
    return args


def _conv_build(cls: type[nn.Module]) -> Callable[[dict[str, Any]], nn.Module]:
    def build(a: dict[str, Any]) -> nn.Module:
        extra = {"output_padding": tuple(a["output_padding"])} if "output_padding" in a else {}
        padding = a["padding"] if isinstance(a["padding"], str) else tuple(a["padding"])
        return cls(
            a["in_channels"], a["out_channels"], tuple(a["kernel_size"]), stride=tuple(a["stride"]),
            padding=padding, dilation=tuple(a["dilation"]), groups=a["groups"], bias=a["bias"],
            padding_mode=a["padding_mode"], **extra,
        )

    return build


def _linear_args(m: nn.Module) -> dict[str, Any]:
    return {"in_features": int(m.weight.shape[1]), "out_features": int(m.weight.shape[0]), "bias": m.bias is not None}


def _bn_args(m: nn.Module) -> dict[str, Any]:
    if m.running_mean is not None:
        features = int(m.running_mean.shape[0])
    elif m.weight is not None:
        features = int(m.weight.shape[0])
    else:
        features = int(m.num_features)
    return {
        "num_features": features,
        "eps": float(m.eps),
        "momentum": None if m.momentum is None else float(m.momentum),
        "affine": bool(m.affine),
        "track_running_stats": bool(m.track_running_stats),
    }


def _group_norm_args(m: nn.Module) -> dict[str, Any]:
    channels = int(m.weight.shape[0]) if m.weight is not None else int(m.num_channels)
    return {"num_groups": int(m.num_groups), "num_channels": channels, "eps": float(m.eps), "affine": bool(m.affine)}


def _layer_norm_args(m: nn.Module) -> dict[str, Any]:
    shape = list(m.weight.shape) if m.weight is not None else [int(s) for s in m.normalized_shape]
    return {
        "normalized_shape": [int(s) for s in shape],
        "eps": float(m.eps),
        "elementwise_affine": bool(m.elementwise_affine),
        "bias": getattr(m, "bias", None) is not None,
    }


def _layer_norm_build(a: dict[str, Any]) -> nn.Module:
    return nn.LayerNorm(tuple(a["normalized_shape"]), eps=a["eps"], elementwise_affine=a["elementwise_affine"],
                        bias=a["bias"])


_CONV_FIXED = ("kernel_size", "stride", "padding", "dilation", "padding_mode")

_SPECS: dict[str, _LayerSpec] = {}
for _cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    _SPECS[type_name(_cls)] = _LayerSpec(_cls, _conv_args, _conv_build(_cls), _CONV_FIXED)
for _cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    _SPECS[type_name(_cls)] = _LayerSpec(_cls, _conv_args, _conv_build(_cls), (*_CONV_FIXED, "output_padding"))
for _cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    _SPECS[type_name(_cls)] = _LayerSpec(_cls, _bn_args, (lambda c: lambda a: c(**a))(_cls))
_SPECS["torch.nn.Linear"] = _LayerSpec(nn.Linear, _linear_args, lambda a: nn.Linear(**a))
_SPECS["torch.nn.GroupNorm"] = _LayerSpec(nn.GroupNorm, _group_norm_args, lambda a: nn.GroupNorm(**a))
_SPECS["torch.nn.LayerNorm"] = _LayerSpec(nn.LayerNorm, _layer_norm_args, _layer_norm_build)
_SPECS["torch.nn.PReLU"] = _LayerSpec(nn.PReLU, lambda m: {"num_parameters": int(m.weight.numel())},
                                      lambda a: nn.PReLU(**a))
_SPECS["torch.nn.Identity"] = _LayerSpec(nn.Identity, lambda m: {}, lambda a: nn.Identity())

_CONTAINERS: dict[str, type[nn.Module]] = {
    type_name(c): c for c in (nn.Sequential, nn.ModuleList, nn.ModuleDict)
}

REBUILDABLE_TYPES: tuple[str, ...] = tuple(sorted([*_SPECS, *_CONTAINERS]))
"""Type names ``rebuild_modules`` can build from their description alone."""


def describe_modules(model: nn.Module) -> list[dict[str, Any]]:
    """Every module of ``model`` in pre-order: name, type, train flag, children, layer arguments.

    A module reachable under a second name is listed as ``{"name": ..., "alias_of": first_name}``;
    a child slot holding ``None`` is listed in ``empty``.
    """
    entries: list[dict[str, Any]] = []
    seen: dict[int, str] = {}

    def visit(name: str, module: nn.Module) -> None:
        if id(module) in seen:
            entries.append({"name": name, "alias_of": seen[id(module)]})
            return
        seen[id(module)] = name
        kind = type_name(type(module))
        entry: dict[str, Any] = {"name": name, "type": kind, "training": bool(module.training)}
        spec = _SPECS.get(kind)
        if spec is not None:
            entry["args"] = spec.describe(module)
        entry["children"] = list(module._modules)
        empty = [k for k, v in module._modules.items() if v is None]
        if empty:
            entry["empty"] = empty
        entries.append(entry)
        for key, child in module._modules.items():
            if child is not None:
                visit(f"{name}.{key}" if name else key, child)

    visit("", model)
    return entries


@dataclass
class Change:
    """One structural difference between the fresh model and the saved one, applied by ``rebuild_modules``."""

    name: str
    kind: str  # "resized", "replaced", "added", "removed"
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"name": self.name, "kind": self.kind, "before": self.before, "after": self.after}

    def __str__(self) -> str:
        def fmt(d: dict[str, Any] | None) -> str:
            if d is None:
                return "-"
            args = d.get("args") or {}
            short = ", ".join(f"{k}={v}" for k, v in args.items() if k not in _CONV_FIXED)
            return f"{d['type'].rsplit('.', 1)[-1]}({short})"

        return f"{self.name or '<root>'}: {self.kind} {fmt(self.before)} -> {fmt(self.after)}"


def _has_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _describe_one(module: nn.Module) -> dict[str, Any]:
    kind = type_name(type(module))
    spec = _SPECS.get(kind)
    return {"type": kind, "args": spec.describe(module)} if spec else {"type": kind}


@dataclass
class _Rebuilder:
    entries: dict[str, dict[str, Any]]
    what: str
    changes: list[Change] = field(default_factory=list)
    built: dict[str, nn.Module] = field(default_factory=dict)

    def fail(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.what} does not match the given model: {message}")

    def entry(self, name: str) -> dict[str, Any]:
        try:
            entry = self.entries[name]
        except KeyError:
            raise CheckpointError(f"{self.what} is corrupted: its manifest lists no module {name!r}") from None
        if "alias_of" not in entry and not isinstance(entry.get("type"), str):
            raise CheckpointError(f"{self.what} is corrupted: manifest entry {name!r} has no type")
        return entry

    def build_new(self, name: str, entry: dict[str, Any]) -> nn.Module:
        """Build a standard layer or container (and its children) from the manifest alone."""
        kind = entry["type"]
        if kind in _SPECS:
            try:
                module = _SPECS[kind].build(entry["args"])
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"{self.what} is corrupted: cannot build {kind} {name!r} ({exc})") from exc
        elif kind in _CONTAINERS:
            module = _CONTAINERS[kind]()
            for key in entry.get("children", []):
                if key in entry.get("empty", []):
                    module._modules[key] = None
                    continue
                child_name = _join(name, key)
                module.add_module(key, self.sync(child_name, self.entry(child_name), None))
        else:
            raise self.fail(
                f"module {name!r} of type {kind} is in the file but not in the given model, and mslim rebuilds "
                f"only standard layers ({', '.join(t.rsplit('.', 1)[-1] for t in REBUILDABLE_TYPES)}); "
                "was the file made from another model?"
            )
        module.training = bool(entry.get("training", False))
        return module

    def sync(self, name: str, entry: dict[str, Any], current: nn.Module | None) -> nn.Module:
        """The module to place at ``name``: ``current`` when it matches the entry, else a rebuilt one."""
        if "alias_of" in entry:
            target = entry["alias_of"]
            if target not in self.built:
                raise CheckpointError(f"{self.what} is corrupted: {name!r} aliases unknown module {target!r}")
            return self.built[target]
        kind = entry["type"]
        current_kind = type_name(type(current)) if current is not None else None
        label = name or "the model itself"
        if kind in _SPECS and current is not None and current_kind == kind:
            spec = _SPECS[kind]
            have = spec.describe(current)
            want = entry.get("args", {})
            for key in spec.fixed:
                if key in want and have.get(key) != want[key]:
                    raise self.fail(
                        f"{label} ({kind.rsplit('.', 1)[-1]}) has {key}={have.get(key)} in the model but "
                        f"{want[key]} in the file; pruning never changes {key}, so the file was made from another model"
                    )
            if have == want:
                result = current
            else:
                result = self.build_new(name, entry)
                self.changes.append(Change(name, "resized", {"type": kind, "args": have}, {"type": kind, "args": want}))
        elif (kind in _SPECS or kind in _CONTAINERS) and current_kind != kind:
            if current is not None and kind != "torch.nn.Identity" and not _has_state(current):
                raise self.fail(
                    f"type mismatch at {label}: the file has {kind} where the model has a parameter-free "
                    f"{current_kind}; pruning and fusion only replace layers that hold weights"
                )
            result = self.build_new(name, entry)
            after = {"type": kind, **({"args": entry["args"]} if "args" in entry else {})}
            before = _describe_one(current) if current is not None else None
            self.changes.append(Change(name, "added" if current is None else "replaced", before, after))
        else:
            if current is None:
                raise self.fail(
                    f"module {label} ({kind}) is in the file but missing from the given model; "
                    "was the file made from another model?"
                )
            if current_kind != kind:
                raise self.fail(
                    f"type mismatch at {label}: the file has {kind}, the model has {current_kind}; mslim rebuilds only "
                    f"standard layers ({', '.join(t.rsplit('.', 1)[-1] for t in REBUILDABLE_TYPES)})"
                )
            result = current
            self.sync_children(name, entry, current)
        result.training = bool(entry.get("training", result.training))
        self.built[name] = result
        return result

    def sync_children(self, name: str, entry: dict[str, Any], module: nn.Module) -> None:
        saved = list(entry.get("children", []))
        empty = set(entry.get("empty", []))
        fresh = list(module._modules)
        if isinstance(module, tuple(_CONTAINERS.values())):
            # a container runs its children in order: only nn.Identity may be added to one
            core = [
                k for k in saved
                if k in fresh or k in empty or self.entry(_join(name, k)).get("type") != "torch.nn.Identity"
            ]
            if core != fresh:
                raise self.fail(
                    f"{name or 'the model itself'} ({type(module).__name__}) holds modules {_keys(fresh)} in the "
                    f"given model but {_keys(saved)} in the file; was the file made from another model "
                    "(another depth or width)?"
                )
        for key in fresh:
            if key not in saved:
                child_name = _join(name, key)
                old = module._modules[key]
                if old is not None:
                    self.changes.append(Change(child_name, "removed", _describe_one(old), None))
                del module._modules[key]
        for key in saved:
            child_name = _join(name, key)
            old = module._modules.get(key)
            if key in empty:
                if old is not None:
                    self.changes.append(Change(child_name, "removed", _describe_one(old), None))
                module.__dict__.pop(key, None)
                module._modules[key] = None
                continue
            new = self.sync(child_name, self.entry(child_name), old)
            if new is not old:
                module.__dict__.pop(key, None)
                module._modules[key] = new
        # the file's child order (a Sequential runs in this order)
        reordered = {key: module._modules[key] for key in saved}
        module._modules.clear()
        module._modules.update(reordered)


def _join(name: str, key: str) -> str:
    return f"{name}.{key}" if name else key


def _keys(keys: list[str]) -> str:
    return "[" + ", ".join(keys[:8]) + (f", ... {len(keys)} in all" if len(keys) > 8 else "") + "]"


def rebuild_modules(model: nn.Module, entries: list[dict[str, Any]], what: str = "the file") -> tuple[nn.Module, list[Change]]:
    """Make ``model``'s module tree match ``entries`` (from ``describe_modules``), in place.

    Returns the model (a new object only when the root itself is a rebuilt layer) and the
    changes applied. Raises CheckpointError when the tree cannot come from this model;
    call it on a copy: a failure can leave the model half changed.
    """
    if not entries or not isinstance(entries, list) or entries[0].get("name") != "":
        raise CheckpointError(f"{what} is corrupted: its module list does not start with the model itself")
    by_name: dict[str, dict[str, Any]] = {}
    for item in entries:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise CheckpointError(f"{what} is corrupted: a module entry is not an object with a name")
        by_name[item["name"]] = item
    rebuilder = _Rebuilder(by_name, what)
    root = rebuilder.sync("", rebuilder.entry(""), model)
    return root, rebuilder.changes
