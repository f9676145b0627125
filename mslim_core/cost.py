"""Analytic cost of a model: multiply-accumulates (MACs) of conv/linear layers and parameters.

``count_cost`` counts a model once from the shapes seen on a batch-1 forward pass.
``CostModel`` turns those shapes into linear functions of the channel widths of the
prunable units, so the MACs after removing channels are known without touching the
model: ``macs(widths)`` for any widths (vectorised), and ``macs_after_removing`` /
``removal_delta`` in time proportional to the number of layers one unit touches.

Formulas (per call of the layer, summed over calls):
    conv            MACs = C_in * C_out * prod(kernel) * H_out * W_out / groups
    transposed conv MACs = C_in * C_out * prod(kernel) * H_in * W_in / groups
    linear          MACs = in * out * positions   (positions = input numel / in; 1 for a 2-D input)
Norms, activations, additions, pooling and biases are not counted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Protocol

import torch
from torch import nn

from mslim_core.errors import GraphError
from mslim_core.tracing import first_sample, preserved_modes

__all__ = ["Cost", "CostModel", "LayerShape", "count_cost", "layer_costs"]

_COUNTED = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass(frozen=True)
class Cost:
    """MACs of the conv/linear layers and the number of parameters of a whole model."""

    macs: int
    params: int

    def ratio(self, reference: Cost) -> tuple[float, float]:
        """(MACs ratio, params ratio) of this cost to a reference cost, e.g. pruned / original."""
        return (
            self.macs / reference.macs if reference.macs else float("nan"),
            self.params / reference.params if reference.params else float("nan"),
        )


@dataclass(frozen=True)
class LayerShape:
    """What one conv/linear layer looked like on the batch-1 run and what it costs."""

    name: str
    kind: str  # "conv", "conv_transpose" or "linear"
    in_features: int
    out_features: int
    groups: int
    kernel: tuple[int, ...]
    positions: int  # output positions (input positions for a transposed conv), summed over calls
    calls: int
    macs: int
    params: int  # the layer's own parameters (weight and bias)

    @property
    def kernel_positions(self) -> int:
        """prod(kernel) * positions: MACs per (input-per-group, output) channel pair."""
        return math.prod(self.kernel) * self.positions


def _layer_kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    return "conv_transpose" if getattr(module, "transposed", False) else "conv"


def _positions(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> int:
    if isinstance(module, nn.Linear):
        return output.numel() // module.out_features
    if getattr(module, "transposed", False):
        return inputs[0].numel() // module.in_channels
    return output.numel() // module.out_channels


def layer_costs(model: nn.Module, example_inputs: Any) -> dict[str, LayerShape]:
    """Shapes and MACs of every conv/linear layer, recorded with forward hooks on a batch-1 run.

    Layers that are never called get no entry; a layer called several times adds up its calls.
    The model's train/eval mode is restored afterwards and nothing is recorded for autograd.
    """
    inputs = first_sample(example_inputs)
    positions: dict[str, int] = {}
    calls: dict[str, int] = {}
    names: dict[nn.Module, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, _COUNTED) and module not in names:
            names[module] = name

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        name = names[module]
        positions[name] = positions.get(name, 0) + _positions(module, args, output)
        calls[name] = calls.get(name, 0) + 1

    handles = [m.register_forward_hook(hook) for m in names]
    try:
        with preserved_modes(model, train=False), torch.no_grad():
            try:
                model(*inputs)
            except Exception as exc:
                shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
                raise GraphError(
                    f"cannot count the cost: the model failed on example inputs of shape {shapes}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
    finally:
        for handle in handles:
            handle.remove()

    shapes_by_name: dict[str, LayerShape] = {}
    for module, name in names.items():
        if name not in positions:
            continue
        if isinstance(module, nn.Linear):
            cin, cout, groups, kernel = module.in_features, module.out_features, 1, ()
        else:
            cin, cout, groups = module.in_channels, module.out_channels, module.groups
            kernel = tuple(int(k) for k in module.kernel_size)
        pos = positions[name]
        shapes_by_name[name] = LayerShape(
            name=name,
            kind=_layer_kind(module),
            in_features=cin,
            out_features=cout,
            groups=groups,
            kernel=kernel,
            positions=pos,
            calls=calls[name],
            macs=cin * cout * math.prod(kernel) * pos // groups,
            params=sum(p.numel() for p in module.parameters(recurse=False)),
        )
    return shapes_by_name


def _reach(unit: Any, layer: str) -> Fraction:
    """The fraction of the unit's channels that reach ``layer`` (1 unless it reads e.g. one chunk of a
    ``chunk()``, whose chunks every removal shrinks equally), from the unit's member records."""
    total = int(getattr(unit, "original_channels", 0) or 0)
    parts = [m.unit_idx for m in getattr(unit, "members", ()) if m.name == layer and m.role in ("consumer", "depthwise")]
    if not parts or total <= 0:
        return Fraction(1)
    reached = int(torch.unique(torch.cat([torch.as_tensor(p).flatten() for p in parts])).numel())
    return Fraction(min(reached, total), total) if reached else Fraction(1)


def count_cost(model: nn.Module, example_inputs: Any) -> Cost:
    """Full analytic count: MACs of every conv/linear call on one sample, and all parameters."""
    macs = sum(s.macs for s in layer_costs(model, example_inputs).values())
    params = sum(p.numel() for p in model.parameters())
    return Cost(macs=int(macs), params=int(params))


class UnitLike(Protocol):
    """The part of ``mslim_core.graph.Unit`` the cost model reads."""

    name: str
    channels: int
    producers: tuple[str, ...]
    depthwise: tuple[str, ...]
    consumers: tuple[str, ...]
    norms: tuple[str, ...]
    consumer_features: dict[str, int]


@dataclass(eq=False)
class _Layer:
    """A conv/linear layer whose in/out widths are affine functions of the unit widths."""

    name: str
    kpos: int  # prod(kernel) * positions
    kprod: int  # prod(kernel)
    groups: int
    tied: bool  # depthwise: groups follow the input width, input per group stays `ipg`
    ipg: int  # input channels per group (used when tied)
    in0: int
    out0: int
    in_terms: tuple[tuple[int, int], ...]  # (unit index, features per channel times `den`)
    out_terms: tuple[tuple[int, int], ...]
    bias: bool
    den: int = 1  # the terms' common denominator (> 1 when a layer reads one chunk of a unit)

    def scaled_widths(self, w: Sequence[int]) -> tuple[int, int]:
        """(in, out) widths times ``den``."""
        in_w = self.in0 * self.den
        for u, c in self.in_terms:
            in_w += c * w[u]
        out_w = self.out0 * self.den
        for u, c in self.out_terms:
            out_w += c * w[u]
        return in_w, out_w

    def widths(self, w: Sequence[int]) -> tuple[int, int]:
        in_w, out_w = self.scaled_widths(w)
        return in_w // self.den, out_w // self.den

    def macs(self, w: Sequence[int]) -> int:
        in_w, out_w = self.widths(w)
        per_group = self.ipg if self.tied else in_w // self.groups
        return self.kpos * per_group * out_w


class CostModel:
    """MACs (and parameters) of a model as a function of the widths of its prunable units.

    Built once from a batch-1 run and the units of a ``ChannelGraph``; afterwards no
    query runs the model. Every layer's input and output widths are kept as affine
    functions of the unit widths, so a layer fed by one unit and producing another (or
    a concat consumer fed by several) is exact when all of them change.
    """

    def __init__(self, model: nn.Module, example_inputs: Any, units: Sequence[UnitLike]) -> None:
        self.units: list[UnitLike] = list(units)
        shapes = layer_costs(model, example_inputs)
        self.layer_shapes = shapes
        n_units = len(self.units)
        channels = [int(u.channels) for u in self.units]
        modules = dict(model.named_modules())

        in_coef: dict[str, dict[int, Fraction]] = {name: {} for name in shapes}
        out_coef: dict[str, dict[int, Fraction]] = {name: {} for name in shapes}
        tied = {
            name: s.kind != "linear" and s.groups > 1 and s.groups == s.in_features and s.out_features % s.groups == 0
            for name, s in shapes.items()
        }
        for ui, unit in enumerate(self.units):
            features = dict(getattr(unit, "consumer_features", {}) or {})
            roles = (
                [(n, "out") for n in unit.producers]
                + [(n, "dw") for n in getattr(unit, "depthwise", ())]
                + [(n, "in") for n in unit.consumers]
            )
            for name, role in roles:
                if name not in shapes:
                    continue  # never called on the example input: costs nothing
                s = shapes[name]
                if tied[name] or role == "dw":
                    if not tied[name]:
                        raise GraphError(
                            f"unit {unit.name!r} lists {name!r} as depthwise, but it has "
                            f"in={s.in_features}, groups={s.groups}; a depthwise conv has groups == in channels"
                        )
                    reach = _reach(unit, name)
                    in_coef[name][ui] = reach
                    out_coef[name][ui] = reach * (s.out_features // s.in_features)
                elif role == "out":
                    out_coef[name][ui] = Fraction(1)
                else:
                    in_coef[name][ui] = int(features.get(name, 1)) * _reach(unit, name)
        # one common denominator keeps every count an integer (1 unless a layer reads part of a unit)
        den = math.lcm(1, *(c.denominator for coef in (in_coef, out_coef) for cs in coef.values() for c in cs.values()))
        self._den = den

        self._layers: list[_Layer] = []
        for name, s in shapes.items():
            in0 = s.in_features - math.floor(sum(c * channels[u] for u, c in in_coef[name].items()))
            out0 = s.out_features - math.floor(sum(c * channels[u] for u, c in out_coef[name].items()))
            if in0 < 0 or out0 < 0:
                raise GraphError(
                    f"layer {name!r} has {s.in_features} inputs and {s.out_features} outputs, fewer than its "
                    f"units account for ({s.in_features - in0} and {s.out_features - out0}); the units do not "
                    "belong to this model or are out of date"
                )
            module = modules.get(name)
            self._layers.append(
                _Layer(
                    name=name,
                    kpos=s.kernel_positions,
                    kprod=math.prod(s.kernel),
                    groups=s.groups,
                    tied=tied[name],
                    ipg=s.in_features // s.groups,
                    in0=in0,
                    out0=out0,
                    in_terms=tuple(sorted((u, int(c * den)) for u, c in in_coef[name].items())),
                    out_terms=tuple(sorted((u, int(c * den)) for u, c in out_coef[name].items())),
                    bias=getattr(module, "bias", None) is not None,
                    den=den,
                )
            )

        # per unit: (layer, input features per channel, output features per channel)
        touched: list[list[tuple[_Layer, int, int]]] = [[] for _ in range(n_units)]
        unit_layers: list[list[int]] = [[] for _ in range(n_units)]
        for li, layer in enumerate(self._layers):
            coefs: dict[int, list[int]] = {}
            for u, c in layer.in_terms:
                coefs.setdefault(u, [0, 0])[0] = c
            for u, c in layer.out_terms:
                coefs.setdefault(u, [0, 0])[1] = c
            for u, (ci, co) in coefs.items():
                touched[u].append((layer, ci, co))
                unit_layers[u].append(li)
        self._touched: list[tuple[tuple[_Layer, int, int], ...]] = [tuple(t) for t in touched]
        self._unit_layers: list[tuple[int, ...]] = [tuple(t) for t in unit_layers]

        # dense tensors for the vectorised count
        n_layers = len(self._layers)
        a_in = torch.zeros(n_layers, n_units, dtype=torch.int64)
        a_out = torch.zeros(n_layers, n_units, dtype=torch.int64)
        for li, layer in enumerate(self._layers):
            for u, c in layer.in_terms:
                a_in[li, u] = c
            for u, c in layer.out_terms:
                a_out[li, u] = c
        self._a_in_t = a_in.t().contiguous()
        self._a_out_t = a_out.t().contiguous()
        self._in0 = torch.tensor([lay.in0 * den for lay in self._layers], dtype=torch.int64)  # times den
        self._out0 = torch.tensor([lay.out0 * den for lay in self._layers], dtype=torch.int64)
        self._kpos = torch.tensor([lay.kpos for lay in self._layers], dtype=torch.int64)
        self._kprod = torch.tensor([lay.kprod for lay in self._layers], dtype=torch.int64)
        self._groups = torch.tensor([lay.groups for lay in self._layers], dtype=torch.int64)
        self._tied = torch.tensor([lay.tied for lay in self._layers], dtype=torch.bool)
        self._ipg = torch.tensor([lay.ipg for lay in self._layers], dtype=torch.int64)
        self._bias = torch.tensor([lay.bias for lay in self._layers], dtype=torch.int64)

        # parameters: conv/linear weights and biases follow the widths; so do the units' norms and
        # PReLUs (per-channel parameters); everything else is a constant
        norm_coef: dict[str, dict[int, int]] = {}
        for ui, unit in enumerate(self.units):
            names = set(getattr(unit, "norms", ()) or ())
            if getattr(unit, "norm_name", None):
                names.add(unit.norm_name)  # type: ignore[arg-type]
            names.update(m.name for m in getattr(unit, "members", ()) if getattr(m, "role", None) == "act")
            for name in names:
                norm_coef.setdefault(name, {})[ui] = 1
        norm_rows: list[tuple[int, int, dict[int, int]]] = []  # (params per channel, constant width, coefs)
        for name, coefs in norm_coef.items():
            module = modules.get(name)
            if module is None:
                continue
            own = sum(p.numel() for p in module.parameters(recurse=False))
            width = int(
                getattr(module, "num_features", 0)
                or getattr(module, "num_channels", 0)
                or getattr(module, "num_parameters", 0)
                or 0
            )
            if own == 0 or width == 0 or own % width:
                continue
            norm_rows.append((own // width, width - sum(channels[u] for u in coefs), coefs))
        a_norm = torch.zeros(len(norm_rows), n_units, dtype=torch.int64)
        for ri, (_, _, coefs) in enumerate(norm_rows):
            for u, c in coefs.items():
                a_norm[ri, u] = c
        self._a_norm_t = a_norm.t().contiguous()
        self._norm0 = torch.tensor([r[1] for r in norm_rows], dtype=torch.int64)
        self._norm_pp = torch.tensor([r[0] for r in norm_rows], dtype=torch.int64)
        self._widths0 = torch.tensor(channels, dtype=torch.int64)
        modeled = self._params_modeled(self._widths0.unsqueeze(0))[0].item()
        self._params_const = sum(p.numel() for p in model.parameters()) - int(modeled)

        # cache of the total at the last widths seen, updated incrementally
        self._cache_w: list[int] = list(channels)
        self._cache_layer: list[int] = [lay.macs(channels) for lay in self._layers]
        self._cache_total: int = sum(self._cache_layer)
        self._pending: tuple[int, int] | None = None  # (unit, k) of the last macs_after_removing

    # -- queries -----------------------------------------------------------------------------

    def widths(self) -> torch.Tensor:
        """Current widths of the units (their ``channels`` now), one int64 per unit."""
        return torch.tensor([int(u.channels) for u in self.units], dtype=torch.int64)

    def initial_widths(self) -> torch.Tensor:
        """Widths of the units when this cost model was built."""
        return self._widths0.clone()

    def _as_batch(self, widths: torch.Tensor | Sequence[int] | None) -> tuple[torch.Tensor, bool]:
        if widths is None:
            widths = self.widths()
        w = torch.as_tensor(widths, dtype=torch.int64)
        single = w.dim() == 1
        if single:
            w = w.unsqueeze(0)
        if w.dim() != 2 or w.shape[-1] != len(self.units):
            raise GraphError(f"widths must have one entry per unit ({len(self.units)}), got shape {tuple(w.shape)}")
        return w, single

    def _layer_widths(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(in, out) width of every layer at a (B, units) batch of widths."""
        in_w = torch.div(self._in0 + w @ self._a_in_t, self._den, rounding_mode="floor")
        out_w = torch.div(self._out0 + w @ self._a_out_t, self._den, rounding_mode="floor")
        return in_w, out_w

    def macs(self, widths: torch.Tensor | Sequence[int] | None = None) -> int | torch.Tensor:
        """Total MACs at these widths (current widths if None); a (B, units) batch gives B totals."""
        w, single = self._as_batch(widths)
        in_w, out_w = self._layer_widths(w)
        per_group = torch.where(self._tied, self._ipg, torch.div(in_w, self._groups, rounding_mode="floor"))
        total = (self._kpos * per_group * out_w).sum(-1)
        return int(total[0]) if single else total

    def _params_modeled(self, w: torch.Tensor) -> torch.Tensor:
        in_w, out_w = self._layer_widths(w)
        per_group = torch.where(self._tied, self._ipg, torch.div(in_w, self._groups, rounding_mode="floor"))
        layers = (self._kprod * per_group * out_w + self._bias * out_w).sum(-1)
        norms = (self._norm_pp * (self._norm0 + w @ self._a_norm_t)).sum(-1)
        return layers + norms

    def params(self, widths: torch.Tensor | Sequence[int] | None = None) -> int | torch.Tensor:
        """Total parameters at these widths: conv/linear weights and biases and the units' norms follow them."""
        w, single = self._as_batch(widths)
        total = self._params_const + self._params_modeled(w)
        return int(total[0]) if single else total

    def layers_of(self, unit_index: int) -> list[str]:
        """Names of the conv/linear layers whose cost changes when this unit loses channels."""
        return [layer.name for layer, _, _ in self._touched[unit_index]]

    def _sync(self, w: list[int]) -> int:
        """Total MACs at w, updating the cached state from the last widths seen in O(changed degree)."""
        if w == self._cache_w:
            return self._cache_total
        if len(w) != len(self._cache_w):
            raise GraphError(f"widths must have one entry per unit ({len(self._cache_w)}), got {len(w)}")
        changed: list[int] | None = None
        if self._pending is not None:  # the usual walk: the caller took the channels it asked about
            u, k = self._pending
            guess = self._cache_w.copy()
            guess[u] -= k
            if guess == w:
                changed = [u]
        if changed is None:
            changed = [u for u, (a, b) in enumerate(zip(w, self._cache_w)) if a != b]
        cache = self._cache_layer
        if len(changed) * 4 > len(w):
            cache[:] = [lay.macs(w) for lay in self._layers]
            self._cache_total = sum(cache)
        else:
            seen: set[int] = set()
            total = self._cache_total
            layers = self._layers
            for u in changed:
                for li in self._unit_layers[u]:
                    if li in seen:
                        continue
                    seen.add(li)
                    new = layers[li].macs(w)
                    total += new - cache[li]
                    cache[li] = new
            self._cache_total = total
        self._cache_w = w
        return self._cache_total

    def _saved(self, unit_index: int, k: int, w: Sequence[int]) -> int:
        saved = 0
        for layer, ci, co in self._touched[unit_index]:
            in_s, out_s = layer.scaled_widths(w)
            d = layer.den
            out_w, out_after = out_s // d, (out_s - k * co) // d
            if layer.tied:
                saved += layer.kpos * layer.ipg * (out_w - out_after)
            else:
                g = layer.groups
                saved += layer.kpos * ((in_s // d // g) * out_w - ((in_s - k * ci) // d // g) * out_after)
        return saved

    @staticmethod
    def _as_list(widths: torch.Tensor | Sequence[int]) -> list[int]:
        return widths.tolist() if isinstance(widths, torch.Tensor) else list(widths)

    def macs_after_removing(self, unit_index: int, k: int, widths: torch.Tensor | Sequence[int]) -> int:
        """Total MACs once unit ``unit_index`` loses ``k`` more channels from ``widths``.

        Costs O(layers touched by the unit) when ``widths`` equals (or differs in a few units
        from) the widths of the previous query, which is how a greedy mask search calls it.
        """
        w = self._as_list(widths)
        if not 0 <= k <= w[unit_index]:
            raise GraphError(
                f"cannot remove {k} channels from unit {self.units[unit_index].name!r} of width {w[unit_index]}; "
                f"k must be between 0 and the width"
            )
        total = self._sync(w) - self._saved(unit_index, k, w)
        self._pending = (unit_index, k)
        return total

    def removal_delta(self, unit_index: int, widths: torch.Tensor | Sequence[int]) -> int:
        """MACs saved by removing one channel of unit ``unit_index`` at ``widths`` (0 when it has none left)."""
        w = self._as_list(widths)
        if w[unit_index] <= 0:
            return 0
        return self._saved(unit_index, 1, w)

    def removal_deltas(self, widths: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """MACs saved by removing one channel of each unit at ``widths``, vectorised (int64, one per unit)."""
        w, _ = self._as_batch(widths)
        base = self.macs(w)
        n = len(self.units)
        trial = w.expand(n, n) - torch.eye(n, dtype=torch.int64)
        deltas = base - self.macs(trial)
        return torch.where(w[0] > 0, deltas, torch.zeros_like(deltas))
