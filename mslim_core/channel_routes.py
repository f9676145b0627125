"""Exact channel-index mappings through concat and split/chunk nodes of torch-pruning's graph.

torch-pruning 1.6.1 pairs the outputs of a split with its chunks by the order in which tracing met
them (not by chunk number), assumes every chunk is used and equally sized, and composes
split-then-concat mappings in a fixed order. That is wrong for uneven ``torch.split``, unused or
reordered chunks, and a chunk fed straight into a concat. Here every data-flow edge ``P -> C``
that touches a concat or split gets one mapping built from the autograd graph itself: which
positions of ``C``'s inputs read ``P`` (the concat slot) and which output number of ``P`` they
read (the chunk). The offsets are read from the live ``concat_sizes`` / ``split_sizes`` at call
time, which torch-pruning updates on every removal, so mappings stay right after removals.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch_pruning import _helpers, ops
from torch_pruning.dependency import DependencyGraph, Node

Route = tuple[int | None, int | None]  # (chunk number of P when P is a split, slot of C when C is a concat)


def _offsets(sizes: Sequence[int]) -> list[int]:
    out = [0]
    for s in sizes:
        out.append(out[-1] + int(s))
    return out


class RouteMapping:
    """Maps indices along one edge P -> C (``reverse``: from C's coordinates back to P's)."""

    def __init__(self, routes: list[Route], split_op: Any, cat_op: Any, reverse: bool) -> None:
        self.routes = routes
        self.split_op = split_op
        self.cat_op = cat_op
        self.reverse = reverse

    def __call__(self, idxs: list) -> list:
        soff = _offsets(self.split_op.split_sizes) if self.split_op is not None else None
        coff = _offsets(self.cat_op.concat_sizes) if self.cat_op is not None else None
        out: list = []
        seen: set[int] = set()
        for item in idxs:
            for chunk, slot in self.routes:
                v = item.idx
                if not self.reverse:
                    if chunk is not None:
                        if not soff[chunk] <= v < soff[chunk + 1]:
                            continue
                        v -= soff[chunk]
                    if slot is not None:
                        v += coff[slot]
                else:
                    if slot is not None:
                        if not coff[slot] <= v < coff[slot + 1]:
                            continue
                        v -= coff[slot]
                    if chunk is not None:
                        v += soff[chunk]
                if v not in seen:
                    seen.add(v)
                    out.append(_helpers._HybridIndex(idx=v, root_idx=item.root_idx))
        return out

    def __repr__(self) -> str:
        return f"RouteMapping(routes={self.routes}, reverse={self.reverse})"


def is_concat(node: Node) -> bool:
    """True for a torch.cat node."""
    return node.type == ops.OPTYPE.CONCAT


def is_split(node: Node) -> bool:
    """True for a split/chunk node."""
    return node.type == ops.OPTYPE.SPLIT


def edge_routes(producer: Node, consumer: Node) -> list[Route]:
    """How `consumer` reads `producer`: one (chunk, slot) pair per use, from the autograd graph."""
    nexts = getattr(consumer.grad_fn, "next_functions", ()) or ()
    routes: list[Route] = []
    for pos, (fn, nr) in enumerate(nexts):
        if fn is not None and fn is producer.grad_fn:
            routes.append((int(nr) if is_split(producer) else None, pos if is_concat(consumer) else None))
    return routes


def install_route_mappings(dg: DependencyGraph, nodes: Sequence[Node]) -> dict[Node, str]:
    """Replace torch-pruning's concat/split mappings around `nodes` by exact ones.

    Returns nodes that cannot be mapped, with the reason (the caller refuses units through them).
    """
    problems: dict[Node, str] = {}
    edges: set[tuple[Node, Node]] = set()
    for node in nodes:
        node.enable_index_mapping = False  # torch-pruning must not overwrite ours
        for p in node.inputs:
            edges.add((p, node))
        for c in node.outputs:
            edges.add((node, c))
    for p, c in edges:
        routes = edge_routes(p, c)
        if not routes:
            special = p if is_split(p) or is_concat(p) else c
            problems[special] = "an input/output pairing that cannot be read from the graph"
            continue
        split_op = p.module if is_split(p) else None
        cat_op = c.module if is_concat(c) else None
        if is_split(p) and c.type in (ops.OPTYPE.RESHAPE, ops.OPTYPE.SLICE, ops.OPTYPE.UNBIND, ops.OPTYPE.EXPAND):
            problems[c] = "a reshape or slice applied directly to a chunk of a split"
        if is_split(c) and p.type in (ops.OPTYPE.RESHAPE, ops.OPTYPE.SLICE, ops.OPTYPE.UNBIND, ops.OPTYPE.EXPAND):
            problems[p] = "a split applied directly to a reshaped or sliced tensor"
        trivial = all(r == (None, None) for r in routes)
        fwd = None if trivial else RouteMapping(routes, split_op, cat_op, reverse=False)
        rev = None if trivial else RouteMapping(routes, split_op, cat_op, reverse=True)
        for dep in p.dependencies:
            if dep.target is c:
                dep.index_mapping[1] = fwd
                if is_split(p) or is_split(c):
                    dep.index_mapping[0] = None
        for dep in c.dependencies:
            if dep.target is p:
                dep.index_mapping[1] = rev
                if is_split(p) or is_split(c):
                    dep.index_mapping[0] = None
    return problems


class FlattenMapping:
    """Channel i <-> features ``i*stride .. (i+1)*stride-1`` of a channel-major flatten."""

    def __init__(self, stride: int, reverse: bool) -> None:
        self.stride = stride
        self.reverse = reverse

    def __call__(self, idxs: list) -> list:
        s = self.stride
        if self.reverse:
            out, seen = [], set()
            for item in idxs:
                v = item.idx // s
                if v not in seen:
                    seen.add(v)
                    out.append(_helpers._HybridIndex(idx=v, root_idx=item.root_idx))
            return out
        return [_helpers._HybridIndex(idx=item.idx * s + k, root_idx=item.root_idx) for item in idxs for k in range(s)]

    def __repr__(self) -> str:
        return f"FlattenMapping(stride={self.stride}, reverse={self.reverse})"


class _FrozenShape:
    """Stands in for a reshape node's autograd node so torch-pruning keeps our mapping.

    torch-pruning re-derives flatten strides by shape inference before every group, which
    miscounts channels that come through split/concat; a saved size of rank 2 makes it skip.
    """

    _saved_self_sizes = (0, 0)

    def __init__(self, grad_fn: Any) -> None:
        self.original = grad_fn

    def name(self) -> str:
        return self.original.name()


def install_flatten_mapping(node: Node, stride: int) -> None:
    """Give a reshape node a fixed channel->feature mapping (identity when `stride` is 1)."""
    fwd = FlattenMapping(stride, reverse=False) if stride > 1 else None
    rev = FlattenMapping(stride, reverse=True) if stride > 1 else None
    for p in node.inputs:
        for dep in p.dependencies:
            if dep.target is node:
                dep.index_mapping[0] = fwd
        for dep in node.dependencies:
            if dep.target is p:
                dep.index_mapping[0] = rev
    for c in node.outputs:
        for dep in node.dependencies:
            if dep.target is c:
                dep.index_mapping[0] = None
        for dep in c.dependencies:
            if dep.target is node:
                dep.index_mapping[0] = None
    node.grad_fn = _FrozenShape(node.grad_fn)
