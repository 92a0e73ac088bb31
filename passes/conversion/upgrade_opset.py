"""upgrade-opset: move the model to a newer ONNX opset, so fusions can emit newer ops.

Fusions emit ops that exist only in recent opsets (LayerNormalization 17, Gelu 20, Attention,
RMSNormalization and RotaryEmbedding 23), and an opset import applies to the whole model: ops
whose signature changed on the way (ReduceMean's axes became an input at 18, Split's split at 13,
...) must be rewritten. ONNX's version converter knows every such adapter; this pass runs it on the
model *without its weights* (they are stood in for by typed graph inputs of the same names, so
nothing big is copied) and puts the same arrays back afterwards.

Refuses, keeping the model as it is, when the model already imports `version` or newer, or when
the converter has no adapter for one of the model's ops (the report names the converter's reason).

Equal because: each adapter rewrites one op into its newer form with the same semantics, as
specified by ONNX.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import version_converter

from graphopt.ir.core import Model
from graphopt.passes.manager import ModelPass, PassContext, register_pass

LATEST_RUNTIME_OPSET = 23  # the newest opset ONNX Runtime 1.32 runs on the CPU


@register_pass("upgrade-opset", "move the model to a newer ONNX opset (default 23)")
@dataclass
class UpgradeOpset(ModelPass):
    version: int = LATEST_RUNTIME_OPSET

    def run(self, model: Model, context: PassContext) -> bool:
        if model.opset >= self.version:
            return False
        from graphopt.backends.onnx import export_parts
        from graphopt.frontends.onnx import from_onnx

        before = model.opset
        proto, initializers = export_parts(model)
        inputs = {info.name for info in proto.graph.input}
        defaults = {name: array for name, array in initializers if name in inputs}
        weights = {name: array for name, array in initializers if name not in inputs}
        by_name = {v.name: v for v in model.graph.initializers.values()}
        for name, array in weights.items():
            proto.graph.input.append(
                onnx.helper.make_tensor_value_info(
                    name, onnx.helper.np_dtype_to_tensor_dtype(array.dtype), list(array.shape)
                )
            )
        try:
            converted = version_converter.convert_version(proto, self.version)
        except Exception as error:  # the converter raises RuntimeError/ValueError from C++
            reason = (
                str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            )
            context.note(
                f"kept opset {model.opset}: the converter cannot: {reason}", kind="refused"
            )
            return False
        # The converter runs ONNX's shape inference, which names unknown dims unk__0, unk__1 ...:
        # each a different symbol, which would hide equal dims. Keep the types the model had.
        del converted.graph.value_info[:]
        types = {v.name: v.type for node in model.graph.all_nodes() for v in node.outputs if v.type}
        upgraded = from_onnx(converted)
        graph = upgraded.graph
        for node in graph.all_nodes():
            for v in node.outputs:
                v.type = types.get(v.name or "", v.type)
        for value in list(graph.inputs):
            if value.name in defaults:
                graph.set_input_default(value, defaults[value.name])
            elif value.name in weights:
                constant = graph.add_initializer(graph.scope.fresh(value.name), weights[value.name])
                constant.type = by_name[value.name].type if value.name in by_name else constant.type
                value.replace_all_uses_with(constant)
                graph.remove_input(value)
                constant.name = value.name  # the weight keeps its name
        graph.initializers = {v.name or "": v for v in graph.initializers.values()}
        model.graph = graph
        model.opset_imports = dict(upgraded.opset_imports)
        model.ir_version = max(model.ir_version, upgraded.ir_version)
        context.note(f"opset {before} -> {self.version}")
        return True
