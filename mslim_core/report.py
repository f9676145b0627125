"""The report every algorithm's ``finalize`` returns beside the smaller model."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class PruneReport(BaseModel):
    """What pruning did: cost before and after, per-layer widths, and the self-check result."""

    algorithm: str
    config: dict[str, Any] = Field(default_factory=dict)
    flops_target: float | None = None
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    layer_widths: dict[str, tuple[int, int]] = Field(
        default_factory=dict, description="Per pruned layer: output channels before and after."
    )
    max_output_diff: float | None = Field(
        None, description="Max absolute output difference against the reference on the example inputs."
    )
    warnings: list[str] = Field(default_factory=list)
    extra: dict[str, Any] = Field(default_factory=dict)

    @property
    def flops_ratio(self) -> float:
        """Achieved fraction of FLOPs kept (MACs after / before)."""
        return self.macs_after / self.macs_before if self.macs_before else 1.0

    @property
    def params_ratio(self) -> float:
        """Fraction of parameters kept."""
        return self.params_after / self.params_before if self.params_before else 1.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, ratios included."""
        data = self.model_dump(mode="json")
        data["flops_ratio"] = self.flops_ratio
        data["params_ratio"] = self.params_ratio
        return data

    def summary(self) -> str:
        """A few human-readable lines."""
        lines = [
            f"algorithm      {self.algorithm}",
            f"MACs           {self.macs_before:,} -> {self.macs_after:,} (ratio {self.flops_ratio:.4f}"
            + (f", target {self.flops_target}" if self.flops_target is not None else "")
            + ")",
            f"parameters     {self.params_before:,} -> {self.params_after:,} (ratio {self.params_ratio:.4f})",
        ]
        if self.max_output_diff is not None:
            lines.append(f"max out. diff  {self.max_output_diff:.3g}")
        lines.extend(f"warning        {w}" for w in self.warnings)
        return "\n".join(lines)
