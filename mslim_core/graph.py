"""The channel graph: which output channels of a model can be removed, and removing them safely.

:class:`ChannelGraph` traces the model once with torch-pruning's ``DependencyGraph`` and lists
*units*: one per group of coupled output channels, rooted at a conv or linear layer. Removing
channels of a unit (``remove_channels``) shrinks every layer that produces, normalises or reads
those channels (next convs, a linear after flatten, concat slots, split chunks, depthwise convs,
grouped convs). Ops that move channels (channel shuffle, pixel shuffle, a transpose of the
channel dimension) are found while tracing; units whose channels pass through them are refused
with a reason that names the op, instead of being pruned into a wrong model.
"""

from __future__ import annotations

import difflib
import itertools
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch_pruning import ops
from torch_pruning.dependency import Node

from mslim_core.channel_routes import install_flatten_mapping, install_route_mappings, is_concat, is_split
from mslim_core.errors import GraphError, UnsupportedOpWarning
from mslim_core.op_audit import OpRecord, OpRecorder
from mslim_core.removal import Removal, check_int_list, removals_from_json, validate_indices
from mslim_core.tracing import first_sample, preserved_modes

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)
_OP_TYPES = (
    ops._ConcatOp,
    ops._SplitOp,
    ops._ReshapeOp,
    ops._ElementWiseOp,
    ops._SliceOp,
    ops._UnbindOp,
    ops._ExpandOp,
    ops._OutputOp,
)

# member roles
PRODUCER, DEPTHWISE, NORM, CONSUMER, ACT, PARAM = "producer", "depthwise", "norm", "consumer", "act", "param"
OUT_ROLES = frozenset({PRODUCER, DEPTHWISE, NORM, ACT, PARAM})


@dataclass(eq=False)
class Member:
    """One layer (or free parameter) a unit touches, with its channel correspondence.

    ``unit_idx[k]`` (a channel of the unit) maps to ``idx[k]`` of this member: an output channel
    for the out roles (producer, depthwise, norm, act, param), an input channel (or input feature,
    for a linear after flatten) for consumers. Indices are those at graph build time.
    """

    name: str
    role: str
    unit_idx: Tensor
    idx: Tensor


@dataclass(eq=False)
class Unit:
    """One prunable channel group rooted at a producer layer (a conv or linear)."""

    name: str  # qualified module name of the root producer
    module: nn.Module  # the root producer
    norm_name: str | None  # norm layer applied directly (and only) to the root's output, if any
    channels: int  # current number of output channels of the root
    independent: bool  # the root is the only output-channel producer of its group
    producers: tuple[str, ...]  # every conv/linear whose OUTPUT channels are in the group (root first)
    depthwise: tuple[str, ...]  # depthwise convs that follow (in/out/groups shrink with the unit)
    consumers: tuple[str, ...]  # conv/linear layers whose INPUT channels shrink (depthwise excluded)
    norms: tuple[str, ...]  # every norm layer in the group
    consumer_features: dict[str, int]  # input features each consumer loses per removed channel
    channel_groups: int = 1  # >1: channels are tied in this many equal blocks (grouped convs)
    chunks: int = 1  # >1: channels pass a chunk(n); each removal takes as many from every chunk
    reads_input: bool = False  # the root reads the model input with no layer before it (a stem)
    members: tuple[Member, ...] = field(default=(), repr=False)
    original_channels: int = field(default=0, repr=False)  # channels at graph build time
    _ties: Tensor | None = field(default=None, repr=False)  # tie label per original channel
    _chunk_labels: tuple[Tensor, ...] = field(default=(), repr=False)  # chunk id per original channel (-1: none)

    @property
    def coupled(self) -> bool:
        """True when several producers share these channels (e.g. through a residual add)."""
        return not self.independent


def _is_layer(node: Node) -> bool:
    return not isinstance(node.module, _OP_TYPES) and not isinstance(node.module, nn.Parameter)


def _fn(node: Node) -> Any:
    """The node's autograd node (also behind the stand-in a reshape node gets)."""
    return getattr(node.grad_fn, "original", node.grad_fn)


def _out_count(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    return module.out_channels


class ChannelGraph:
    """Prunable units of a model and physical channel removal that keeps every layer consistent.

    ``example_inputs``: a tensor or a tuple/list of tensors shaped like one batch (only the first
    sample is used). ``ignored_layers`` (names or modules; a container ignores all its layers):
    layers whose output channels must not be removed; a coupled group with an ignored producer
    is not a unit. ``strict=True`` raises GraphError when an op that moves channels makes some
    layer unprunable, instead of warning.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        ignored_layers: Iterable[str | nn.Module] = (),
        *,
        strict: bool = False,
    ) -> None:
        self.model = model
        self._names = {m: n for n, m in model.named_modules()}
        self._ignored = self._resolve_ignored(ignored_layers)
        self.units: list[Unit] = []
        self.skipped: dict[str, str] = {}  # producer name -> why it is not (part of) a unit
        self.history: list[Removal] = []
        self._orig_out: dict[str, Tensor] = {}  # out-role member -> original indices still present
        self._trace(example_inputs)
        self._find_units()
        unsupported = {n: r for n, r in self.skipped.items() if r.startswith("its channels pass through")}
        if unsupported:
            lines = "; ".join(f"'{n}': {r}" for n, r in unsupported.items())
            msg = f"{len(unsupported)} layer(s) cannot be pruned: {lines}"
            if strict:
                raise GraphError(msg)
            warnings.warn(msg, UnsupportedOpWarning, stacklevel=2)

    # ------------------------------------------------------------------ building
    def _resolve_ignored(self, layers: Iterable[str | nn.Module]) -> set[str]:
        by_name = dict(self.model.named_modules())
        out: set[str] = set()
        for layer in layers:
            if isinstance(layer, nn.Module):
                if layer not in self._names:
                    raise GraphError(f"ignored_layers holds a {type(layer).__name__} that is not part of the model")
                name = self._names[layer]
            elif isinstance(layer, str):
                if layer not in by_name:
                    close = difflib.get_close_matches(layer, sorted(by_name), n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else ""
                    raise GraphError(f"ignored_layers names {layer!r}, which is not a layer of the model{hint}")
                name = layer
            else:
                raise GraphError(f"ignored_layers entries must be layer names or modules, got {layer!r}")
            out.update(self._names[m] for m in by_name[name].modules())
        return out

    def _trace(self, example_inputs: Any) -> None:
        inputs = tuple(
            t.detach().clone().requires_grad_(t.is_floating_point()) for t in first_sample(example_inputs)
        )
        recorder = OpRecorder(inputs)
        module_of_fn: dict[Any, str] = {}

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            for t in _flat_tensors(output):
                if t.grad_fn is not None:
                    module_of_fn.setdefault(t.grad_fn, self._names.get(module, ""))

        outputs: list[Any] = []

        def forward(model: nn.Module, xs: tuple[Tensor, ...]) -> Any:
            with recorder:
                out = model(*xs)
            outputs.append(out)
            return out

        handles = [m.register_forward_hook(hook) for n, m in self.model.named_modules() if n]
        dg = tp.DependencyGraph()
        try:
            with preserved_modes(self.model), torch.enable_grad():
                dg.build_dependency(self.model, example_inputs=inputs, forward_fn=forward, verbose=False)
        except GraphError:
            raise
        except Exception as exc:
            shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
            raise GraphError(
                f"could not trace the model on example inputs of shape {shapes}: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            for h in handles:
                h.remove()
        self.dg = dg
        self._records: dict[Any, OpRecord] = recorder.records
        self._module_of_fn = module_of_fn
        self._output_fns = {t.grad_fn for t in _flat_tensors(outputs[0]) if t.grad_fn is not None} if outputs else set()
        self._data_fns = _data_path_fns([n.grad_fn for n in dg.module2node.values()], inputs)
        self._tainted = self._audit_ops()

    def _describe(self, node: Node) -> str:
        rec = self._records.get(_fn(node))
        op = rec.name if rec else type(_fn(node)).__name__
        where = self._module_of_fn.get(_fn(node))
        if where:
            mod = dict(self.model.named_modules())[where]
            return f"'{where}' ({type(mod).__name__}, op {op})"
        up = self._nearest_layer(node)
        return f"op '{op}'" + (f" after layer '{up}'" if up else "")

    def _nearest_layer(self, node: Node) -> str | None:
        seen, stack = set(), list(node.inputs)
        while stack:
            n = stack.pop(0)
            if n in seen:
                continue
            seen.add(n)
            if _is_layer(n):
                return self._names.get(n.module)
            stack.extend(n.inputs)
        return None

    def _audit_ops(self) -> dict[Node, str]:
        """Nodes whose channels torch-pruning would map wrongly, with the reason."""
        tainted: dict[Node, str] = {}
        special: list[Node] = []
        reshapes: list[tuple[Node, int]] = []
        for node in self.dg.module2node.values():
            if _is_layer(node) or isinstance(node.module, ops._OutputOp):
                continue
            if _fn(node) not in self._data_fns:
                continue  # computed from parameters only (e.g. a weight transpose inside F.linear)
            rec = self._records.get(_fn(node))
            if rec is None:
                reason = self._unrecorded(node)
                if reason:
                    tainted[node] = reason
                continue
            if rec.verdict:
                tainted[node] = f"{self._describe(node)}, which {rec.verdict}"
                continue
            if is_concat(node) or is_split(node):
                sizes = list(rec.channel_sizes)
                if not sizes:
                    tainted[node] = f"{self._describe(node)}, which works on a non-channel dimension"
                    continue
                if is_concat(node):
                    node.module.concat_sizes = sizes
                else:
                    node.module.split_sizes = sizes
                special.append(node)
            if node.type == ops.OPTYPE.RESHAPE:
                reshapes.append((node, rec.feature_stride))
        for node, why in install_route_mappings(self.dg, special).items():
            tainted.setdefault(node, f"{self._describe(node)}, with {why}")
        for node, stride in reshapes:
            if node not in tainted:
                install_flatten_mapping(node, stride)
        return tainted

    def _unrecorded(self, node: Node) -> str | None:
        """An autograd node no torch call produced (inside a composite op, or a custom Function)."""
        seen, stack = set(), list(node.outputs)
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if _is_layer(n) or isinstance(n.module, ops._OutputOp):
                break
            if _fn(n) in self._records:
                continue  # the composite's result is judged itself
            stack.extend(n.outputs)
        else:
            if seen:
                return None
        return f"{self._describe(node)}, which is an operation the channel analysis does not know"

    def _find_units(self) -> None:
        order = {m: i for i, m in enumerate(self._names)}
        roots = [
            n.module
            for n in self.dg.module2node.values()
            if _is_layer(n)
            and isinstance(n.module, (nn.modules.conv._ConvNd, nn.Linear))
            and n.type != ops.OPTYPE.DEPTHWISE_CONV
        ]
        roots.sort(key=lambda m: order.get(m, len(order)))
        covered: dict[nn.Module, set[int]] = {}
        for root in roots:
            count = _out_count(root)
            if len(covered.get(root, ())) >= count:
                continue
            pruner = self.dg.get_pruner_of_module(root)
            group = self.dg.get_pruning_group(root, pruner.prune_out_channels, list(range(count)))
            unit, reason, producers = self._analyse(root, group)
            for dep, idxs in group.items:
                if self._is_out_item(dep) and isinstance(dep.target.module, nn.Module):
                    covered.setdefault(dep.target.module, set()).update(idxs)
            if unit is None:
                for p in producers:
                    self.skipped.setdefault(p, reason)
                continue
            self.units.append(unit)
            for m in unit.members:
                if m.role in OUT_ROLES and m.name not in self._orig_out:
                    # a layer with no channel dimension of its own (a shared scalar PReLU) follows the unit
                    count = self._member_out_count(m.name)
                    self._orig_out[m.name] = torch.arange(unit.channels if count is None else count, dtype=torch.long)

    def _is_out_item(self, dep: Any) -> bool:
        """Does this group item shrink the OUTPUT channels of its target?"""
        node = dep.target
        pruner = self.dg.get_pruner_of_module(node.module) if not isinstance(node.module, nn.Parameter) else None
        if isinstance(node.module, (nn.modules.conv._ConvNd, nn.Linear)) and node.type != ops.OPTYPE.DEPTHWISE_CONV:
            return dep.handler == pruner.prune_out_channels
        return _is_layer(node) or isinstance(node.module, nn.Parameter)

    def _member_name(self, node: Node) -> str:
        if isinstance(node.module, nn.Parameter):
            return self.dg._param_to_name.get(node.module, "<parameter>")
        return self._names.get(node.module, "<unnamed>")

    def _member_out_count(self, name: str) -> int | None:
        for node in self.dg.module2node.values():
            if self._member_name(node) == name:
                count = self.dg.get_out_channels(node)
                return None if count is None else int(count)
        raise GraphError(f"no layer named {name!r} in the graph")

    def _analyse(self, root: nn.Module, group: Any) -> tuple[Unit | None, str, list[str]]:
        """Turn one full-index group into a Unit, or give the reason it cannot be one."""
        root_name = self._names[root]
        count = _out_count(root)
        members: list[Member] = []
        reasons: list[str] = []
        quiet: str | None = None
        grouped: list[tuple[str, int, int, Tensor, Tensor]] = []  # (name, groups, block, unit_idx, idx)
        chunk_labels: list[Tensor] = []
        for item in group.items:
            dep, idxs = item.dep, list(item.idxs)
            unit_idx = torch.tensor(list(item.root_idxs), dtype=torch.long)
            idx = torch.tensor(idxs, dtype=torch.long)
            node, mod = dep.target, dep.target.module
            if node in self._tainted:
                reasons.append(f"its channels pass through {self._tainted[node]}")
                continue
            out_item = self._is_out_item(dep)
            carries = out_item or not _is_layer(node)  # this node's output holds the unit's channels
            if carries and (_fn(node) in self._output_fns or isinstance(mod, ops._OutputOp)):
                quiet = "its channels are model outputs (final classifier or head layer)"
                continue
            if is_split(node):
                labels = _chunk_labels(count, node.module.split_sizes, unit_idx, idx)
                if labels is None:
                    reasons.append(
                        f"its channels share {self._describe(node)} with channels of other layers, so its "
                        "chunks could not stay equal"
                    )
                else:
                    chunk_labels.append(labels)
                continue
            if not _is_layer(node):
                if isinstance(mod, nn.Parameter):
                    members.append(Member(self._member_name(node), PARAM, unit_idx, idx))
                continue
            name = self._names.get(mod, "<unnamed>")
            if isinstance(mod, nn.modules.conv._ConvNd):
                if node.type == ops.OPTYPE.DEPTHWISE_CONV and mod.in_channels != mod.out_channels:
                    reasons.append(
                        f"grouped conv '{name}' has groups == out_channels != in_channels, a shape channel "
                        "removal cannot keep"
                    )
                    continue
                if node.type == ops.OPTYPE.DEPTHWISE_CONV:
                    if not node.inputs:
                        reasons.append(f"depthwise conv '{name}' reads the model input, whose channels are fixed")
                    role = DEPTHWISE
                else:
                    role = PRODUCER if out_item else CONSUMER
                    if mod.groups > 1:
                        size = mod.out_channels if out_item else mod.in_channels
                        grouped.append((name, mod.groups, size // mod.groups, unit_idx, idx))
            elif isinstance(mod, nn.Linear):
                role = PRODUCER if out_item else CONSUMER
            elif isinstance(mod, nn.GroupNorm) and mod.num_groups != mod.num_channels:
                reasons.append(f"GroupNorm '{name}' normalises over several channels together")
                continue
            elif isinstance(mod, nn.LayerNorm):
                reasons.append(f"LayerNorm '{name}' normalises across channels")
                continue
            elif isinstance(mod, _NORMS):
                role = NORM
            elif isinstance(mod, nn.PReLU):
                role = ACT
            else:
                reasons.append(f"layer '{name}' ({type(mod).__name__}) is not supported by channel pruning")
                continue
            members.append(Member(name, role, unit_idx, idx))

        order = {n: i for i, n in enumerate(self._names.values())}
        producers = sorted({m.name for m in members if m.role == PRODUCER}, key=lambda n: order.get(n, 0))
        if root_name in producers:
            producers.remove(root_name)
        producers.insert(0, root_name)
        ignored = [p for p in producers if p in self._ignored]
        if ignored:
            return None, f"ignored (ignored_layers contains '{ignored[0]}')", producers
        if reasons:
            return None, reasons[0], producers
        if quiet:
            return None, quiet, producers
        ties, groups_or_reason = _tie_channels(count, grouped)
        if isinstance(groups_or_reason, str):
            return None, groups_or_reason, producers

        def names(role: str) -> tuple[str, ...]:
            seen = sorted({m.name for m in members if m.role == role}, key=lambda n: order.get(n, 0))
            return tuple(seen)

        features: dict[str, int] = {}
        for m in members:
            if m.role == CONSUMER:
                n_unit = max(1, int(torch.unique(m.unit_idx).numel()))
                features[m.name] = max(1, round(int(torch.unique(m.idx).numel()) / n_unit))
        root_node = self.dg.module2node[root]
        norm_name = None
        if len(root_node.outputs) == 1 and isinstance(root_node.outputs[0].module, _NORMS):
            norm_name = self._names.get(root_node.outputs[0].module)
        unit = Unit(
            reads_input=self._nearest_layer(root_node) is None,
            name=root_name,
            module=root,
            norm_name=norm_name,
            channels=count,
            independent=len(producers) == 1,
            producers=tuple(producers),
            depthwise=names(DEPTHWISE),
            consumers=names(CONSUMER),
            norms=names(NORM),
            consumer_features=features,
            channel_groups=groups_or_reason,
            members=tuple(members),
            original_channels=count,
            chunks=max([int(lab.max()) + 1 for lab in chunk_labels], default=1),
            _ties=ties,
            _chunk_labels=tuple(chunk_labels),
        )
        return unit, "", producers

    # ------------------------------------------------------------------ queries
    def unit(self, name: str) -> Unit:
        """The unit rooted at layer `name`; GraphError says why when that layer is not prunable."""
        for u in self.units:
            if u.name == name:
                return u
        if name in self.skipped:
            raise GraphError(f"layer '{name}' cannot be pruned: {self.skipped[name]}")
        for u in self.units:
            if name in u.producers:
                raise GraphError(
                    f"layer '{name}' is a coupled producer of unit '{u.name}'; remove channels through that unit"
                )
        names = [u.name for u in self.units]
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.4) or names[:10]
        more = ", ..." if len(close) < len(names) else ""
        raise GraphError(
            f"no prunable unit named {name!r}; the graph has {len(names)} units: {', '.join(close)}{more}"
        )

    def independent_units(self) -> list[Unit]:
        """Units whose root is the only producer of its channels (what ResRep gives a compactor)."""
        return [u for u in self.units if u.independent]

    def coupled_units(self) -> list[Unit]:
        """Units whose channels are shared by several producers (e.g. through residual adds)."""
        return [u for u in self.units if not u.independent]

    def _resolve(self, unit: Unit | str) -> Unit:
        if isinstance(unit, str):
            return self.unit(unit)
        if isinstance(unit, Unit):
            if not any(u is unit for u in self.units):
                raise GraphError(f"unit '{unit.name}' does not belong to this ChannelGraph")
            return unit
        raise GraphError(f"expected a Unit or a unit name, got {type(unit).__name__}")

    def original_indices(self, unit: Unit | str) -> Tensor:
        """Build-time channel ids of the unit's current channels (position i = current channel i)."""
        u = self._resolve(unit)
        return self._orig_out[u.name].clone()

    def tied_channels(self, unit: Unit | str, idxs: Sequence[int] | Tensor) -> Tensor:
        """`idxs` (current indexing) completed with every channel tied to them by grouped convs."""
        u = self._resolve(unit)
        values = torch.tensor(check_int_list(idxs, f"unit '{u.name}'"), dtype=torch.long)
        if u._ties is None or u.channel_groups == 1:
            return torch.unique(values)
        labels = u._ties[self._orig_out[u.name]]
        return torch.nonzero(torch.isin(labels, labels[values])).flatten()

    def tie_classes(self, unit: Unit | str) -> Tensor:
        """The unit's tie classes: a (num_classes, class_size) int64 tensor of current channel indices.

        Channels tied by grouped convs share a row (each row sorted, rows sorted by their first
        index); a removal takes whole rows. An untied unit has one row per channel.
        """
        u = self._resolve(unit)
        if u._ties is None or u.channel_groups == 1:
            return torch.arange(u.channels, dtype=torch.long).unsqueeze(1)
        labels = u._ties[self._orig_out[u.name]]
        _, cls = torch.unique(labels, return_inverse=True)
        order = torch.sort(cls, stable=True).indices  # channels grouped by class, ascending within each
        rows = order.reshape(-1, u.channel_groups)
        return rows[torch.argsort(rows[:, 0])]

    def channel_blocks(self, unit: Unit | str) -> list[Tensor]:
        """Current channels of the unit split into the blocks a removal must take equally from.

        One block (all channels) unless the unit passes a ``chunk(n)``; then n blocks, one per chunk.
        """
        u = self._resolve(unit)
        if not u._chunk_labels:
            return [torch.arange(u.channels)]
        current = u._chunk_labels[0][self._orig_out[u.name]]
        return [torch.nonzero(current == k).flatten() for k in range(u.chunks)]

    def removed_channels(self) -> dict[str, Tensor]:
        """Per unit, the build-time indices of channels removed so far (units with none left out)."""
        out: dict[str, Tensor] = {}
        for u in self.units:
            kept = self._orig_out[u.name]
            if kept.numel() < u.original_channels:
                mask = torch.ones(u.original_channels, dtype=torch.bool)
                mask[kept] = False
                out[u.name] = torch.nonzero(mask).flatten()
        return out

    def kept_channels(self) -> dict[str, Tensor]:
        """Per layer with removable output channels, the build-time indices of its channels that remain."""
        return {name: ids.clone() for name, ids in self._orig_out.items()}

    def group(self, unit: Unit | str, idxs: Sequence[int] | Tensor | None = None) -> Any:
        """torch-pruning's Group for the unit (all channels by default), e.g. for importance scores."""
        u = self._resolve(unit)
        values = list(range(u.channels)) if idxs is None else check_int_list(idxs, f"unit '{u.name}'")
        pruner = self.dg.get_pruner_of_module(u.module)
        return self.dg.get_pruning_group(u.module, pruner.prune_out_channels, values)

    # ------------------------------------------------------------------ removal
    def remove_channels(self, unit: Unit | str, idxs: Sequence[int] | Tensor) -> None:
        """Physically remove output channels `idxs` (current indexing) of a unit; every layer follows.

        Raises GraphError for duplicate or out-of-range indices, for removing every channel, for
        breaking a grouped conv's equal groups (see ``tied_channels``), or when a layer of the
        group would be left with no channels. The graph stays valid for further removals.
        """
        u = self._resolve(unit)
        values = validate_indices(idxs, u.channels, u.name)
        if not values:
            return
        if u.channel_groups > 1:
            tied = self.tied_channels(u, values)
            if tied.numel() != len(values):
                missing = sorted(set(tied.tolist()) - set(values))
                raise GraphError(
                    f"unit '{u.name}' feeds a grouped conv: channels come in {u.channel_groups} tied blocks, "
                    f"so channels {missing[:10]} must be removed together with {values[:10]} "
                    "(use ChannelGraph.tied_channels to complete the set)"
                )
        self._check_chunks(u, values)
        pruner = self.dg.get_pruner_of_module(u.module)
        group = self.dg.get_pruning_group(u.module, pruner.prune_out_channels, values)
        self._check_group(u, group)
        flags = {n: p.requires_grad for n, p in self.model.named_parameters()}
        out_updates = []
        for dep, member_idxs in group.items:
            if self._is_out_item(dep):
                name = self._member_name(dep.target)
                if name in self._orig_out:
                    out_updates.append((name, list(member_idxs)))
        group.prune()
        for name, member_idxs in out_updates:
            keep = torch.ones(self._orig_out[name].numel(), dtype=torch.bool)
            keep[torch.tensor(member_idxs, dtype=torch.long)] = False
            self._orig_out[name] = self._orig_out[name][keep]
        for n, p in self.model.named_parameters():
            p.requires_grad_(flags.get(n, True))
        for other in self.units:
            other.channels = _out_count(other.module)
        self.history.append(Removal(u.name, tuple(values)))

    def _check_chunks(self, unit: Unit, values: list[int]) -> None:
        for labels in unit._chunk_labels:
            current = labels[self._orig_out[unit.name]]
            n = int(labels.max()) + 1
            sel = current[torch.tensor(values, dtype=torch.long)]
            counts = torch.bincount(sel[sel >= 0], minlength=n)
            if int(counts.min()) != int(counts.max()):
                blocks = [torch.nonzero(current == k).flatten().tolist() for k in range(n)]
                raise GraphError(
                    f"unit '{unit.name}' passes through chunk({n}): remove the same number of channels from "
                    f"each chunk (chunk channels: {blocks}); these indices remove {counts.tolist()}"
                )

    def _check_group(self, unit: Unit, group: Any) -> None:
        for dep, member_idxs in group.items:
            node = dep.target
            if not (_is_layer(node) or isinstance(node.module, nn.Parameter)):
                continue
            out = self._is_out_item(dep)
            have = self.dg.get_out_channels(node) if out else self.dg.get_in_channels(node)
            if have is None:
                continue
            if any(i < 0 or i >= have for i in member_idxs):
                raise GraphError(
                    f"internal channel mapping error: unit '{unit.name}' maps to channels outside "
                    f"'{self._member_name(node)}' ({have} channels); the model is left unchanged"
                )
            if len(set(member_idxs)) >= have:
                side = "output" if out else "input"
                raise GraphError(
                    f"removing these channels of unit '{unit.name}' would leave '{self._member_name(node)}' "
                    f"with no {side} channels; keep at least one of the channels that reach it"
                )

    def replay(self, removals: Iterable[Removal | Sequence[Any]]) -> None:
        """Apply a removal record (``history`` of another graph, or its JSON form) in order."""
        for r in removals_from_json(list(removals)):
            self.remove_channels(r.unit, list(r.indices))

    def apply_removed(self, removed: Mapping[str, Sequence[int] | Tensor]) -> None:
        """Remove channels given per unit in build-time indexing (as ``removed_channels`` returns)."""
        for name, ids in removed.items():
            u = self.unit(name)
            want = torch.tensor(check_int_list(ids, f"unit '{name}'"), dtype=torch.long)
            current = torch.nonzero(torch.isin(self._orig_out[u.name], want)).flatten()
            if current.numel():
                self.remove_channels(u, current)

    def __repr__(self) -> str:
        n_ind = len(self.independent_units())
        return f"ChannelGraph({len(self.units)} units: {n_ind} independent, {len(self.units) - n_ind} coupled)"


def _flat_tensors(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _flat_tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _flat_tensors(o)]
    return []


def _chunk_labels(count: int, sizes: Sequence[int], unit_idx: Tensor, idx: Tensor) -> Tensor | None:
    """Chunk number per unit channel (-1: not in the chunked tensor), or None when the chunked
    tensor also holds channels from outside the unit (then equal chunks cannot be kept)."""
    total = int(sum(sizes))
    if torch.unique(idx).numel() != total or torch.unique(unit_idx).numel() != unit_idx.numel():
        return None
    bounds = torch.tensor(list(itertools.accumulate(sizes))[:-1], dtype=torch.long)
    labels = torch.full((count,), -1, dtype=torch.long)
    labels[unit_idx] = torch.bucketize(idx, bounds, right=True)
    return labels


def _data_path_fns(fns: Iterable[Any], inputs: Sequence[Tensor]) -> set[Any]:
    """The autograd nodes among (and above) `fns` that depend on the model inputs."""
    input_ids = {id(t) for t in inputs}
    memo: dict[Any, bool] = {}
    for start in fns:
        stack: list[tuple[Any, bool]] = [(start, False)]
        while stack:
            fn, expanded = stack.pop()
            if fn is None or (fn in memo and not expanded):
                continue
            nexts = [f for f, _ in getattr(fn, "next_functions", ()) if f is not None]
            if not nexts:
                var = getattr(fn, "variable", None)
                memo[fn] = var is not None and id(var) in input_ids
                continue
            if expanded:
                memo[fn] = any(memo.get(f, False) for f in nexts)
                continue
            stack.append((fn, True))
            stack.extend((f, False) for f in nexts if f not in memo)
    return {fn for fn, flag in memo.items() if flag}


def _tie_channels(count: int, grouped: list[tuple[str, int, int, Tensor, Tensor]]) -> tuple[Tensor | None, int | str]:
    """Tie labels per unit channel from grouped-conv members, and the common tie-class size.

    A grouped conv keeps equal groups only if the same in-group position is removed from every
    group, so unit channels landing on one position in different groups are tied. A position that
    some group receives from outside the unit can never be removed; such a unit is refused.
    """
    if not grouped:
        return None, 1
    parent = list(range(count + 1))  # count = the "frozen" class

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(a: int, b: int) -> None:
        parent[find(a)] = find(b)

    for name, groups, block, unit_idx, idx in grouped:
        by_pos: dict[int, set[int]] = {}
        blocks: dict[int, set[int]] = {}
        for r, c in zip(unit_idx.tolist(), idx.tolist()):
            by_pos.setdefault(c % block, set()).add(r)
            blocks.setdefault(c % block, set()).add(c // block)
        for pos, roots in by_pos.items():
            first = next(iter(roots))
            for r in roots:
                union(first, r)
            if len(blocks[pos]) < groups:
                union(first, count)
    labels = torch.tensor([find(i) for i in range(count)], dtype=torch.long)
    frozen = find(count)
    if bool((labels == frozen).any()):
        names = ", ".join(sorted({g[0] for g in grouped}))
        return None, (
            f"its channels feed grouped conv(s) {names} in a pattern that cannot shrink every group equally"
        )
    sizes = torch.unique(labels, return_counts=True)[1]
    if int(sizes.min()) != int(sizes.max()):
        names = ", ".join(sorted({g[0] for g in grouped}))
        return None, f"its channels feed grouped conv(s) {names} with uneven channel groups"
    return labels, int(sizes[0])
