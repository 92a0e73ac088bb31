"""What a pipeline did, for people (a rich table) and for tools (JSON).

`OptimizationResult` holds one `PassRecord` per pass run (time, node counts before and after,
whether it changed the model) and the notes passes left: rewrites made, and rewrites refused with
the reason, naming the node. `artifacts` are structured results passes left in
`PassContext.artifacts` (e.g. "quantization": the per-layer quantization report): each goes into
the JSON under its topic (`to_json()`), and those with a `table()` are shown after the pass table.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from graphopt.ir.core import Model
from graphopt.passes.manager import Note, PassRecord

__all__ = ["OptimizationResult"]


@dataclass
class OptimizationResult:
    model: Model
    pipeline: str
    records: list[PassRecord] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0
    seconds: float = 0.0
    artifacts: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline,
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "seconds": round(self.seconds, 4),
            "passes": [
                {
                    **dataclasses.asdict(r),
                    "seconds": round(r.seconds, 5),
                    "options": _plain(r.options),
                }
                for r in self.records
            ],
            "notes": [dataclasses.asdict(n) for n in self.notes],
            **{topic: artifact.to_json() for topic, artifact in self.artifacts.items()},
        }

    def write_json(self, path: str) -> None:
        """Write the report atomically (a temp file renamed into place)."""
        temp = f"{path}.tmp{os.getpid()}"
        with open(temp, "w") as f:
            json.dump(self.to_json(), f, indent=1)
        os.replace(temp, path)

    def table(self) -> Any:
        """A rich table: one row per pass run, merged per pass name in pipeline order."""
        from rich.table import Table

        rows: dict[str, list[float]] = {}
        for r in self.records:
            row = rows.setdefault(r.name, [0, 0.0, 0, 0])
            row[0] += 1
            row[1] += r.seconds
            row[2] += r.nodes_after - r.nodes_before
            row[3] += r.changed
        table = Table(
            title=f"{self.nodes_before} -> {self.nodes_after} nodes in {self.seconds:.2f} s",
            title_justify="left",
        )
        for column, justify in (("pass", "left"), ("runs", "right"), ("changed", "right"),
                                ("nodes", "right"), ("ms", "right"), ("notes", "right")):  # fmt: skip
            table.add_column(column, justify=justify)  # type: ignore[arg-type]
        notes: dict[str, int] = {}
        for n in self.notes:
            notes[n.pass_name] = notes.get(n.pass_name, 0) + 1
        for name, (runs, seconds, delta, changed) in rows.items():
            table.add_row(
                name, str(int(runs)), str(int(changed)), f"{int(delta):+d}",
                f"{seconds * 1e3:.1f}", str(notes.get(name, "")),
            )  # fmt: skip
        return table

    def artifact_tables(self) -> list[Any]:
        """The rich renderables of the artifacts that have a `table()`, in the order left."""
        return [a.table() for a in self.artifacts.values() if callable(getattr(a, "table", None))]


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return str(value)
