"""PNG charts of what pruning did: per-layer output widths before and after (matplotlib, Agg)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping

from mslim_core.atomic import atomic_open
from mslim_core.errors import MslimError

__all__ = ["plot_layer_widths"]


def plot_layer_widths(
    before: Mapping[str, int], after: Mapping[str, int], path: str | Path, title: str = "Output channels per layer"
) -> Path:
    """Bar chart of each layer's output channels before (grey) and after (blue) pruning, written atomically.

    Layers missing from ``after`` (removed by fusion) are drawn at 0.
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MslimError("charts need matplotlib: pip install 'mslim[demo]'") from exc
    names = list(before)
    if not names:
        raise MslimError("no layers to plot")
    old = [before[n] for n in names]
    new = [after.get(n, 0) for n in names]
    width = max(6.0, 0.32 * len(names) + 2.0)
    fig, ax = plt.subplots(figsize=(width, 4.2), dpi=110)
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], old, width=0.4, color="#b0b0b0", label="before")
    ax.bar([x + 0.2 for x in xs], new, width=0.4, color="#2a6fb0", label="after")
    for x, (o, n) in enumerate(zip(old, new)):
        if n != o:
            ax.text(x + 0.2, n, str(n), ha="center", va="bottom", fontsize=6)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("output channels")
    ax.set_title(title)
    ax.legend(frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    path = Path(path)
    with atomic_open(path, "wb") as handle:
        handle.write(buffer.getvalue())
    return path
