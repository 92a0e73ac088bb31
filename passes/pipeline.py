"""Pipeline strings and presets, until the pass manager lands.

`run_pipeline(model, "O1")` parses the pipeline, runs its passes and verifies the result. No passes
are registered yet, so the presets `O0`..`O3` are empty and any other pass name is an error that
lists what exists. The pass-manager issue replaces this module's internals, not its signature.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

from graphopt.ir.core import Model
from graphopt.ir.errors import GraphoptError

PRESETS: dict[str, list[str]] = {"O0": [], "O1": [], "O2": [], "O3": []}


class PipelineError(GraphoptError):
    """A pipeline string names a pass that does not exist or is malformed."""


def parse_pipeline(passes: str | Sequence[str]) -> list[str]:
    """Split a pipeline string into pass names, expanding presets."""
    items = passes.split(",") if isinstance(passes, str) else list(passes)
    names: list[str] = []
    known = sorted(PRESETS)
    for raw in items:
        name = raw.strip()
        if not name:
            continue
        if name in PRESETS:
            names.extend(PRESETS[name])
            continue
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(known)}"
        raise PipelineError(f"unknown pass '{name}'", where="pipeline", hint=hint)
    return names


def run_pipeline(model: Model, passes: str | Sequence[str], **options: Any) -> Model:
    if options:
        raise PipelineError(f"unknown option(s): {', '.join(sorted(options))}", where="optimize")
    parse_pipeline(passes)
    from graphopt.ir.verifier import verify

    verify(model)
    return model
