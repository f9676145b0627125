"""Which tensor operations keep channels in place, judged from one recorded forward pass.

torch-pruning treats every operation it does not know as element-wise, so an op that moves or
mixes channels (a channel shuffle, ``pixel_shuffle``, a transpose of the channel dimension) would
be pruned as if it kept them in place, giving a silently wrong model. While the dependency graph
is traced, :class:`OpRecorder` watches every torch function call and gives each result a verdict:
``None`` when channel ``i`` of the input is channel ``i`` of the output (or the op is one that
torch-pruning maps exactly: concat, split/chunk, channel slices, a flatten before a linear
layer), otherwise a short reason. Records are keyed by the autograd node of the result, which is
what the dependency graph's nodes carry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch.overrides import TorchFunctionMode

# ops whose output channel i depends only on input channel i (broadcasting is checked separately)
_POINTWISE = frozenset(
    """add radd iadd sub rsub isub mul rmul imul div rdiv idiv truediv rtruediv itruediv true_divide
    floor_divide neg negative relu relu6 hardtanh leaky_relu elu selu celu gelu silu mish sigmoid
    hardsigmoid hardswish tanh softplus softsign tanhshrink threshold clamp clamp_min clamp_max
    clip abs exp log log1p sqrt rsqrt pow square reciprocal sin cos erf sign floor ceil round
    trunc frac logit dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout
    clone contiguous to float double half bfloat16 type type_as where maximum minimum addcmul
    addcdiv lerp detach prelu rrelu hardshrink softshrink""".split()
)
# ops that work per channel over the spatial dimensions
_SPATIAL = frozenset(
    """max_pool1d max_pool2d max_pool3d max_pool1d_with_indices max_pool2d_with_indices
    max_pool3d_with_indices avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d
    adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d
    adaptive_max_pool3d lp_pool1d lp_pool2d fractional_max_pool2d interpolate upsample
    upsample_nearest upsample_bilinear pad""".split()
)
_REDUCE = frozenset("mean sum amax amin max min std var norm logsumexp prod nansum nanmean".split())
_SOFTMAX = frozenset("softmax log_softmax softmin".split())
_RESHAPE = frozenset("view reshape flatten squeeze unsqueeze unflatten view_as reshape_as".split())
_EXPAND = frozenset("expand expand_as".split())
_CAT = frozenset("cat concat concatenate".split())
_SPLIT = frozenset("split chunk split_with_sizes unsafe_split unsafe_chunk tensor_split".split())
_PERMUTE = frozenset("transpose swapaxes swapdims permute movedim moveaxis".split())


@dataclass
class OpRecord:
    """One recorded call: its name, whether it keeps channels in place, and channel sizes."""

    name: str
    verdict: str | None  # None: channels stay in place (or are mapped exactly); else why not
    channel_sizes: tuple[int, ...] = ()  # cat: sizes of the inputs; split: sizes of the outputs
    feature_stride: int = 1  # reshape: features per channel after a channel-major flatten
    shapes: str = ""  # "in -> out" shapes, for messages


def _norm_name(func: Any) -> str:
    name = getattr(func, "__name__", None) or str(func)
    return name.strip("_")


def _tensors(obj: Any) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _arg(args: tuple, kwargs: dict, pos: int, *names: str, default: Any = None) -> Any:
    for n in names:
        if n in kwargs:
            return kwargs[n]
    return args[pos] if len(args) > pos else default


def _dims(dim: Any, ndim: int) -> list[int] | None:
    if dim is None:
        return None
    dims = list(dim) if isinstance(dim, (list, tuple)) else [dim]
    return [int(d) % ndim if ndim else int(d) for d in dims]


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


@dataclass
class _Ctx:
    model_inputs: set[int] = field(default_factory=set)


class _Judge:
    """Rules that decide whether one call keeps channels in place."""

    def __init__(self, ctx: _Ctx) -> None:
        self.ctx = ctx

    def traced(self, t: torch.Tensor) -> bool:
        return t.grad_fn is not None

    def is_param(self, t: torch.Tensor) -> bool:
        return t.grad_fn is None and t.requires_grad and id(t) not in self.ctx.model_inputs

    def pointwise(self, inputs: list[torch.Tensor], out: torch.Tensor) -> str | None:
        if out.dim() < 2:
            return None
        out_c = out.shape[1]
        for t in inputs:
            offset = out.dim() - t.dim()
            cdim = 1 - offset  # the dimension of t aligned with the output's channels
            c = t.shape[cdim] if 0 <= cdim < t.dim() else 1
            if self.traced(t):
                if t.dim() >= 2 and c != out_c:
                    return f"broadcasts a {c}-channel tensor across {out_c} channels"
            elif self.is_param(t):
                big = [d for d in range(t.dim()) if t.shape[d] != 1]
                if big and big != [cdim]:
                    return f"combines the channels with a parameter of shape {_shape(t)} that is not per-channel"
            elif c != 1 and c == out_c and out_c > 1:
                return (
                    f"combines the channels with a fixed tensor of shape {_shape(t)} "
                    "(a model input, buffer or constant that pruning would not shrink)"
                )
        return None

    def reshape(self, src: torch.Tensor, out: torch.Tensor, rec: OpRecord) -> str | None:
        a, b = _shape(src), _shape(out)
        if len(a) < 2 or a == b:
            return None
        if len(b) >= 2 and a[0] == b[0] and a[1] == b[1]:
            return None  # only the dimensions after the channels change
        if len(b) == 2 and a[0] == b[0] and b[1] == math.prod(a[1:]):
            rec.feature_stride = math.prod(a[2:])  # channel-major flatten: channel i -> features i*s..
            return None
        return f"reshapes the channel dimension ({a} -> {b})"

    def getitem(self, src: torch.Tensor, key: Any, out: torch.Tensor) -> str | None:
        key = key if isinstance(key, tuple) else (key,)
        if any(k is None or isinstance(k, (torch.Tensor, list, bool)) for k in key):
            return "indexes the tensor with a tensor, list or None (channels may move)"
        if any(k is Ellipsis for k in key):
            i = key.index(Ellipsis)
            fill = src.dim() - (len(key) - 1)
            key = key[:i] + (slice(None),) * fill + key[i + 1 :]
        for d, k in enumerate(key):
            if isinstance(k, int):
                if d <= 1:
                    return "selects along the batch or channel dimension"
            elif isinstance(k, slice) and k != slice(None):
                reason = self.slice(src, d, k.step)
                if reason:
                    return reason
        return None

    def slice(self, src: torch.Tensor, dim: int, step: Any) -> str | None:
        nd = src.dim()
        if dim == 1:
            return "slices channels at positions written into the model code, which pruning cannot change"
        if (nd == 4) or (nd == 3 and dim == 0):
            return None
        return f"slices dimension {dim} of a {nd}-d tensor in a way channel mapping does not follow"

    def judge(self, name: str, args: tuple, kwargs: dict, outs: list[torch.Tensor]) -> OpRecord:
        inputs = [t for t in _tensors((args, kwargs))]
        src = inputs[0] if inputs else None
        out = outs[0]
        shapes = f"{[_shape(t) for t in inputs][:4]} -> {[_shape(o) for o in outs][:4]}"
        rec = OpRecord(name=name, verdict=None, shapes=shapes)
        nd = src.dim() if src is not None else 0
        if name in _POINTWISE:
            rec.verdict = self.pointwise(inputs, out)
        elif name in _SPATIAL:
            if src is not None and (src.dim() < 2 or _shape(out)[:2] != _shape(src)[:2]):
                rec.verdict = "changes the batch or channel dimension"
        elif name in _REDUCE:
            dims = _dims(_arg(args, kwargs, 1, "dim"), nd)
            keep = bool(_arg(args, kwargs, 2, "keepdim", default=False))
            if nd >= 2 and (dims is None or 1 in dims or (0 in dims and not keep)):
                rec.verdict = "reduces over the channel (or batch) dimension"
        elif name in _SOFTMAX:
            dims = _dims(_arg(args, kwargs, 1, "dim"), nd)
            if nd >= 2 and (dims is None or 1 in dims):
                rec.verdict = "normalises across channels"
        elif name in _RESHAPE:
            rec.verdict = self.reshape(src, out, rec)
        elif name in _EXPAND:
            if nd >= 2 and out.shape[1] != src.shape[1]:
                rec.verdict = "expands the channel dimension"
        elif name in _CAT:
            tensors = list(_tensors(_arg(args, kwargs, 0, "tensors")))
            dim = _dims(_arg(args, kwargs, 1, "dim", default=0), out.dim())[0]
            if any(not self.traced(t) for t in tensors):
                rec.verdict = "concatenates a tensor that no layer of the model produces (input or constant)"
            elif out.dim() >= 2 and dim == 1:
                rec.channel_sizes = tuple(int(t.shape[1]) for t in tensors)
            elif out.dim() >= 2 and any(t.shape[1] != out.shape[1] for t in tensors):
                rec.verdict = "concatenates along a dimension that mixes channel layouts"
        elif name in _SPLIT:
            dim = _dims(_arg(args, kwargs, 2, "dim", default=0), nd)[0]
            if nd >= 2 and dim == 1:
                sizes = tuple(int(o.shape[1]) for o in outs)
                if name in ("chunk", "unsafe_chunk") and len(set(sizes)) == 1:
                    rec.channel_sizes = sizes  # equal chunks: stay right if each loses as many channels
                elif name in ("chunk", "unsafe_chunk"):
                    rec.verdict = f"makes unequal chunks {list(sizes)}"
                else:
                    rec.verdict = (
                        "splits channels at sizes written into the model code, which pruning cannot "
                        "change (chunk() into equal parts is supported)"
                    )
            elif nd >= 2 and any(o.shape[1] != src.shape[1] for o in outs):
                rec.verdict = "splits in a way that changes channels"
        elif name == "narrow":
            dim = _dims(_arg(args, kwargs, 1, "dim"), nd)[0]
            rec.verdict = self.slice(src, dim, 1)
        elif name == "getitem":
            rec.verdict = self.getitem(src, args[1] if len(args) > 1 else None, out)
        elif name in _PERMUTE:
            if nd >= 2:
                perm = list(range(nd))
                if name == "permute":
                    given = _arg(args, kwargs, 1, "dims")
                    perm = _dims(given if isinstance(given, (list, tuple)) else args[1:], nd)
                elif name in ("transpose", "swapaxes", "swapdims"):
                    a, b = _dims([_arg(args, kwargs, 1, "dim0", "axis0"), _arg(args, kwargs, 2, "dim1", "axis1")], nd)
                    perm[a], perm[b] = perm[b], perm[a]
                else:  # movedim: be conservative
                    perm = [-1]
                if perm[:2] != [0, 1]:
                    rec.verdict = "moves the channel dimension (transpose/permute)"
        elif name in ("flip", "roll"):
            dims = _dims(_arg(args, kwargs, 2 if name == "roll" else 1, "dims"), nd)
            if dims is None or 1 in dims:
                rec.verdict = f"{name} moves channels"
        else:
            rec.verdict = "is not known to keep channels in place"
        return rec


class OpRecorder(TorchFunctionMode):
    """Records a verdict for every tensor-producing torch call, keyed by the result's grad_fn.

    The first call that produces a given autograd node wins (an op that returns its input, such
    as dropout in eval mode, does not overwrite the op that made the tensor).
    """

    def __init__(self, model_inputs: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.records: dict[Any, OpRecord] = {}
        self._judge = _Judge(_Ctx(model_inputs={id(t) for t in model_inputs}))

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outs = [o for o in _tensors(out) if isinstance(o, torch.Tensor)]
        fns = [o.grad_fn for o in outs if o.grad_fn is not None]
        if not fns or all(fn in self.records for fn in fns):
            return out
        if not any(t.grad_fn is not None or id(t) in self._judge.ctx.model_inputs for t in _tensors((args, kwargs))):
            return out  # computed from parameters or constants only (e.g. weight transforms)
        try:
            rec = self._judge.judge(_norm_name(func), args, kwargs, outs)
        except Exception as exc:  # an unusual signature: refuse rather than guess
            rec = OpRecord(_norm_name(func), f"could not be analysed ({type(exc).__name__})")
        for fn in fns:
            self.records.setdefault(fn, rec)
        return out
