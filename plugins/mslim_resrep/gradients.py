"""ResRep's "gradient resetting": masked task gradients plus a group-lasso term on every compactor row.

For every compactor weight Q (rows = output channels), after ``loss.backward()`` and before
``optimizer.step()``::

    Q.grad = mask[:, None] * Q.grad + lasso_strength * Q / max(||Q_row||_2, tiny)

The lasso term applies to every row, masked or not; a row that is exactly zero gets none
(0 / tiny = 0, never NaN). All compactors of one width are processed as one stacked tensor and
written back with one ``torch._foreach_copy_`` (see ``CompactorBank``): no per-layer tensor
operation in Python.

Mixed precision: with a ``torch.amp.GradScaler`` call ``scaler.unscale_(optimizer)`` first, then
this, then ``scaler.step(optimizer)``. On scaled gradients the lasso term would be multiplied
by the loss scale relative to the task gradient (and then divided by it), i.e. its strength would
silently be divided by the loss scale.
"""

from __future__ import annotations

import torch

from mslim_resrep.bank import CompactorBank

__all__ = ["reset_gradients"]


@torch.no_grad()
def reset_gradients(bank: CompactorBank, lasso_strength: float) -> None:
    """Apply ``grad = mask * grad + lasso * Q / ||Q_row||`` to every compactor in ``bank``, in place."""
    if not bank.params:
        return
    bank.ensure_grads()
    for group, mask in zip(bank.groups, bank.group_masks()):
        grads = [p.grad for p in group.params]
        g = group.stacked(grads)  # (n, D, D), a copy
        g.mul_(mask.to(g.dtype))
        if lasso_strength:
            w = group.stacked(group.params).to(g.dtype)
            norms = torch.linalg.vector_norm(w, dim=2, keepdim=True)
            inv = norms.clamp_min_(torch.finfo(norms.dtype).tiny).reciprocal_()
            # Q / ||Q_row|| has entries in [-1, 1]; the clamp only matters if a squared norm underflows
            g.add_(w.mul_(inv).clamp_(-1.0, 1.0), alpha=lasso_strength)
        torch._foreach_copy_(grads, list(g.view(len(grads), group.width, group.width, 1, 1).unbind(0)))
