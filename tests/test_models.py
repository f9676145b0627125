"""Tests of the model zoo: names, shapes, structure, parameter counts and RepConv fusion."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mslim.models import (
    BasicBlock,
    Bottleneck,
    DenseNet,
    InvertedResidual,
    RepConv,
    YoloElan,
    available,
    create,
    example_input,
    info,
)
from mslim.models.densenet import DenseLayer
from mslim.models.yolo_elan import ELAN, SPPCSPC
from mslim_core.errors import MslimError

NAMES = [
    "densenet",
    "mobilenet_v2",
    "resnet110",
    "resnet20",
    "resnet50",
    "resnet56",
    "vgg16_bn",
    "yolo_elan",
]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_outputs(name: str, out: object, batch: int, num_classes: int, side: int) -> None:
    if info(name).task == "detection":
        assert isinstance(out, tuple) and len(out) == 3
        for o, stride in zip(out, (8, 16, 32)):
            assert o.shape == (batch, 3 * (num_classes + 5), side // stride, side // stride)
    else:
        assert isinstance(out, torch.Tensor)
        assert out.shape == (batch, num_classes)


def test_available_lists_every_model() -> None:
    assert available() == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_create_and_forward_example_input(name: str) -> None:
    model = create(name, num_classes=10).eval()
    x = example_input(name, batch=2)
    assert x.shape[:2] == (2, 3) and x.shape[2] == x.shape[3] == info(name).input_size
    with torch.no_grad():
        out = model(x)
    _check_outputs(name, out, 2, 10, x.shape[-1])


@pytest.mark.parametrize("name", NAMES)
def test_single_channel_input_and_other_class_count(name: str) -> None:
    model = create(name, num_classes=7, in_channels=1).eval()
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == 1
    x = example_input(name, batch=1, in_channels=1)
    with torch.no_grad():
        out = model(x)
    _check_outputs(name, out, 1, 7, x.shape[-1])


def test_training_mode_backward_runs() -> None:
    model = create("resnet20")
    loss = model(example_input("resnet20", batch=4)).sum()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def _cifar_resnet_params(n: int, num_classes: int = 10) -> int:
    """Hand count for a 6n+2 CIFAR ResNet with projection (1x1 conv + BN) downsampling shortcuts.

    Conv weights are c_in*c_out*k*k (no bias); each BN has 2 parameters per channel.
      stem:    3*16*9 + 2*16                                               =    464
      stage 1: n * (2*16*16*9 + 2*2*16)                                    = n*4672
      stage 2: 16*32*9 + 32*32*9 + 2*2*32 + (16*32 + 2*32)                 =  14528
               + (n-1) * (2*32*32*9 + 2*2*32)                              + (n-1)*18560
      stage 3: 32*64*9 + 64*64*9 + 2*2*64 + (32*64 + 2*64)                 =  57728
               + (n-1) * (2*64*64*9 + 2*2*64)                              + (n-1)*73984
      fc:      64*num_classes + num_classes
    """
    stem = 3 * 16 * 9 + 2 * 16
    stage1 = n * (2 * 16 * 16 * 9 + 2 * 2 * 16)
    stage2 = 16 * 32 * 9 + 32 * 32 * 9 + 2 * 2 * 32 + 16 * 32 + 2 * 32 + (n - 1) * (2 * 32 * 32 * 9 + 2 * 2 * 32)
    stage3 = 32 * 64 * 9 + 64 * 64 * 9 + 2 * 2 * 64 + 32 * 64 + 2 * 64 + (n - 1) * (2 * 64 * 64 * 9 + 2 * 2 * 64)
    return stem + stage1 + stage2 + stage3 + 64 * num_classes + num_classes


def test_cifar_resnet_parameter_counts() -> None:
    # ResNet-56 (n=9): 464 + 42048 + 163008 + 649600 + 650 = 855,770 (~0.86M).
    assert _params(create("resnet56")) == _cifar_resnet_params(9) == 855_770
    # ResNet-20 (n=3): 464 + 14016 + 51648 + 205696 + 650 = 272,474 (~0.27M).
    assert _params(create("resnet20")) == _cifar_resnet_params(3) == 272_474
    assert _params(create("resnet110")) == _cifar_resnet_params(18)
    assert _params(create("resnet56", num_classes=100)) == _cifar_resnet_params(9, 100)


@pytest.mark.parametrize(("name", "blocks"), [("resnet20", 9), ("resnet56", 27), ("resnet110", 54)])
def test_cifar_resnet_blocks_and_names(name: str, blocks: int) -> None:
    model = create(name)
    found = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(found) == blocks
    for block in found:
        for attr in ("conv1", "bn1", "conv2", "bn2", "shortcut"):
            assert hasattr(block, attr)
        assert isinstance(block.conv1, nn.Conv2d) and isinstance(block.bn1, nn.BatchNorm2d)
    # Projection shortcuts only where the shape changes: the first blocks of stages 2 and 3.
    projections = [b for b in found if isinstance(b.shortcut, nn.Sequential)]
    assert projections == [model.layer2[0], model.layer3[0]]
    assert isinstance(model.layer2[0].shortcut[0], nn.Conv2d)
    assert model.layer2[0].shortcut[0].kernel_size == (1, 1)


def test_resnet50_structure() -> None:
    model = create("resnet50")
    bottlenecks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    assert len(bottlenecks) == 16
    assert [len(s) for s in (model.layer1, model.layer2, model.layer3, model.layer4)] == [3, 4, 6, 3]
    projections = [b for b in bottlenecks if isinstance(b.shortcut, nn.Sequential)]
    assert projections == [model.layer1[0], model.layer2[0], model.layer3[0], model.layer4[0]]
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert model.fc.in_features == 2048
    # Well-known ResNet-50 size with a 1000-way fc: 25,557,032 parameters.
    assert _params(create("resnet50", num_classes=1000)) == 25_557_032


def test_resnet50_accepts_small_and_odd_inputs() -> None:
    model = create("resnet50").eval()
    with torch.no_grad():
        for side in (32, 45):
            assert model(torch.randn(1, 3, side, side)).shape == (1, 10)


def test_vgg16_bn_structure() -> None:
    model = create("vgg16_bn")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13
    assert _count(model, nn.BatchNorm2d) == 13 and _count(model, nn.MaxPool2d) == 5
    assert isinstance(model.classifier[-1], nn.Linear) and model.classifier[-1].out_features == 10


def test_mobilenet_v2_structure() -> None:
    model = create("mobilenet_v2")
    blocks = [m for m in model.modules() if isinstance(m, InvertedResidual)]
    assert len(blocks) == 17
    assert sum(b.use_residual for b in blocks) == 10
    for b in blocks:
        dw = b.depthwise.conv
        assert dw.groups == dw.in_channels == dw.out_channels and dw.kernel_size == (3, 3)
        assert not hasattr(b.project, "act")  # linear bottleneck
    assert _count(model, nn.ReLU6) == 2 + sum(isinstance(b.expand, nn.Sequential) for b in blocks) + 17


def test_densenet_concatenates_growth_channels() -> None:
    model = create("densenet")
    assert isinstance(model, DenseNet)
    layer = next(m for m in model.modules() if isinstance(m, DenseLayer))
    x = torch.randn(2, layer.bn1.num_features, 8, 8)
    y = layer(x)
    assert y.shape[1] == x.shape[1] + 12
    assert torch.equal(y[:, : x.shape[1]], x)
    assert _count(model, DenseLayer) == 18
    assert create("densenet", growth=8).conv1.out_channels == 16


def test_yolo_elan_structure_and_strides() -> None:
    model = create("yolo_elan", num_classes=3).eval()
    assert isinstance(model, YoloElan)
    assert _count(model, RepConv) == 3 and _count(model, SPPCSPC) == 1 and _count(model, ELAN) == 8
    assert [m.kernel_size for m in model.sppcspc.pools] == [5, 9, 13]
    ups = [m for m in model.modules() if isinstance(m, nn.Upsample)]
    assert len(ups) == 2 and all(u.mode == "nearest" for u in ups)
    assert all(isinstance(m.act, nn.SiLU) for m in model.modules() if isinstance(m, RepConv))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 96, 160))
    assert [tuple(o.shape) for o in out] == [(1, 24, 12, 20), (1, 24, 6, 10), (1, 24, 3, 5)]


def _randomise_bn(model: nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = torch.rand(c, generator=gen) + 0.5
            m.bias.data = torch.randn(c, generator=gen)
            m.running_mean = torch.randn(c, generator=gen)
            m.running_var = torch.rand(c, generator=gen) + 0.5


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize(("c_in", "c_out", "stride"), [(16, 16, 1), (8, 24, 1), (16, 16, 2)])
def test_repconv_fuse_matches_unfused(c_in: int, c_out: int, stride: int) -> None:
    gen = torch.Generator().manual_seed(1)
    rep = RepConv(c_in, c_out, stride)
    assert (rep.branch_id is not None) == (c_in == c_out and stride == 1)
    _randomise_bn(rep, gen)
    rep.eval()
    x = torch.randn(2, c_in, 11, 11, generator=gen)
    with torch.no_grad():
        before = rep(x)
        rep.reparameterize()
        after = rep(x)
    assert before.shape == after.shape
    assert _rel_err(after, before) < 1e-5
    convs = [m for m in rep.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 and convs[0].kernel_size == (3, 3) and convs[0].bias is not None
    assert _count(rep, nn.BatchNorm2d) == 0
    assert rep.fuse() is rep  # fusing twice is a no-op


def test_yolo_reparameterize_keeps_outputs() -> None:
    gen = torch.Generator().manual_seed(2)
    model = create("yolo_elan")
    _randomise_bn(model, gen)
    model.eval()
    x = example_input("yolo_elan")
    with torch.no_grad():
        before = model(x)
        model.reparameterize()
        after = model(x)
    for a, b in zip(after, before):
        assert _rel_err(a, b) < 1e-5


def test_convs_use_kaiming_init() -> None:
    conv = create("resnet56").layer3[5].conv2
    fan_out = conv.out_channels * 9
    assert math.isclose(conv.weight.std().item(), math.sqrt(2.0 / fan_out), rel_tol=0.05)
    bn = create("resnet56").layer3[5].bn2
    assert torch.equal(bn.weight, torch.ones_like(bn.weight))


def test_unknown_name_suggests_closest_match() -> None:
    with pytest.raises(MslimError, match=r"unknown model 'resnet65'.*Did you mean 'resnet56'\?"):
        create("resnet65")
    with pytest.raises(MslimError, match=r"Available models: densenet, mobilenet_v2"):
        example_input("nothing_like_it")
    with pytest.raises(MslimError, match="Did you mean 'vgg16_bn'"):
        create("VGG16_bn")


def test_bad_options_raise_mslim_errors() -> None:
    with pytest.raises(MslimError, match=r"no option 'growht'.*growth"):
        create("densenet", growht=8)
    with pytest.raises(MslimError, match="extra options: none"):
        create("resnet56", width=2)
    with pytest.raises(MslimError, match="num_classes must be a positive integer, got 0"):
        create("resnet20", num_classes=0)
    with pytest.raises(MslimError, match="batch must be a positive integer"):
        example_input("resnet20", batch=0)
