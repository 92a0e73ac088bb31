"""freeze-initializers: initializers listed as graph inputs become constants.

Models of ONNX IR version 3 and older had to list every initializer as a graph input, so their
weights look like inputs a caller could override, and no pass may fold them. This pass makes them
constants and removes them from the inputs, and raises the model's IR version to 4 (the first that
allows initializers that are not inputs). It does that for models of IR version < 4 only, where
the listing says nothing about intent; `all=true` does it for any model (for models exported with
`keep_initializers_as_inputs`, whose users never feed weights).

Equal because: a caller who does not feed an input gets its default; after this pass that default
is what the graph always uses.
"""

from __future__ import annotations

from dataclasses import dataclass

from graphopt.ir.core import Model
from graphopt.passes.manager import ModelPass, PassContext, register_pass


@register_pass("freeze-initializers", "make initializers listed as graph inputs constants")
@dataclass
class FreezeInitializers(ModelPass):
    all: bool = False

    def run(self, model: Model, context: PassContext) -> bool:
        if model.ir_version >= 4 and not self.all:
            return False
        graph = model.graph
        frozen = [v for v in graph.inputs if v.const_value is not None]
        for value in frozen:
            graph.freeze_input(value)
        if frozen:
            model.ir_version = max(model.ir_version, 4)
            context.note(f"{len(frozen)} initializers listed as inputs are now constants")
        return bool(frozen)
