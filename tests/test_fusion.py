"""Fusion rules against the unfused modules in eval mode, and fuse_model on traced models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mslim_core.builtin_fusers import BUILTIN_RULES
from mslim_core.errors import GraphError
from mslim_core.fusion import FusionRule, find_chains, fuse_conv_bn, fuse_conv_conv1x1, fuse_linear_bn, fuse_model


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics and affine parameters, random biases; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
                if m.affine:
                    m.weight.copy_(torch.randn(n, generator=g))
                    m.bias.copy_(torch.randn(n, generator=g))
            elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model.eval()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize(
    ("cin", "cout", "groups", "bias", "affine"),
    [(4, 6, 1, False, True), (4, 6, 2, True, True), (6, 6, 6, False, True), (6, 12, 6, True, True),
     (4, 6, 1, True, False)],
)
def test_fuse_conv_bn(dims: int, cin: int, cout: int, groups: int, bias: bool, affine: bool) -> None:
    conv_cls, bn_cls = (nn.Conv1d, nn.BatchNorm1d) if dims == 1 else (nn.Conv2d, nn.BatchNorm2d)
    conv = conv_cls(cin, cout, 3, stride=2, padding=1, groups=groups, bias=bias)
    bn = bn_cls(cout, eps=1e-3, affine=affine)
    seq = randomise(nn.Sequential(conv, bn))
    x = torch.randn(3, cin, *([9] * dims))
    fused = fuse_conv_bn(conv, bn)
    assert type(fused) is conv_cls and fused.groups == groups and fused.bias is not None
    assert rel_diff(fused(x), seq(x)) < 1e-5


def test_fuse_linear_bn() -> None:
    linear, bn = nn.Linear(7, 5), nn.BatchNorm1d(5)
    seq = randomise(nn.Sequential(linear, bn))
    x = torch.randn(4, 7)
    fused = fuse_linear_bn(linear, bn)
    assert type(fused) is nn.Linear
    assert rel_diff(fused(x), seq(x)) < 1e-5


@pytest.mark.parametrize(
    ("dims", "groups", "b1", "b2", "padding_mode"),
    [(2, 1, False, False, "zeros"), (2, 1, True, True, "reflect"), (2, 2, True, False, "zeros"),
     (1, 1, False, True, "zeros")],
)
def test_fuse_conv_conv1x1(dims: int, groups: int, b1: bool, b2: bool, padding_mode: str) -> None:
    cls = nn.Conv1d if dims == 1 else nn.Conv2d
    conv = cls(4, 6, 3, stride=2, padding=1, dilation=1, groups=groups, bias=b1, padding_mode=padding_mode)
    pw = cls(6, 3, 1, bias=b2)
    seq = randomise(nn.Sequential(conv, pw))
    x = torch.randn(2, 4, *([8] * dims))
    fused = fuse_conv_conv1x1(conv, pw)
    assert (fused.in_channels, fused.out_channels, fused.groups) == (4, 3, 1)
    assert (fused.stride, fused.padding, fused.padding_mode) == (conv.stride, conv.padding, padding_mode)
    assert (fused.bias is not None) == (b1 or b2)
    assert rel_diff(fused(x), seq(x)) < 1e-5


def test_fusion_keeps_dtype() -> None:
    conv, bn = nn.Conv2d(3, 4, 3).double(), nn.BatchNorm2d(4).double()
    randomise(nn.Sequential(conv, bn))
    fused = fuse_conv_bn(conv, bn)
    assert fused.weight.dtype == torch.float64 and fused.weight.device == conv.weight.device
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    assert rel_diff(fused(x), bn(conv(x))) < 1e-12
    half = fuse_conv_bn(nn.Conv2d(3, 4, 3).to(torch.bfloat16), nn.BatchNorm2d(4).to(torch.bfloat16))
    assert half.weight.dtype == torch.bfloat16


def test_fusion_errors() -> None:
    with pytest.raises(GraphError, match="track_running_stats=False"):
        fuse_conv_bn(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(GraphError, match=r"BatchNorm2d\(5\) into a conv with 4 outputs"):
        fuse_conv_bn(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(5))
    with pytest.raises(GraphError, match="stride 1, padding 0 and groups 1, got kernel \\(1, 1\\), stride \\(2, 2\\)"):
        fuse_conv_conv1x1(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1, stride=2))
    with pytest.raises(GraphError, match="takes 5 channels but the first conv gives 4"):
        fuse_conv_conv1x1(nn.Conv2d(3, 4, 3), nn.Conv2d(5, 2, 1))
    with pytest.raises(GraphError, match="must be a BatchNorm1d\\(5\\)"):
        fuse_linear_bn(nn.Linear(3, 5), nn.BatchNorm1d(4))
    with pytest.raises(GraphError, match="non-empty tuple of nn.Module classes"):
        FusionRule("bad", (int,), fuse_conv_bn)


# -- fuse_model ---------------------------------------------------------------------------------


class Block(nn.Module):
    """BNs as attributes and inside Sequentials; a residual add; a conv read twice."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)  # output also read by the add: no fold
        self.bn2 = nn.BatchNorm2d(8)
        self.proj = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1))
        self.head = nn.Linear(4 * 16, 6)
        self.head_bn = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = torch.relu(self.bn1(self.conv1(x)))
        z = self.conv2(y)
        y = self.bn2(z) + z + x
        y = nn.functional.avg_pool2d(self.proj(y), 2)
        return self.head_bn(self.head(y.flatten(1)))


def test_fuse_model_same_outputs() -> None:
    model = randomise(Block())
    x = torch.randn(3, 3, 8, 8)
    ref = model(x)
    fused = fuse_model(model, x, rules=BUILTIN_RULES, inplace=False)
    assert fused is not model and isinstance(model.bn1, nn.BatchNorm2d)  # the original is untouched
    assert rel_diff(fused(x), ref) < 1e-5
    assert isinstance(fused.stem[1], nn.Identity) and isinstance(fused.bn1, nn.Identity)
    assert isinstance(fused.bn2, nn.BatchNorm2d)  # conv2's output is also added: not foldable
    assert isinstance(fused.head_bn, nn.Identity)
    # conv -> BN -> 1x1 conv: two rounds give a single 3x3 conv with 4 outputs
    assert fused.proj[0].out_channels == 4 and isinstance(fused.proj[1], nn.Identity)
    assert isinstance(fused.proj[2], nn.Identity)
    assert fuse_model(model, x, rules=BUILTIN_RULES) is model  # in place by default
    assert rel_diff(model(x), ref) < 1e-5


def test_fuse_model_leaves_unsafe_chains() -> None:
    class Unsafe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = nn.Conv2d(4, 4, 1)
            self.bn = nn.BatchNorm2d(4)
            self.seq = nn.Linear(5, 5)
            self.seq_bn = nn.BatchNorm1d(5)  # on (N, 5, 5): normalises dim 1, not the linear's features
            self.conv = nn.Conv2d(4, 5, 1)
            self.bn_c = nn.BatchNorm2d(5)
            self.side = nn.Conv2d(4, 4, 1)
            self.bn_s = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.bn(self.shared(self.shared(x)))  # shared conv called twice
            s = self.side(x)
            b = self.bn_s(s) * s.mean()  # side conv output also read by a function
            c = self.bn_c(self.conv(a + b)).mean((2, 3))
            return self.seq_bn(self.seq(c.unsqueeze(1).expand(-1, 5, -1)))

    model = randomise(Unsafe())
    x = torch.randn(2, 4, 3, 3)
    ref = model(x)
    chains = find_chains(model, x, BUILTIN_RULES)
    assert [names for _, names in chains] == [("conv", "bn_c")]
    fuse_model(model, x, rules=BUILTIN_RULES)
    assert rel_diff(model(x), ref) < 1e-5


class Scale(nn.Module):
    """A user module: per-channel scale."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.randn(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.s[:, None, None]


def fold_scale(conv: nn.Conv2d, scale: Scale) -> nn.Conv2d:
    has_bias = conv.bias is not None
    out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=has_bias)
    with torch.no_grad():
        out.weight.copy_(conv.weight * scale.s[:, None, None, None])
        if has_bias:
            out.bias.copy_(conv.bias * scale.s)
    return out


SCALE_RULE = FusionRule("conv_scale", (nn.Conv2d, Scale), fold_scale, "conv then a per-channel scale")


def test_custom_rule_through_fuse_model() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), Scale(4), nn.ReLU(), nn.Conv2d(4, 2, 3, bias=False), Scale(2))
    x = torch.randn(2, 3, 7, 7)
    ref = model(x)
    fuse_model(model, x, rules=[SCALE_RULE])
    assert [type(m).__name__ for m in model] == ["Conv2d", "Identity", "ReLU", "Conv2d", "Identity"]
    assert rel_diff(model(x), ref) < 1e-5


def test_rules_none_uses_the_plugin_registry() -> None:
    from mslim_core.hookspecs import hookimpl
    from mslim_core.plugins import get_plugin_manager

    class ScalePlugin:
        @hookimpl
        def mslim_register_fusers(self, register):  # type: ignore[no-untyped-def]
            register(SCALE_RULE)

    manager = get_plugin_manager()
    manager.register(ScalePlugin(), name="test-scale-fuser")
    try:
        model = randomise(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), Scale(4)))
        x = torch.randn(1, 3, 7, 7)
        ref = model(x)
        fuse_model(model, x)
        assert [type(m).__name__ for m in model] == ["Conv2d", "Identity", "Conv2d", "Identity"]
        assert rel_diff(model(x), ref) < 1e-5
    finally:
        manager.unregister("test-scale-fuser")


def test_conv1x1_rule_skips_folds_that_add_macs() -> None:
    widen = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 64, 1))  # 3*64*9 fused > 3*4*9 + 4*64
    separable = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 16, 1))  # dense 8*16*9 > 8*9 + 8*16
    narrow = nn.Sequential(nn.Conv2d(8, 8, 3), nn.Conv2d(8, 5, 1))
    assert find_chains(widen, torch.randn(1, 3, 6, 6), BUILTIN_RULES) == []
    assert find_chains(separable, torch.randn(1, 8, 6, 6), BUILTIN_RULES) == []
    assert [(r.name, n) for r, n in find_chains(narrow, torch.randn(1, 8, 6, 6), BUILTIN_RULES)] == [
        ("conv2d_conv1x1", ("0", "1"))
    ]


@pytest.mark.parametrize("name", ["resnet56", "mobilenet_v2", "densenet", "yolo_elan"])
def test_fuse_zoo_models(name: str) -> None:
    from mslim.models import create, example_input

    torch.manual_seed(0)
    model = randomise(create(name))
    x = example_input(name)
    ref = model(x)
    fused = fuse_model(model, x, rules=BUILTIN_RULES, inplace=False)
    out = fused(x)
    pairs = zip(out, ref) if isinstance(ref, tuple) else [(out, ref)]
    assert max(rel_diff(a, b) for a, b in pairs) < 1e-4
    left = sum(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    # DenseNet's BNs come before their convs (pre-activation): only the ones after a conv fold
    assert left == (21 if name == "densenet" else 0)
