"""The before/after table printed by ``mslim demo`` and ``mslim train``."""

from __future__ import annotations

from mslim.cli.table import format_table
from mslim.latency import channel_block
from mslim.pipeline import RunResult

__all__ = ["format_comparison", "human"]


def human(count: float) -> str:
    """1234567 -> '1.23M', 27200 -> '27.2k'."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(count) >= size:
            return f"{count / size:.3g}{unit}"
    return f"{count:.0f}"


def format_comparison(result: RunResult) -> str:
    """A table of accuracy, MACs, parameters and latency for the base and the pruned model."""
    base, small = result.base, result.pruned
    rows: list[tuple[str, str, str, str]] = [
        ("accuracy", f"{100 * base.accuracy:.2f}%", f"{100 * small.accuracy:.2f}%",
         f"{100 * (small.accuracy - base.accuracy):+.2f} pt"),
        ("MACs", human(base.macs), human(small.macs),
         f"x{small.macs / base.macs:.3f} ({100 * (1 - small.macs / base.macs):.1f}% fewer)"),
        ("parameters", human(base.params), human(small.params),
         f"x{small.params / base.params:.3f} ({100 * (1 - small.params / base.params):.1f}% fewer)"),
    ]
    for batch, ms in base.latency_ms.items():
        after = small.latency_ms.get(batch)
        if after is None:
            continue
        change = f"{ms / after:.2f}x faster" if after <= ms else f"{after / ms:.2f}x slower"
        rows.append((f"latency, batch {batch}", f"{ms:.2f} ms", f"{after:.2f} ms", change))
    table = format_table(["", "base", "pruned", "change"], rows, align="lrrl")
    notes = []
    if result.accuracy_before_finalize is not None:
        notes.append(f"accuracy of the trained {result.spec.algo} model before finalize: "
                     f"{100 * result.accuracy_before_finalize:.2f}% "
                     f"(finalize changed it by {result.finalize_change_points:+.2f} pt)")
    if result.accuracy_before_finetune is not None:
        when = "finalize" if result.trains else "pruning"
        notes.append(f"accuracy right after {when}, before fine-tuning: {100 * result.accuracy_before_finetune:.2f}%")
    if base.latency_ms:
        fmt = ", channels-last" if result.spec.channels_last else ""
        fmt += ", in ONNX Runtime" if result.spec.latency_runtime == "onnxruntime" else ""
        notes.append(f"latency: median CPU forward time, {result.spec.threads} threads{fmt}, BatchNorm folded in both "
                     f"models; ideal speed-up from MACs: {base.macs / small.macs:.2f}x")
        slower = any(small.latency_ms.get(b, 0.0) > ms for b, ms in base.latency_ms.items())
        if slower and result.spec.latency_runtime == "onnxruntime":
            block = channel_block()
            notes.append(f"ONNX Runtime's CPU kernels take a slower path for channel counts that are not multiples of "
                         f"{block} on this CPU: prune with round_to={block} (mslim train --option round_to={block}); "
                         "see docs/deployment.md")
    return "\n".join([table, *notes])
