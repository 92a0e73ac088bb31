"""Instruments the pass manager runs around every pass: verify-each, IR dumps and check-each.

- `VerifyEach` runs the verifier after each pass and names the pass that broke the graph.
- `DumpIR` writes the IR text before and/or after chosen passes (to a folder or a stream).
- `CheckEach` runs the reference interpreter on seeded random inputs before the first pass and after
  each one, and stops at the first pass whose outputs drift past the tolerance, naming the pass and
  the output: `max |after - before| <= atol + rtol * max |before|` per output.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from graphopt.ir.core import Model
from graphopt.ir.errors import GraphoptError
from graphopt.passes.manager import Instrument, Pass, PassContext, PassRecord

__all__ = ["CheckEach", "DumpIR", "PassCheckError", "VerifyEach"]


class PassCheckError(GraphoptError):
    """A pass changed what the model computes (found by --check-each)."""


class VerifyEach(Instrument):
    def after_pass(
        self, pass_: Pass, model: Model, context: PassContext, record: PassRecord
    ) -> None:
        from graphopt.ir.verifier import verify

        try:
            verify(model)
        except GraphoptError as error:
            error.message = f"after pass '{pass_.name}': {error.message}"
            error.args = (str(error),)
            raise


@dataclass
class DumpIR(Instrument):
    """Print the model before/after the passes named in `before`/`after` ("all" for every pass)."""

    before: set[str] = field(default_factory=set)
    after: set[str] = field(default_factory=set)
    folder: str | None = None
    stream: TextIO = field(default_factory=lambda: sys.stdout)
    _count: int = 0

    def _dump(self, when: str, pass_: Pass, model: Model) -> None:
        from graphopt.ir.printer import print_model

        text = print_model(model, elide_large=True)
        if self.folder is None:
            self.stream.write(f"// ----- IR {when} {pass_.name} -----\n{text}\n")
            return
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, f"{self._count:03d}-{pass_.name}-{when}.ir")
        with open(path, "w") as f:
            f.write(text)

    def before_pass(self, pass_: Pass, model: Model, context: PassContext) -> None:
        self._count += 1
        if pass_.name in self.before or "all" in self.before:
            self._dump("before", pass_, model)

    def after_pass(
        self, pass_: Pass, model: Model, context: PassContext, record: PassRecord
    ) -> None:
        if pass_.name in self.after or "all" in self.after:
            self._dump("after", pass_, model)


@dataclass
class CheckEach(Instrument):
    """Compare the interpreter's outputs on seeded random inputs before and after each pass."""

    seed: int = 0
    rtol: float = 1e-3
    atol: float = 1e-4
    dims: Mapping[str, int] = field(default_factory=dict)
    feeds: dict[str, np.ndarray] | None = None
    _reference: dict[str, Any] | None = None

    def _outputs(self, model: Model) -> dict[str, Any]:
        from graphopt.api.feeds import random_feeds
        from graphopt.backends.reference import Interpreter

        if self.feeds is None:
            self.feeds = random_feeds(model, seed=self.seed, dims=self.dims)
        return Interpreter(model).run(self.feeds)

    def before_pass(self, pass_: Pass, model: Model, context: PassContext) -> None:
        if self._reference is None:
            self._reference = self._outputs(model)

    def after_pass(
        self, pass_: Pass, model: Model, context: PassContext, record: PassRecord
    ) -> None:
        if not record.changed:
            return
        outputs = self._outputs(model)
        assert self._reference is not None
        for name, expected in self._reference.items():
            problem = _drift(expected, outputs.get(name), self.rtol, self.atol)
            if problem:
                raise PassCheckError(
                    f"pass '{pass_.name}' changed output '{name}': {problem}",
                    where="--check-each",
                    hint=f"drop '{pass_.name}' from the pipeline and report the model; "
                    "--dump-ir before:PASS,after:PASS shows what it did",
                )
        self._reference = outputs


def _drift(expected: Any, actual: Any, rtol: float, atol: float) -> str | None:
    if actual is None:
        return "the output is gone"
    e, a = np.asarray(expected), np.asarray(actual)
    if e.shape != a.shape:
        return f"shape {list(a.shape)}, was {list(e.shape)}"
    if e.dtype != a.dtype:
        return f"dtype {a.dtype}, was {e.dtype}"
    if e.dtype.kind not in "fc":
        return None if np.array_equal(e, a) else "values differ"
    if not np.array_equal(np.isnan(e), np.isnan(a)):
        return "NaNs appeared or vanished"
    e64, a64 = np.nan_to_num(e.astype(np.float64)), np.nan_to_num(a.astype(np.float64))
    diff = float(np.max(np.abs(e64 - a64))) if e.size else 0.0
    scale = float(np.max(np.abs(e64))) if e.size else 0.0
    if diff > atol + rtol * scale:
        return f"max abs diff {diff:.3g} (output scale {scale:.3g}, tolerance {atol + rtol * scale:.3g})"
    return None
