"""Every compactor row at once: global row ids, row norms, gradient masks and row scaling, vectorised.

Compactors of the same width D are stacked into one (n, D, D) tensor, so a norm, a mask or a
scale is a handful of tensor operations per *width* (ResNet-56 has 3 widths for 27 compactors,
ResNet-50 4 for 32), written back with one ``torch._foreach_*`` call per width. No per-layer
tensor operation runs in Python on the per-step path.

Global row ``r`` belongs to compactor ``layer_of_row[r]`` and is its output channel
``channel_of_row[r]``; rows are numbered compactor by compactor, in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mslim_resrep.compactor import Compactor

__all__ = ["CompactorBank", "WidthGroup"]


@dataclass
class WidthGroup:
    """Compactors sharing one width D: their indices, parameters and global row ids (n, D)."""

    width: int
    layers: list[int]
    params: list[nn.Parameter]
    row_ids: torch.Tensor
    mask: torch.Tensor | None = None  # (n, D, 1) float on the compactors' device: 1 = gradient flows
    device_row_ids: torch.Tensor | None = None  # row_ids on the compactors' device

    def stacked(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """The group's (D, D, 1, 1) tensors as one (n, D, D) tensor (a copy)."""
        return torch.stack([t.detach() for t in tensors]).view(len(tensors), self.width, self.width)


class CompactorBank:
    """Every compactor's rows numbered globally, with vectorised norms, gradient masks and scaling."""

    def __init__(self, compactors: Sequence[Compactor]) -> None:
        self.compactors = list(compactors)
        self.params: list[nn.Parameter] = [c.weight for c in self.compactors]
        self.widths: list[int] = [int(c.out_channels) for c in self.compactors]
        offsets = [0]
        for w in self.widths:
            offsets.append(offsets[-1] + w)
        self.row_offsets: list[int] = offsets
        self.num_rows = offsets[-1]
        widths = torch.tensor(self.widths, dtype=torch.int64)
        self.layer_of_row = torch.repeat_interleave(torch.arange(len(self.widths)), widths)
        starts = torch.tensor(offsets[:-1], dtype=torch.int64)
        self.channel_of_row = torch.arange(self.num_rows) - starts[self.layer_of_row]
        by_width: dict[int, list[int]] = {}
        for i, w in enumerate(self.widths):
            by_width.setdefault(w, []).append(i)
        self.groups: list[WidthGroup] = [
            WidthGroup(
                width=w,
                layers=layers,
                params=[self.params[i] for i in layers],
                row_ids=torch.stack([torch.arange(offsets[i], offsets[i] + w) for i in layers]),
            )
            for w, layers in by_width.items()
        ]
        self._row_mask = torch.ones(self.num_rows, dtype=torch.bool)
        self._device: torch.device | None = None
        self._dtype: torch.dtype | None = None
        self._sync_device()

    # -- device ----------------------------------------------------------------------------

    def _sync_device(self) -> None:
        """(Re)build the per-group masks when the compactors moved to another device or dtype."""
        if not self.params:
            return
        ref = self.params[0]
        if ref.device == self._device and ref.dtype == self._dtype and all(g.mask is not None for g in self.groups):
            return
        self._device, self._dtype = ref.device, ref.dtype
        self._build_masks()

    def _build_masks(self) -> None:
        for g in self.groups:
            g.mask = self._row_mask[g.row_ids].to(device=self._device, dtype=self._dtype).unsqueeze(-1)
            g.device_row_ids = g.row_ids.to(self._device)

    # -- rows --------------------------------------------------------------------------------

    def row_id(self, layer: int, channel: int) -> int:
        """Global row id of output channel ``channel`` of compactor ``layer``."""
        return self.row_offsets[layer] + channel

    def split_rows(self, values: torch.Tensor) -> list[torch.Tensor]:
        """Cut a per-row vector (num_rows,) into one piece per compactor."""
        return list(values.split(self.widths))

    @torch.no_grad()
    def row_norms(self) -> torch.Tensor:
        """L2 norm of every compactor row, (num_rows,), float32 on the CPU."""
        out = torch.zeros(self.num_rows, dtype=torch.float32)
        for g in self.groups:
            norms = torch.linalg.vector_norm(g.stacked(g.params), dim=2)
            out[g.row_ids.reshape(-1)] = norms.reshape(-1).float().cpu()
        return out

    # -- masks -------------------------------------------------------------------------------

    @property
    def row_mask(self) -> torch.Tensor:
        """Which rows receive the task gradient (True) or are masked (False), on the CPU."""
        return self._row_mask.clone()

    def set_row_mask(self, keep: torch.Tensor) -> None:
        """Set which rows receive the task gradient (bool per row; False = masked)."""
        keep = torch.as_tensor(keep, dtype=torch.bool).reshape(-1).cpu()
        if keep.numel() != self.num_rows:
            raise ValueError(f"a row mask needs {self.num_rows} entries, got {keep.numel()}")
        self._row_mask = keep.clone()
        self._device = None  # rebuild the device masks
        self._sync_device()

    def group_masks(self) -> list[torch.Tensor]:
        """Per width group, the (n, D, 1) gradient mask on the compactors' device."""
        self._sync_device()
        return [g.mask for g in self.groups]  # type: ignore[misc]

    # -- updates -----------------------------------------------------------------------------

    def ensure_grads(self) -> None:
        """Give every compactor that took no part in the last backward pass a zero gradient."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    @torch.no_grad()
    def scale_rows(self, scale: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Multiply every row r of every compactor by ``scale[r]``, and the optimizer's per-weight state alike
        (e.g. SGD momentum), so that state never pushes a shrunk row back."""
        if not self.params:
            return
        self._sync_device()
        scale = scale.to(device=self._device, dtype=self._dtype)
        for g in self.groups:
            factors = list(scale[g.device_row_ids].view(len(g.params), g.width, 1, 1, 1).unbind(0))
            torch._foreach_mul_(g.params, factors)
            if optimizer is None:
                continue
            states: list[torch.Tensor] = []
            state_factors: list[torch.Tensor] = []
            for p, f in zip(g.params, factors):
                state: dict[str, Any] = optimizer.state.get(p, {})
                for value in state.values():
                    if isinstance(value, torch.Tensor) and value.shape == p.shape and value.is_floating_point():
                        states.append(value)
                        state_factors.append(f)
            if states:
                torch._foreach_mul_(states, state_factors)
