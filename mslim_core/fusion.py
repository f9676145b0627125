"""Fusion rules: fold chains of layers (conv+BN, conv+1x1 conv, linear+BN, ...) into one layer.

A ``FusionRule`` names a pattern of consecutive module types and a function that turns
the matched modules into one module computing the same thing (in eval mode).
``fuse_model`` traces the model on example inputs, finds chains where each module's
output goes only to the next module of a pattern, and rewrites them in place.

Rules come from the ``mslim_register_fusers`` hook, so a plugin can add rules for its own
module types; the built-in ones live in ``mslim_core.builtin_fusers``.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode, resolve_name

from mslim_core.errors import GraphError
from mslim_core.tracing import first_sample, preserved_modes

__all__ = [
    "FusionRule",
    "fuse_conv_bn",
    "fuse_conv_conv1x1",
    "fuse_linear_bn",
    "fuse_model",
    "find_chains",
    "is_pointwise",
    "registered_rules",
]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class FusionRule:
    """A pattern of consecutive module types and how to fold the matched modules into one.

    ``pattern`` is matched by exact type (a subclass that changes ``forward`` is never folded
    by a rule written for its base class). ``fuse(*modules)`` returns the replacement.
    ``condition(modules, shapes)``, if given, decides whether one match may be fused;
    ``shapes`` are the output shapes of the matched modules on the batch-1 trace.
    """

    name: str
    pattern: tuple[type[nn.Module], ...]
    fuse: Callable[..., nn.Module]
    description: str = ""
    condition: Callable[[tuple[nn.Module, ...], tuple[torch.Size, ...]], bool] | None = None

    def __post_init__(self) -> None:
        if not self.pattern or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in self.pattern):
            raise GraphError(
                f"fusion rule {self.name!r} has pattern {self.pattern!r}; it must be a non-empty tuple of "
                "nn.Module classes"
            )
        if not callable(self.fuse):
            raise GraphError(f"fusion rule {self.name!r} needs a callable `fuse`, got {self.fuse!r}")


# -- the folding functions ----------------------------------------------------------------------


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.device.type == "mps" else torch.float64


def _bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) with bn(x) == x * scale + shift in eval mode, in a wide dtype."""
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        raise GraphError(
            f"cannot fold {type(bn).__name__}({bn.num_features}) built with track_running_stats=False: "
            "it normalises with batch statistics, which no fixed weight can reproduce"
        )
    dt = _work_dtype(like)
    mean = bn.running_mean.detach().to(dt)
    var = bn.running_var.detach().to(dt)
    scale = torch.rsqrt(var + bn.eps)
    if bn.affine and bn.weight is not None:
        scale = scale * bn.weight.detach().to(dt)
    shift = -mean * scale
    if bn.affine and bn.bias is not None:
        shift = shift + bn.bias.detach().to(dt)
    return scale, shift


def _new_conv(conv: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, groups: int) -> nn.Module:
    """A plain conv of conv's class with conv's geometry and the given weight, bias and groups."""
    cls = next((c for c in _CONV_TYPES if type(conv) is c), None) or next(
        c for c in _CONV_TYPES if isinstance(conv, c)
    )
    ref = conv.weight
    out = cls(
        weight.shape[1] * groups,
        weight.shape[0],
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=groups,
        bias=bias is not None,
        padding_mode=conv.padding_mode,
        device=ref.device,
        dtype=ref.dtype,
    )
    with torch.no_grad():
        out.weight.copy_(weight.to(ref.dtype))
        if bias is not None:
            out.bias.copy_(bias.to(ref.dtype))
    out.train(conv.training)
    return out


def _check_conv(conv: nn.Module, role: str) -> None:
    if not isinstance(conv, _CONV_TYPES) or getattr(conv, "transposed", False):
        raise GraphError(f"{role} must be an nn.Conv1d/2d/3d (not transposed), got {type(conv).__name__}")


def fuse_conv_bn(conv: nn.Module, bn: nn.Module) -> nn.Module:
    """Fold an eval-mode BatchNorm into the conv before it (grouped and depthwise convs too).

    W' = W * gamma / sqrt(var + eps), b' = beta + (b - mean) * gamma / sqrt(var + eps).
    """
    _check_conv(conv, "the first module of conv+BN")
    if not isinstance(bn, _NORM_TYPES):
        raise GraphError(f"the second module of conv+BN must be a BatchNorm1d/2d/3d, got {type(bn).__name__}")
    if bn.num_features != conv.out_channels:
        raise GraphError(
            f"cannot fold {type(bn).__name__}({bn.num_features}) into a conv with {conv.out_channels} outputs"
        )
    scale, shift = _bn_scale_shift(bn, conv.weight)
    dt = scale.dtype
    w = conv.weight.detach().to(dt)
    weight = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    bias = shift if conv.bias is None else conv.bias.detach().to(dt) * scale + shift
    return _new_conv(conv, weight, bias, conv.groups)


def fuse_linear_bn(linear: nn.Module, bn: nn.Module) -> nn.Module:
    """Fold an eval-mode BatchNorm1d into the linear layer before it (2-D activations)."""
    if not isinstance(linear, nn.Linear):
        raise GraphError(f"the first module of linear+BN must be an nn.Linear, got {type(linear).__name__}")
    if not isinstance(bn, nn.BatchNorm1d) or bn.num_features != linear.out_features:
        raise GraphError(
            f"the second module of linear+BN must be a BatchNorm1d({linear.out_features}), got {bn!r}"
        )
    scale, shift = _bn_scale_shift(bn, linear.weight)
    dt = scale.dtype
    weight = linear.weight.detach().to(dt) * scale[:, None]
    bias = shift if linear.bias is None else linear.bias.detach().to(dt) * scale + shift
    ref = linear.weight
    out = nn.Linear(linear.in_features, linear.out_features, bias=True, device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        out.weight.copy_(weight.to(ref.dtype))
        out.bias.copy_(bias.to(ref.dtype))
    out.train(linear.training)
    return out


def is_pointwise(conv: nn.Module) -> bool:
    """True for a 1x1 conv with stride 1, no padding and groups 1 (a per-position channel mix)."""
    padding = conv.padding
    no_padding = padding == "valid" or (not isinstance(padding, str) and all(p == 0 for p in padding))
    return (
        isinstance(conv, _CONV_TYPES)
        and not getattr(conv, "transposed", False)
        and all(k == 1 for k in conv.kernel_size)
        and all(s == 1 for s in conv.stride)
        and no_padding
        and conv.groups == 1
    )


def _dense_weight(conv: nn.Module, dt: torch.dtype) -> torch.Tensor:
    """The conv's weight as a groups=1 weight (block-diagonal over groups)."""
    w = conv.weight.detach().to(dt)
    g = conv.groups
    if g == 1:
        return w
    out_g, in_g = w.shape[0] // g, w.shape[1]
    kernel = tuple(w.shape[2:])
    blocks = w.reshape(g, out_g, in_g, *kernel)
    dense = w.new_zeros(g, out_g, g, in_g, *kernel)
    idx = torch.arange(g, device=w.device)
    dense[idx, :, idx] = blocks
    return dense.reshape(g * out_g, g * in_g, *kernel)


def fuse_conv_conv1x1(conv: nn.Module, pointwise: nn.Module) -> nn.Module:
    """Fold a 1x1 conv (groups 1, stride 1, no padding) into the conv that directly feeds it.

    The result has the first conv's kernel, stride, padding and dilation, the 1x1's outputs,
    W = P @ W1 over channels and b = P @ b1 + b2. A grouped first conv gives a dense result.
    """
    _check_conv(conv, "the first module of conv+conv1x1")
    if not isinstance(pointwise, _CONV_TYPES) or pointwise.weight.dim() != conv.weight.dim():
        raise GraphError(
            f"the 1x1 conv must have the same dimensionality as the first conv, got {type(pointwise).__name__} "
            f"after {type(conv).__name__}"
        )
    if not is_pointwise(pointwise):
        raise GraphError(
            "the second conv must be 1x1 with stride 1, padding 0 and groups 1, got kernel "
            f"{pointwise.kernel_size}, stride {pointwise.stride}, padding {pointwise.padding}, groups {pointwise.groups}"
        )
    if pointwise.in_channels != conv.out_channels:
        raise GraphError(
            f"the 1x1 conv takes {pointwise.in_channels} channels but the first conv gives {conv.out_channels}"
        )
    dt = _work_dtype(conv.weight)
    w1 = _dense_weight(conv, dt)
    p = pointwise.weight.detach().to(dt).reshape(pointwise.out_channels, pointwise.in_channels)
    weight = torch.tensordot(p, w1, dims=([1], [0]))
    bias: torch.Tensor | None = None
    if conv.bias is not None:
        bias = p @ conv.bias.detach().to(dt)
    if pointwise.bias is not None:
        b2 = pointwise.bias.detach().to(dt)
        bias = b2 if bias is None else bias + b2
    return _new_conv(conv, weight, bias, 1)


# -- tracing the dataflow -----------------------------------------------------------------------

_METADATA = frozenset(
    {
        "size", "dim", "numel", "nelement", "shape", "dtype", "device", "ndim", "is_floating_point",
        "is_complex", "is_contiguous", "stride", "element_size", "data_ptr", "requires_grad", "is_cuda",
        "layout", "names", "__len__", "get_device", "storage_offset", "nbytes", "itemsize", "is_sparse",
        "is_quantized", "is_meta", "grad_fn", "_version", "is_leaf", "__hash__", "__format__",
    }
)


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _tensors(item)]
    return []


def _is_metadata(func: Callable[..., Any]) -> bool:
    try:
        name = resolve_name(func) or getattr(func, "__name__", "")
    except Exception:
        name = getattr(func, "__name__", "")
    name = name.removesuffix(".__get__")
    return name.rsplit(".", 1)[-1] in _METADATA


@dataclass
class _Call:
    name: str
    inputs: list[str | None]  # producer of each tensor input
    output_shape: torch.Size | None = None


class _DataflowTracer(TorchFunctionMode):
    """Records, for one forward pass, who consumes the output of each atomic module call.

    Atomic modules (leaves, and modules whose type appears in a pattern) are black boxes:
    what runs inside them is not recorded. ``nn.Identity`` is transparent (left behind by
    earlier fusions, it must not split a chain). Every torch function called elsewhere (an add,
    a cat, a view, ...) counts as a consumer of the tensors it reads.
    """

    def __init__(self, model: nn.Module, atomic_types: set[type]) -> None:
        super().__init__()
        self.model = model
        self.names: dict[nn.Module, str] = {}
        self.aliases: dict[nn.Module, int] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            self.aliases[module] = self.aliases.get(module, 0) + 1
            self.names.setdefault(module, name)
        self.atomic = {
            m
            for m in self.names
            if type(m) in atomic_types or (next(iter(m.children()), None) is None and type(m) is not nn.Identity)
        }
        self.producer: dict[int, str] = {}
        self.keep: list[torch.Tensor] = []
        self.uses: dict[str, list[str]] = {}
        self.calls: dict[str, list[_Call]] = {}
        self.stack: list[bool] = []
        self.depth = 0
        self.counter = itertools.count()

    def _mark(self, tensors: list[torch.Tensor], node: str) -> None:
        for t in tensors:
            self.producer[id(t)] = node
            self.keep.append(t)

    def _use(self, tensors: list[torch.Tensor], node: str) -> list[str | None]:
        producers = []
        for t in tensors:
            p = self.producer.get(id(t))
            producers.append(p)
            if p is not None:
                self.uses.setdefault(p, []).append(node)
        return producers

    def pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.depth > 0 or module not in self.atomic:
            self.stack.append(False)
            return
        name = self.names[module]
        call = _Call(name=name, inputs=self._use(_tensors(args) + _tensors(kwargs), name))
        self.calls.setdefault(name, []).append(call)
        self.stack.append(True)
        self.depth += 1

    def post_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if not self.stack.pop():
            return
        self.depth -= 1
        name = self.names[module]
        outs = _tensors(output)
        self.calls[name][-1].output_shape = outs[0].shape if len(outs) == 1 else None
        self._mark(outs, name)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if self.depth > 0 or _is_metadata(func):
            return result
        node = f"op:{getattr(func, '__name__', 'fn')}#{next(self.counter)}"
        self._use(_tensors(args) + _tensors(kwargs), node)
        self._mark(_tensors(result), node)
        return result

    def run(self, inputs: tuple[torch.Tensor, ...]) -> None:
        handles = []
        for module in self.names:
            handles.append(module.register_forward_pre_hook(self.pre_hook, with_kwargs=True))
            handles.append(module.register_forward_hook(self.post_hook, with_kwargs=True))
        try:
            self._mark(list(inputs), "input")
            with preserved_modes(self.model, train=False), torch.no_grad():
                try:
                    with self:
                        output = self.model(*inputs)
                except Exception as exc:
                    shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
                    raise GraphError(
                        f"cannot trace the model for fusion on example inputs of shape {shapes}: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
            self._use(_tensors(output), "output")
        finally:
            for handle in handles:
                handle.remove()


def find_chains(model: nn.Module, example_inputs: Any, rules: Sequence[FusionRule]) -> list[tuple[FusionRule, tuple[str, ...]]]:
    """Chains of module names matching the rules, each module in at most one chain, in rule order.

    A chain matches when each module is called once, has one name, and its output goes
    only to the next module of the chain, which reads nothing else.
    """
    atomic_types = {t for rule in rules for t in rule.pattern}
    tracer = _DataflowTracer(model, atomic_types)
    tracer.run(first_sample(example_inputs))
    modules = {name: m for m, name in tracer.names.items()}

    def single(name: str) -> _Call | None:
        calls = tracer.calls.get(name, [])
        if len(calls) != 1 or name == "" or tracer.aliases.get(modules[name], 0) != 1:
            return None
        return calls[0]

    # the only consumer of each call's output, when it is a module call reading nothing else
    successor: dict[str, str] = {}
    for name, uses in tracer.uses.items():
        if len(uses) != 1 or uses[0] in ("output",) or uses[0].startswith("op:") or name == "input":
            continue
        nxt = single(uses[0])
        if nxt is not None and nxt.inputs == [name]:
            successor[name] = uses[0]

    taken: set[str] = set()
    found: list[tuple[FusionRule, tuple[str, ...]]] = []
    order = [name for name in tracer.calls]  # execution order of first calls
    for rule in rules:
        for start in order:
            chain = [start]
            while len(chain) < len(rule.pattern) and chain[-1] in successor:
                chain.append(successor[chain[-1]])
            if len(chain) != len(rule.pattern) or any(n in taken for n in chain):
                continue
            calls = [single(n) for n in chain]
            if any(c is None for c in calls):
                continue
            mods = tuple(modules[n] for n in chain)
            if not all(type(m) is t for m, t in zip(mods, rule.pattern)):
                continue
            shapes = tuple(c.output_shape for c in calls)  # type: ignore[union-attr]
            if rule.condition is not None and not rule.condition(mods, shapes):
                continue
            taken.update(chain)
            found.append((rule, tuple(chain)))
    return found


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def registered_rules() -> list[FusionRule]:
    """Every fusion rule registered through the ``mslim_register_fusers`` hook."""
    from mslim_core.plugins import get_registry

    return list(get_registry().fusers)


def fuse_model(
    model: nn.Module,
    example_inputs: Any,
    rules: Sequence[FusionRule] | None = None,
    inplace: bool = True,
    max_rounds: int = 8,
) -> nn.Module:
    """Fold every chain that matches a rule; returns the model (changed in place unless inplace=False).

    The first module of a chain is replaced by the fused module and the others by
    ``nn.Identity``. Rounds repeat until nothing matches, so conv -> BN -> 1x1 conv folds
    into one conv. Norms are folded with their running statistics: the fused model equals
    the original in eval mode. ``rules=None`` uses every rule registered by plugins.
    """
    rules = registered_rules() if rules is None else list(rules)
    if not inplace:
        model = copy.deepcopy(model)
    if not rules:
        return model
    for _ in range(max_rounds):
        chains = find_chains(model, example_inputs, rules)
        if not chains:
            break
        for rule, names in chains:
            mods = [model.get_submodule(n) for n in names]
            fused = rule.fuse(*mods)
            if not isinstance(fused, nn.Module):
                raise GraphError(f"fusion rule {rule.name!r} returned {type(fused).__name__}, not an nn.Module")
            _set_submodule(model, names[0], fused)
            for name in names[1:]:
                _set_submodule(model, name, nn.Identity())
    return model
