"""The structured pruning report: what each group lost, and the model's work before and after.

`StructuredReport` is topic `"structured-pruning"` in `PassContext.artifacts`: `--report FILE`
writes its JSON, the command line prints its table. One row per pruned group (pass, group, units
removed of units, parameters and MatMul/Gemm/Conv FLOPs of the group's layers before and after),
and one summary per pass run (the model's FLOPs and float parameters before and after, and the
output cosine similarity on the calibration data when there was any). FLOPs are per batch x
sequence element: symbolic dims count 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from graphopt.passes.manager import PassContext

__all__ = ["GroupRow", "PassSummary", "RefitRow", "StructuredReport", "structured_report"]


@dataclass
class GroupRow:
    pass_name: str
    group: str
    removed: int
    units: int
    unit: str
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int


@dataclass
class PassSummary:
    pass_name: str
    flops_before: int
    flops_after: int
    params_before: int
    params_after: int
    cosine: float | None = None


@dataclass
class RefitRow:
    """One consumer layer refit: what the held-out check chose and the best fit's held-out error
    over plain pruning's (None: one calibration sample, no held-out fold)."""

    pass_name: str
    layer: str
    choice: str
    heldout_ratio: float | None


@dataclass
class StructuredReport:
    groups: list[GroupRow] = field(default_factory=list)
    passes: list[PassSummary] = field(default_factory=list)
    refits: list[RefitRow] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "groups": [asdict(g) for g in self.groups],
            "passes": [asdict(p) for p in self.passes],
            "refits": [asdict(r) for r in self.refits],
        }

    def table(self) -> Any:
        from rich.table import Table

        title = "; ".join(
            f"{p.pass_name}: FLOPs {p.flops_before:,} -> {p.flops_after:,} "
            f"({p.flops_after / max(p.flops_before, 1):.0%}), parameters {p.params_before:,} -> "
            f"{p.params_after:,}"
            + (f", output cosine {p.cosine:.4f}" if p.cosine is not None else "")
            for p in self.passes
        )
        table = Table(title=f"structured pruning: {title}", title_justify="left")
        for column, justify in (("pass", "left"), ("group", "left"), ("removed", "right"),
                                ("parameters", "right"), ("FLOPs", "right")):  # fmt: skip
            table.add_column(column, justify=justify)  # type: ignore[arg-type]
        for g in self.groups:
            table.add_row(
                g.pass_name, g.group, f"{g.removed} of {g.units} {g.unit}s",
                f"{g.params_before:,} -> {g.params_after:,}", f"{g.flops_before:,} -> {g.flops_after:,}",
            )  # fmt: skip
        return table


def structured_report(context: PassContext) -> StructuredReport:
    """The run's structured pruning report (created on first use, shared by the three passes)."""
    report = context.artifacts.get("structured-pruning")
    if not isinstance(report, StructuredReport):
        report = context.artifacts["structured-pruning"] = StructuredReport()
    return report
