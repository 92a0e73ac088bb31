"""Passes over the IR and the machinery that runs them.

    from graphopt.passes import optimize_model
    result = optimize_model(model, "O1", verify_each=True)
    result.model, result.records, result.notes

Writing a pass: see `graphopt.passes.manager` (Pass, GraphPass, register_pass) and, for local
rewrites, `graphopt.passes.rewrite` (patterns) and `docs/passes.md`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from graphopt.ir.core import Model
from graphopt.ir.gc_pause import paused_gc
from graphopt.passes.manager import (
    Analysis,
    GraphPass,
    ModelPass,
    Pass,
    PassContext,
    PassManager,
    all_passes,
    count_nodes,
    get_pass,
    register_pass,
)
from graphopt.passes.report import OptimizationResult

__all__ = [
    "Analysis",
    "GraphPass",
    "ModelPass",
    "OptimizationResult",
    "Pass",
    "PassContext",
    "PassManager",
    "all_passes",
    "get_pass",
    "optimize_model",
    "register_pass",
]


def optimize_model(
    model: Model,
    passes: str | Sequence[str | Pass] = "O1",
    *,
    target: str = "onnx",
    verify_each: bool = False,
    check_each: bool = False,
    check_dims: Mapping[str, int] | None = None,
    dump_before: Sequence[str] = (),
    dump_after: Sequence[str] = (),
    dump_folder: str | None = None,
    options: Mapping[str, Any] | None = None,
    calibration: Any = None,
) -> OptimizationResult:
    """Run `passes` (a pipeline string, preset, or list) over `model` in place.

    `verify_each` runs the verifier after every pass; `check_each` runs the reference interpreter on
    seeded random inputs (symbolic dims from `check_dims`, else 1) around every pass and raises at
    the first one that changes the outputs. `options` reach passes as `context.options`.
    `calibration` (an iterable of input dicts, e.g.
    `passes.quantization.calibration.from_npz(path)`) reaches passes as `context.calibration`."""
    from graphopt.ir.verifier import verify
    from graphopt.passes.instrument import CheckEach, DumpIR, VerifyEach
    from graphopt.passes.pipeline import parse_pipeline

    items = parse_pipeline(passes)
    instruments: list[Any] = []
    if dump_before or dump_after:
        instruments.append(DumpIR(set(dump_before), set(dump_after), dump_folder))
    if verify_each:
        instruments.append(VerifyEach())
    if check_each:
        instruments.append(CheckEach(dims=dict(check_dims or {})))
    with paused_gc():
        verify(model, shapes=False)  # structure and type constraints; infer-shapes checks the rest
        manager = PassManager(items, instruments)
        context = PassContext(
            model, target=target, options=dict(options or {}), calibration=calibration
        )
        before = count_nodes(model)
        start = time.perf_counter()
        manager.run(model, context)
        seconds = time.perf_counter() - start
        if not verify_each:
            verify(model, types=False)  # the input's types were checked; passes keep them
    label = passes if isinstance(passes, str) else ",".join(map(str, passes))
    return OptimizationResult(
        model, label, manager.records, context.notes, before, count_nodes(model), seconds,
        context.artifacts,
    )  # fmt: skip
