"""The record of channel removals: what was removed, in an order that can be replayed.

Each :class:`Removal` names a unit (the qualified name of its root layer) and the channel
indices removed *in the unit's indexing at the time of the call* (the channels that were left
by earlier removals, numbered 0..n-1). Replaying the list in order on a fresh copy of the same
architecture (``ChannelGraph.replay``) rebuilds the same pruned shapes. The list is plain data
(strings and ints), so it can be stored as JSON without pickling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from mslim_core.errors import GraphError


@dataclass(frozen=True)
class Removal:
    """Channels removed from one unit, numbered as the unit's channels were just before removal."""

    unit: str
    indices: tuple[int, ...]

    def to_json(self) -> list[Any]:
        """``[unit, [indices...]]``: the JSON form used by :func:`removals_to_json`."""
        return [self.unit, list(self.indices)]


def removals_to_json(removals: Iterable[Removal]) -> list[list[Any]]:
    """Plain lists ``[[unit, [idx, ...]], ...]`` that ``json.dumps`` accepts."""
    return [r.to_json() for r in removals]


def removals_from_json(data: Any) -> list[Removal]:
    """Parse what :func:`removals_to_json` wrote (also accepts ``(unit, indices)`` pairs and Removal)."""
    if not isinstance(data, (list, tuple)):
        raise GraphError(f"a removal record must be a list of [unit, [indices]] pairs, got {type(data).__name__}")
    out = []
    for pos, item in enumerate(data):
        if isinstance(item, Removal):
            out.append(item)
            continue
        if (
            not isinstance(item, (list, tuple))
            or len(item) != 2
            or not isinstance(item[0], str)
            or not isinstance(item[1], (list, tuple))
        ):
            raise GraphError(f"removal record entry {pos} must be [unit name, [indices]], got {item!r}")
        out.append(Removal(item[0], tuple(check_int_list(item[1], f"removal record entry {pos}"))))
    return out


def check_int_list(idxs: Any, what: str) -> list[int]:
    """Turn a list/tuple/1-d integer tensor into a list of ints, or raise GraphError naming `what`."""
    if isinstance(idxs, torch.Tensor):
        if idxs.dtype == torch.bool:
            raise GraphError(f"{what}: pass channel indices, not a boolean mask (use mask.nonzero().flatten())")
        if idxs.is_floating_point() or idxs.is_complex():
            raise GraphError(f"{what}: channel indices must be integers, got a {idxs.dtype} tensor")
        if idxs.dim() > 1:
            raise GraphError(f"{what}: channel indices must be a 1-d sequence, got shape {tuple(idxs.shape)}")
        return [int(i) for i in idxs.reshape(-1).tolist()]
    if isinstance(idxs, (int,)) and not isinstance(idxs, bool):
        return [int(idxs)]
    if not isinstance(idxs, Sequence) or isinstance(idxs, (str, bytes)):
        raise GraphError(f"{what}: channel indices must be a sequence of ints, got {type(idxs).__name__}")
    out = []
    for i in idxs:
        if isinstance(i, bool) or not isinstance(i, int):
            if isinstance(i, torch.Tensor) and i.dim() == 0 and not i.is_floating_point():
                out.append(int(i))
                continue
            raise GraphError(f"{what}: channel indices must be integers, got {i!r}")
        out.append(int(i))
    return out


def validate_indices(idxs: Any, channels: int, unit: str) -> list[int]:
    """Sorted, checked indices to remove from a unit of `channels` channels.

    Raises GraphError on duplicates, indices outside ``0..channels-1``, or removing every channel.
    """
    what = f"unit '{unit}'"
    values = check_int_list(idxs, what)
    seen: set[int] = set()
    dups = sorted({i for i in values if i in seen or seen.add(i)})  # type: ignore[func-returns-value]
    if dups:
        raise GraphError(f"{what}: duplicate channel indices {dups[:10]}; each channel can be removed once")
    bad = [i for i in values if i < 0 or i >= channels]
    if bad:
        raise GraphError(
            f"{what}: channel indices {bad[:10]} out of range; the unit has {channels} channels (0..{channels - 1})"
        )
    if len(values) >= channels and channels > 0:
        raise GraphError(
            f"{what}: removing all {channels} channels would empty the layer; keep at least one channel"
        )
    return sorted(values)
