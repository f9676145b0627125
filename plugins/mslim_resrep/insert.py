"""Which convs get a compactor, and putting the compactors into the model.

A conv gets a compactor when the channel engine finds it is the only producer of its output
channels (an independent unit) and the compactor can later be folded away exactly:

- a plain ``nn.Conv2d`` with ``groups == 1`` (depthwise and other grouped convs never get one),
  called once per forward pass, whose channels are not tied in sets (by a grouped conv that
  reads them, or a ``chunk()``): the masks pick rows one by one;
- followed directly by a BatchNorm2d with running statistics that only it feeds, or by no norm
  at all (a norm further down the group, or another kind of norm, cannot be folded);
- not the stem (the conv that reads the model input) unless ``include_stem``;
- not in ``ignored_layers`` and not feeding the model output (the engine leaves those out).

The compactor goes after the BN (``conv -> BN -> compactor -> activation``), or right after the
conv when there is no BN: the BN (or conv) is replaced in its parent by a ``Compacted`` module
that applies it and then the compactor, wherever it sits (an attribute, an ``nn.Sequential``
entry, a ``ModuleList`` item).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mslim_core.graph import ChannelGraph, Unit
from mslim_core.tracing import first_sample, preserved_modes

from mslim_resrep.compactor import Compacted, Compactor

__all__ = ["CompactedUnit", "find_stems", "insert_compactors", "select_units"]


@dataclass
class CompactedUnit:
    """One conv that received a compactor, and where its pieces live in the wrapped model."""

    name: str
    """Qualified name of the conv in the original model (the engine's unit name)."""
    norm_name: str | None
    """Qualified name of the BN in the original model, or None when the compactor follows the conv."""
    channels: int
    compactor: Compactor

    @property
    def wrapper_name(self) -> str:
        """Where the ``Compacted`` module sits in the wrapped model."""
        return self.norm_name if self.norm_name is not None else self.name

    @property
    def conv_path(self) -> str:
        """Qualified name of the conv in the wrapped model."""
        return self.name if self.norm_name is not None else f"{self.name}.conv"

    @property
    def norm_path(self) -> str | None:
        """Qualified name of the BN in the wrapped model (None without BN)."""
        return f"{self.norm_name}.bn" if self.norm_name is not None else None

    @property
    def compactor_path(self) -> str:
        """Qualified name of the compactor in the wrapped model."""
        return f"{self.wrapper_name}.compactor"


def _foldable_bn(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.BatchNorm2d)
        and module.track_running_stats
        and module.running_mean is not None
        and module.running_var is not None
    )


def _upstream_layers(graph: ChannelGraph, module: nn.Module) -> bool:
    """True when some conv/linear layer lies upstream of `module` in the engine's traced graph."""
    node = graph.dg.module2node.get(module)
    if node is None:
        return True
    seen: set[int] = set()
    stack = list(node.inputs)
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if isinstance(n.module, (nn.modules.conv._ConvNd, nn.Linear)):
            return True
        stack.extend(n.inputs)
    return False


def find_stems(graph: ChannelGraph) -> set[str]:
    """Convs that read the model input (no conv or linear layer before them on any path)."""
    names = {m: n for n, m in graph.model.named_modules()}
    return {
        names[m]
        for m in graph.dg.module2node
        if isinstance(m, nn.modules.conv._ConvNd) and m in names and not _upstream_layers(graph, m)
    }


def _call_counts(model: nn.Module, example_inputs: Any) -> dict[str, int]:
    """How often each named module runs in one forward pass on a batch-1 slice."""
    counts: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(m: nn.Module, args: Any, out: Any, name: str = name) -> None:
            counts[name] = counts.get(name, 0) + 1

        handles.append(module.register_forward_hook(hook))
    try:
        with preserved_modes(model, train=False), torch.no_grad():
            model(*first_sample(example_inputs))
    finally:
        for h in handles:
            h.remove()
    return counts


def select_units(
    model: nn.Module,
    example_inputs: Any,
    ignored_layers: Iterable[str] = (),
    include_stem: bool = False,
) -> tuple[ChannelGraph, list[Unit], dict[str, str]]:
    """The engine's graph, the units that get a compactor (model order), and why other convs do not."""
    graph = ChannelGraph(model, example_inputs, ignored_layers=list(ignored_layers))
    modules = dict(model.named_modules())
    aliases: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        aliases[id(m)] = aliases.get(id(m), 0) + 1
    calls = _call_counts(model, example_inputs)
    stems = find_stems(graph)
    chosen: list[Unit] = []
    skipped: dict[str, str] = {}
    for unit in graph.units:
        conv = unit.module
        why = None
        if not unit.independent:
            why = "its output channels are shared with other producers (e.g. a residual add)"
        elif isinstance(conv, Compactor):
            why = "it is a compactor"
        elif not isinstance(conv, nn.Conv2d):
            why = f"it is a {type(conv).__name__}, not a Conv2d"
        elif conv.groups != 1:
            why = f"it is a grouped or depthwise conv (groups={conv.groups})"
        elif unit.channel_groups > 1 or unit.chunks > 1:
            why = (
                "its channels feed a grouped conv or pass a chunk(), so they can only be removed in tied sets, "
                "which per-row compactor masks do not keep"
            )
        elif unit.name in stems and not include_stem:
            why = "it is the stem (reads the model input); set include_stem=True to include it"
        elif calls.get(unit.name, 0) != 1 or aliases.get(id(conv), 0) != 1:
            why = f"it runs {calls.get(unit.name, 0)} times per forward pass or is shared"
        elif unit.norm_name is not None:
            norm = modules[unit.norm_name]
            if not _foldable_bn(norm):
                why = f"its norm '{unit.norm_name}' ({type(norm).__name__}) cannot be folded into the conv"
            elif calls.get(unit.norm_name, 0) != 1 or aliases.get(id(norm), 0) != 1:
                why = f"its norm '{unit.norm_name}' runs more than once or is shared"
        elif unit.norms:
            why = f"a norm ({unit.norms[0]}) acts on its channels after other layers; it cannot be folded"
        if why is None:
            chosen.append(unit)
        else:
            skipped[unit.name] = why
    skipped.update({name: why for name, why in graph.skipped.items() if name not in skipped})
    return graph, chosen, skipped


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    parent._modules[child] = module


def insert_compactors(model: nn.Module, units: Sequence[Unit]) -> list[CompactedUnit]:
    """Put an identity compactor after the BN (or conv) of each unit, in place; returns what was done."""
    done: list[CompactedUnit] = []
    for unit in units:
        conv = model.get_submodule(unit.name)
        target_name = unit.norm_name if unit.norm_name is not None else unit.name
        target = model.get_submodule(target_name)
        ref = conv.weight
        compactor = Compactor(int(conv.out_channels), device=ref.device, dtype=ref.dtype)
        compactor.train(target.training)
        wrapper = Compacted(target, compactor, "bn" if unit.norm_name is not None else "conv")
        wrapper.training = target.training
        _set_submodule(model, target_name, wrapper)
        done.append(CompactedUnit(unit.name, unit.norm_name, int(conv.out_channels), compactor))
    return done
