"""Build `examples/tiny_transformer.onnx`: one pre-norm transformer block, the README's example.

It is written with `onnx.helper` the way exporters write such blocks (LayerNorm and GELU decomposed
into primitive ops, attention as MatMul/Softmax/MatMul with head reshapes, a causal mask, a few
redundant Identity/Cast nodes), so the optimizer has real work on it. Random weights, seed 0; about
70 KB. Run `python examples/make_example.py` to rebuild it.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HIDDEN, HEADS, FFN, VOCAB = 32, 2, 64, 50
HEAD_DIM = HIDDEN // HEADS


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(name: str, *shape: int) -> str:
        return const(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))

    def node(op: str, inputs: list[str], outputs: list[str], **attrs: object) -> None:
        nodes.append(helper.make_node(op, inputs, outputs, name=f"{outputs[0]}_{op}", **attrs))

    def layer_norm(x: str, prefix: str) -> str:
        node("ReduceMean", [x], [f"{prefix}_mean"], axes=[-1], keepdims=1)
        node("Sub", [x, f"{prefix}_mean"], [f"{prefix}_centered"])
        node("Pow", [f"{prefix}_centered", const(f"{prefix}_two", np.float32(2))], [f"{prefix}_sq"])
        node("ReduceMean", [f"{prefix}_sq"], [f"{prefix}_var"], axes=[-1], keepdims=1)
        eps = const(f"{prefix}_eps", np.float32(1e-5))
        node("Add", [f"{prefix}_var", eps], [f"{prefix}_var_eps"])
        node("Sqrt", [f"{prefix}_var_eps"], [f"{prefix}_std"])
        node("Div", [f"{prefix}_centered", f"{prefix}_std"], [f"{prefix}_norm"])
        gamma = const(f"{prefix}_gamma", np.ones(HIDDEN, np.float32))
        beta = const(f"{prefix}_beta", np.zeros(HIDDEN, np.float32))
        node("Mul", [f"{prefix}_norm", gamma], [f"{prefix}_scaled"])
        node("Add", [f"{prefix}_scaled", beta], [f"{prefix}_out"])
        return f"{prefix}_out"

    def linear(x: str, prefix: str, n_in: int, n_out: int) -> str:
        node("MatMul", [x, weight(f"{prefix}_w", n_in, n_out)], [f"{prefix}_mm"])
        node("Add", [f"{prefix}_mm", weight(f"{prefix}_b", n_out)], [f"{prefix}_out"])
        return f"{prefix}_out"

    def split_heads(x: str, prefix: str) -> str:
        shape = const(f"{prefix}_shape", np.array([1, -1, HEADS, HEAD_DIM], np.int64))
        node("Reshape", [x, shape], [f"{prefix}_4d"])
        node("Transpose", [f"{prefix}_4d"], [f"{prefix}_heads"], perm=[0, 2, 1, 3])
        return f"{prefix}_heads"

    node("Gather", [weight("embedding", VOCAB, HIDDEN), "input_ids"], ["embedded"])
    node("Identity", ["embedded"], ["hidden"])
    ln1 = layer_norm("hidden", "ln1")
    q = split_heads(linear(ln1, "q", HIDDEN, HIDDEN), "q")
    k = split_heads(linear(ln1, "k", HIDDEN, HIDDEN), "k")
    v = split_heads(linear(ln1, "v", HIDDEN, HIDDEN), "v")
    node("Transpose", [k], ["k_t"], perm=[0, 1, 3, 2])
    node("MatMul", [q, "k_t"], ["scores"])
    scale = const("scale", np.float32(1.0 / np.sqrt(HEAD_DIM)))
    node("Mul", ["scores", scale], ["scores_scaled"])
    node("Add", ["scores_scaled", "causal_mask"], ["scores_masked"])
    node("Softmax", ["scores_masked"], ["probs"], axis=-1)
    node("MatMul", ["probs", v], ["context_heads"])
    node("Transpose", ["context_heads"], ["context_t"], perm=[0, 2, 1, 3])
    merge = const("merge_shape", np.array([1, -1, HIDDEN], np.int64))
    node("Reshape", ["context_t", merge], ["context"])
    attn = linear("context", "o", HIDDEN, HIDDEN)
    node("Add", ["hidden", attn], ["residual1"])
    ln2 = layer_norm("residual1", "ln2")
    up = linear(ln2, "up", HIDDEN, FFN)
    # GELU, exact form: 0.5 * x * (1 + erf(x / sqrt(2)))
    node("Div", [up, const("sqrt2", np.float32(np.sqrt(2.0)))], ["gelu_scaled"])
    node("Erf", ["gelu_scaled"], ["gelu_erf"])
    node("Add", ["gelu_erf", const("one", np.float32(1.0))], ["gelu_1p"])
    node("Mul", [up, "gelu_1p"], ["gelu_x"])
    node("Mul", ["gelu_x", const("half", np.float32(0.5))], ["gelu"])
    down = linear("gelu", "down", FFN, HIDDEN)
    node("Add", ["residual1", down], ["residual2"])
    node("Cast", ["residual2"], ["residual2_f32"], to=TensorProto.FLOAT)
    node("MatMul", ["residual2_f32", weight("lm_head", HIDDEN, VOCAB)], ["logits"])

    graph = helper.make_graph(
        nodes,
        "tiny_transformer",
        inputs=[
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"]),
            helper.make_tensor_value_info("causal_mask", TensorProto.FLOAT, [1, 1, "seq", "seq"]),
        ],
        outputs=[helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "seq", VOCAB])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="graphopt-example"
    )
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


if __name__ == "__main__":
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_transformer.onnx")
    onnx.save(build(), path)
    print(f"wrote {path} ({os.path.getsize(path) / 1024:.0f} KB)")
