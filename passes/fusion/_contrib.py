"""The base of fusions that emit ONNX Runtime contrib ops (`com.microsoft`) only.

For target `onnx` such a pass changes nothing and says why once (`not_standard`, the reason the
fused form is not standard ONNX). For target `onnxruntime` it imports the `com.microsoft` domain
for its rewrites, and drops the import again when nothing was rewritten and the model did not
have it before.
"""

from __future__ import annotations

from typing import ClassVar

from graphopt.ir.core import Model
from graphopt.passes.manager import PassContext
from graphopt.passes.rewrite import RewritePass

MS = "com.microsoft"


class ContribRewritePass(RewritePass):
    not_standard: ClassVar[str] = "its fused ops are ONNX Runtime contrib ops"

    def run(self, model: Model, context: PassContext) -> bool:
        if context.target != "onnxruntime":
            context.note(
                f"nothing to do for target '{context.target}': {self.not_standard} "
                "(use --target onnxruntime)"
            )
            return False
        had_domain = MS in model.opset_imports
        model.opset_imports.setdefault(MS, 1)
        changed = super().run(model, context)
        if not changed and not had_domain:
            del model.opset_imports[MS]
        return changed
