"""The compactor (a 1x1 identity-initialised conv) and the module that applies it after a layer."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

__all__ = ["Compacted", "Compactor"]


class Compactor(nn.Conv2d):
    """A bias-free 1x1 ``Conv2d(channels, channels)`` initialised to the identity matrix.

    Its own class so compactors can be found by type; the forward pass is the plain conv
    (the mask only ever acts on gradients).
    """

    def __init__(self, channels: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(channels, channels, kernel_size=1, bias=False, device=device, dtype=dtype)
        self.reset_to_identity()

    @torch.no_grad()
    def reset_to_identity(self) -> None:
        """Set the weight to the identity matrix (the wrapped model then equals the original)."""
        self.weight.zero_()
        idx = torch.arange(self.out_channels, device=self.weight.device)
        self.weight[idx, idx, 0, 0] = 1.0

    @property
    def matrix(self) -> torch.Tensor:
        """The weight as a (rows, columns) matrix view: row i mixes the inputs into output channel i."""
        return self.weight.view(self.out_channels, self.in_channels)

    def row_norms(self) -> torch.Tensor:
        """L2 norm of each row (one per output channel), detached."""
        return torch.linalg.vector_norm(self.matrix.detach(), dim=1)


class Compacted(nn.Sequential):
    """A layer followed by its compactor: replaces a BatchNorm (or a bias conv without BN) in its parent.

    Children are named after their role, so state-dict keys read ``<bn name>.bn.running_mean`` and
    ``<bn name>.compactor.weight`` (``conv`` instead of ``bn`` when the compactor follows a conv).
    """

    def __init__(self, layer: nn.Module, compactor: Compactor, role: str) -> None:
        if role not in ("bn", "conv"):
            raise ValueError(f"role must be 'bn' or 'conv', got {role!r}")
        super().__init__(OrderedDict([(role, layer), ("compactor", compactor)]))
        self.role = role

    @property
    def layer(self) -> nn.Module:
        """The wrapped BatchNorm or conv."""
        return self[0]

    def get_compactor(self) -> Compactor:
        """The compactor applied to the layer's output (also reachable as ``.compactor``)."""
        return self._modules["compactor"]  # type: ignore[return-value]
