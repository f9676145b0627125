"""A width-scaled YOLOv7-style detector: ELAN backbone, SPPCSPC, FPN/PAN neck, RepConv, 1x1 heads.

Strides 8/16/32; input sides must be multiples of 32. Channel counts are YOLOv7's times `width`.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import ConvBNAct, init_weights


class Conv(ConvBNAct):
    """YOLO's basic unit: conv-BN-SiLU (1x1 by default)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, act=nn.SiLU)


class ELAN(nn.Module):
    """Two 1x1 branches; the second feeds a chain of 3x3 convs; the two branch outputs and the chain
    outputs listed in `taps` are concatenated and mixed by a 1x1 conv."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        branch: int,
        chain: int,
        depth: int = 4,
        taps: tuple[int, ...] = (1, 3),
    ) -> None:
        super().__init__()
        self.cv1 = Conv(in_channels, branch)
        self.cv2 = Conv(in_channels, branch)
        self.chain = nn.ModuleList(Conv(branch if i == 0 else chain, chain, 3) for i in range(depth))
        self.taps = tuple(taps)
        self.out = Conv(2 * branch + len(self.taps) * chain, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(x)
        parts = [self.cv1(x), y]
        for i, conv in enumerate(self.chain):
            y = conv(y)
            if i in self.taps:
                parts.append(y)
        return self.out(torch.cat(parts, dim=1))


class MPDown(nn.Module):
    """Stride-2 downsample: cat([1x1 -> 3x3 stride-2 conv, maxpool -> 1x1 conv]); 2*half output channels."""

    def __init__(self, in_channels: int, half: int) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2, 2)
        self.pool_conv = Conv(in_channels, half)
        self.reduce = Conv(in_channels, half)
        self.down = Conv(half, half, 3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.down(self.reduce(x)), self.pool_conv(self.pool(x))], dim=1)


class SPPCSPC(nn.Module):
    """CSP split: one branch runs convs, max-pools 5/9/13 (concatenated with their input) and more convs;
    the other is a 1x1 conv; both are concatenated and mixed by a 1x1 conv."""

    def __init__(self, in_channels: int, out_channels: int, pool_sizes: tuple[int, ...] = (5, 9, 13)) -> None:
        super().__init__()
        c = out_channels
        self.cv1 = Conv(in_channels, c)
        self.cv2 = Conv(in_channels, c)
        self.cv3 = Conv(c, c, 3)
        self.cv4 = Conv(c, c)
        self.pools = nn.ModuleList(nn.MaxPool2d(k, 1, k // 2) for k in pool_sizes)
        self.cv5 = Conv((len(pool_sizes) + 1) * c, c)
        self.cv6 = Conv(c, c, 3)
        self.cv7 = Conv(2 * c, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv4(self.cv3(self.cv1(x)))
        y = self.cv6(self.cv5(torch.cat([y] + [pool(y) for pool in self.pools], dim=1)))
        return self.cv7(torch.cat([y, self.cv2(x)], dim=1))


def _fold_bn(weight: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias of conv(weight) followed by `bn` in eval mode."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return weight * scale.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


class RepConv(nn.Module):
    """Training-time sum of 3x3 conv-BN, 1x1 conv-BN and (same shape only) an identity BN, then SiLU.

    `fuse()` (alias `reparameterize()`) folds the branches into one 3x3 conv with bias that gives the
    same eval-mode output.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.branch3x3 = ConvBNAct(in_channels, out_channels, 3, stride, act=None)
        self.branch1x1 = ConvBNAct(in_channels, out_channels, 1, stride, act=None)
        self.branch_id: nn.BatchNorm2d | None = (
            nn.BatchNorm2d(in_channels) if in_channels == out_channels and stride == 1 else None
        )
        self.fused: nn.Conv2d | None = None
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.act(self.fused(x))
        out = self.branch3x3(x) + self.branch1x1(x)
        if self.branch_id is not None:
            out = out + self.branch_id(x)
        return self.act(out)

    @torch.no_grad()
    def fuse(self) -> "RepConv":
        """Replace the branches by one equivalent 3x3 conv (uses BN running statistics); returns self."""
        if self.fused is not None:
            return self
        conv3 = self.branch3x3.conv
        kernel, bias = _fold_bn(conv3.weight, self.branch3x3.bn)
        k1, b1 = _fold_bn(self.branch1x1.conv.weight, self.branch1x1.bn)
        kernel[:, :, 1:2, 1:2] += k1
        bias = bias + b1
        if self.branch_id is not None:
            eye = torch.zeros_like(conv3.weight)
            idx = torch.arange(conv3.in_channels)
            eye[idx, idx, 1, 1] = 1.0
            k_id, b_id = _fold_bn(eye, self.branch_id)
            kernel += k_id
            bias = bias + b_id
        fused = nn.Conv2d(conv3.in_channels, conv3.out_channels, 3, conv3.stride, 1, bias=True)
        fused.to(device=kernel.device, dtype=kernel.dtype)
        fused.weight.copy_(kernel)
        fused.bias.copy_(bias)
        self.fused = fused
        del self.branch3x3, self.branch1x1
        self.branch_id = None
        return self

    reparameterize = fuse


def _ch(channels: int, width: float) -> int:
    """YOLOv7 channel count scaled by width, rounded to a multiple of 8 (at least 8)."""
    return max(8, int(channels * width + 4) // 8 * 8)


class YoloElan(nn.Module):
    """YOLOv7-style detector scaled by `width`; returns raw head maps (P3, P4, P5) at strides 8/16/32,
    each with anchors*(num_classes+5) channels."""

    def __init__(
        self, num_classes: int = 80, in_channels: int = 3, width: float = 0.25, anchors: int = 3
    ) -> None:
        super().__init__()

        def c(n: int) -> int:
            return _ch(n, width)

        self.num_classes = num_classes
        self.num_anchors = anchors
        # backbone
        self.stem = nn.Sequential(
            Conv(in_channels, c(32), 3),
            Conv(c(32), c(64), 3, 2),
            Conv(c(64), c(64), 3),
            Conv(c(64), c(128), 3, 2),
        )
        self.elan1 = ELAN(c(128), c(256), c(64), c(64))
        self.down1 = MPDown(c(256), c(128))
        self.elan2 = ELAN(c(256), c(512), c(128), c(128))
        self.down2 = MPDown(c(512), c(256))
        self.elan3 = ELAN(c(512), c(1024), c(256), c(256))
        self.down3 = MPDown(c(1024), c(512))
        self.elan4 = ELAN(c(1024), c(1024), c(256), c(256))
        # neck: top-down (FPN)
        self.sppcspc = SPPCSPC(c(1024), c(512))
        self.lat5 = Conv(c(512), c(256))
        self.up5 = nn.Upsample(scale_factor=2, mode="nearest")
        self.route4 = Conv(c(1024), c(256))
        head_taps = (0, 1, 2, 3)
        self.elan_td4 = ELAN(c(512), c(256), c(256), c(128), taps=head_taps)
        self.lat4 = Conv(c(256), c(128))
        self.up4 = nn.Upsample(scale_factor=2, mode="nearest")
        self.route3 = Conv(c(512), c(128))
        self.elan_out3 = ELAN(c(256), c(128), c(128), c(64), taps=head_taps)
        # neck: bottom-up (PAN)
        self.down_p3 = MPDown(c(128), c(128))
        self.elan_out4 = ELAN(c(512), c(256), c(256), c(128), taps=head_taps)
        self.down_p4 = MPDown(c(256), c(256))
        self.elan_out5 = ELAN(c(1024), c(512), c(512), c(256), taps=head_taps)
        self.rep3 = RepConv(c(128), c(256))
        self.rep4 = RepConv(c(256), c(512))
        self.rep5 = RepConv(c(512), c(1024))
        out = anchors * (num_classes + 5)
        self.heads = nn.ModuleList(nn.Conv2d(c(n), out, 1) for n in (256, 512, 1024))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.elan1(self.stem(x))
        p3 = self.elan2(self.down1(x))
        p4 = self.elan3(self.down2(p3))
        p5 = self.sppcspc(self.elan4(self.down3(p4)))
        t4 = self.elan_td4(torch.cat([self.route4(p4), self.up5(self.lat5(p5))], dim=1))
        n3 = self.elan_out3(torch.cat([self.route3(p3), self.up4(self.lat4(t4))], dim=1))
        n4 = self.elan_out4(torch.cat([self.down_p3(n3), t4], dim=1))
        n5 = self.elan_out5(torch.cat([self.down_p4(n4), p5], dim=1))
        feats = (self.rep3(n3), self.rep4(n4), self.rep5(n5))
        o3, o4, o5 = (head(f) for head, f in zip(self.heads, feats))
        return o3, o4, o5

    def reparameterize(self) -> "YoloElan":
        """Fuse every RepConv in place (eval-mode outputs unchanged); returns self."""
        for m in [m for m in self.modules() if isinstance(m, RepConv)]:
            m.fuse()
        return self


def yolo_elan(num_classes: int = 10, in_channels: int = 3, width: float = 0.25) -> YoloElan:
    """YOLOv7-style detector at a quarter of YOLOv7's width."""
    return YoloElan(num_classes, in_channels, width)
