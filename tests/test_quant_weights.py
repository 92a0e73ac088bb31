"""quantize-weights (passes/quantization/weights.py) and com.microsoft.MatMulNBits
(ir/ops/contrib_quant.py): the kernel against ONNX Runtime's, random MatMul/Gemm graphs within
the scheme's error bound, each refusal, and the zoo's tiny transformers (cosine vs float, ONNX
Runtime and onnx.checker, size on disk)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import helper

import graphopt
from graphopt.backends.onnx import to_onnx
from graphopt.backends.reference import Interpreter
from graphopt.ir import Model, parse_model, print_model
from graphopt.ir.ops.contrib_quant import dequantize_nbits, pack_codes, unpack_codes
from graphopt.ir.types import TensorType
from graphopt.passes import optimize_model
from graphopt.passes.pipeline import PipelineError


def _ort(
    model: Model | onnx.ModelProto, feeds: dict[str, np.ndarray], exact: bool = False
) -> list[np.ndarray]:
    """Outputs in ONNX Runtime; `exact`: without its DequantizeLinear + MatMul -> MatMulNBits
    fusion, which by default also quantizes the activations to int8 (accuracy level 4)."""
    import onnxruntime as ort

    proto = to_onnx(model) if isinstance(model, Model) else model
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if exact:
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ----- MatMulNBits: packing and kernel against ONNX Runtime ---------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_round_trips_low_bits_first(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, (3, 5, 19), dtype=np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (3, 5, -(-19 * bits // 8))
    assert np.array_equal(unpack_codes(packed, bits, 19), codes)
    if bits == 4:
        assert packed[0, 0, 0] == codes[0, 0, 0] | (codes[0, 0, 1] << 4)


def _nbits_model(k, n, bits, block, zero_points, bias, a_shape, seed=0):
    rng = np.random.default_rng(seed)
    blocks = -(-k // block)
    b = pack_codes(rng.integers(0, 1 << bits, (n, blocks, block), dtype=np.uint8), bits)
    scales = rng.uniform(0.01, 0.1, (n, blocks)).astype(np.float32)
    inits = [onnx.numpy_helper.from_array(b, "B"), onnx.numpy_helper.from_array(scales, "S")]
    inputs = ["A", "B", "S"]
    zp = None
    if zero_points == "packed":
        zp = pack_codes(rng.integers(0, 1 << bits, (n, blocks), dtype=np.uint8), bits)
    elif zero_points == "float":
        zp = rng.uniform(0, (1 << bits) - 1, (n, blocks)).astype(np.float32)
    inputs.append("Z" if zp is not None else "")
    if zp is not None:
        inits.append(onnx.numpy_helper.from_array(zp, "Z"))
    bias_array = rng.standard_normal(n).astype(np.float32) if bias else None
    if bias_array is not None:
        inputs += ["", "bias"]
        inits.append(onnx.numpy_helper.from_array(bias_array, "bias"))
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=k, N=n,
                            bits=bits, block_size=block)  # fmt: skip
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("A", 1, a_shape)],
        [helper.make_tensor_value_info("Y", 1, None)], inits,
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets), (b, scales, zp, bias_array)


# ONNX Runtime's CPU kernel takes float zero points with 4 bits only
NBITS_CASES = [(bits, block, zero_points)
               for bits, block in [(4, 16), (4, 32), (4, 128), (8, 32), (8, 64), (2, 16)]
               for zero_points in (None, "packed", "float") if bits == 4 or zero_points != "float"]  # fmt: skip


@pytest.mark.parametrize("bits, block, zero_points", NBITS_CASES)
@pytest.mark.parametrize("k", [64, 80])
def test_matmul_nbits_kernel_matches_onnx_runtime(bits, block, zero_points, k):
    proto, (b, scales, zp, bias) = _nbits_model(k, 24, bits, block, zero_points, k == 64, [3, 5, k])
    a = np.random.default_rng(1).standard_normal((3, 5, k)).astype(np.float32)
    expected = _ort(proto, {"A": a})[0]
    model = graphopt.load(proto)
    actual = Interpreter(model).run({"A": a})["Y"]
    assert actual.shape == expected.shape == (3, 5, 24)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # the kernel is A @ W^T (+ bias) with W decoded as the schema says
    weight = dequantize_nbits(b, scales, zp, k, 24, bits, block)
    reference = a @ weight.T + (0 if bias is None else bias)
    np.testing.assert_allclose(actual, reference, rtol=1e-5, atol=1e-5)
    inferred = optimize_model(model, "infer-shapes").model.graph.outputs[0].type
    assert isinstance(inferred, TensorType) and inferred.shape == (3, 5, 24)


# ----- the pass on small graphs -------------------------------------------------------------------


def _graph(k: int, n: int, *, op: str = "MatMul", opset: int = 21, dtype=np.float32, seed=0,
           trans_b: int = 0, shared: bool = False) -> Model:  # fmt: skip
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k) if trans_b else (k, n)) / np.sqrt(k)).astype(dtype)
    cast = int if np.dtype(dtype).kind == "i" else float
    literal = str([cast(v) for v in w.astype(np.float64).ravel()])
    short = {np.float32: "f32", np.float16: "f16", np.int32: "i32"}[dtype]
    w_shape = f"[{n},{k}]" if trans_b else f"[{k},{n}]"
    if op == "Gemm":
        body = f"%y: f32[4,{n}] = Gemm(%x, %w, %c) {{transB = {trans_b}}}"
        extra = f"  %c: f32[{n}] = const {[0.5] * n}\n"
    else:
        body = f"%y: {short}[2,4,{n}] = MatMul(%x, %w)"
        extra = ""
    x = f"f32[4,{k}]" if op == "Gemm" else f"{short}[2,4,{k}]"
    twice = f"\n  %z: {short}[2,4,{n}] = MatMul(%x, %w)" if shared else ""
    outs = "%y, %z" if shared else "%y"
    text = f"""model opset={{"": {opset}}}
graph @g(%x: {x}) {{
  %w: {short}{w_shape} = const {literal}
{extra}  {body}{twice}
  return {outs}
}}"""
    return parse_model(text)


def _quantize(model: Model, options: str, target: str = "onnx"):
    result = optimize_model(
        model, f"quantize-weights{{{options}}}", target=target, verify_each=True
    )
    return result.model, [n.message for n in result.notes if n.kind == "refused"]


@given(
    k_blocks=st.integers(1, 4),
    n=st.integers(1, 40),
    bits=st.sampled_from([4, 8]),
    block=st.sampled_from([16, 32]),
    symmetric=st.booleans(),
    form=st.sampled_from(["qdq", "qdq-channel", "matmulnbits"]),
    op=st.sampled_from(["MatMul", "Gemm", "Gemm-transB"]),
    seed=st.integers(0, 2**16),
)
def test_random_graphs_stay_within_the_error_bound(
    k_blocks, n, bits, block, symmetric, form, op, seed
):
    """Each output element moves by at most sum_k |x_k| * |W' - W|_k <= sum_k |x_k| * scale / 2."""
    k = k_blocks * block
    model = _graph(k, n, op=op.split("-")[0], trans_b=int(op.endswith("transB")), seed=seed)
    weight = next(iter(model.graph.initializers.values())).const_value
    w = weight.T if op.endswith("transB") else weight  # [K, N]
    x = np.random.default_rng(seed + 1).standard_normal(model.graph.inputs[0].type.shape)
    x = x.astype(np.float32)
    expected = Interpreter(model).run({"x": x})["y"]
    block_option = 0 if form == "qdq-channel" else block
    options = (
        f"bits={bits} block-size={block_option} symmetric={str(symmetric).lower()} min-elements=1"
        " clip-search=false"  # the elementwise bound is min/max's; clip search: test_quant_scheme
    )
    fmt = "matmulnbits" if form == "matmulnbits" else "qdq"
    out, notes = _quantize(model, f"{options} format={fmt}", "onnxruntime")
    assert not notes, notes
    ops = [node.op for node in out.graph]
    assert ("com.microsoft.MatMulNBits" in ops) == (fmt == "matmulnbits")
    assert ("DequantizeLinear" in ops) == (fmt == "qdq")
    actual = Interpreter(out).run({"x": x})["y"]
    # the bound: per column, scale/2 per weight; per block, the largest scale of the column
    if block_option:
        wb = w.reshape(k_blocks, block, n)
        spread = np.maximum(wb.max(1), 0) - np.minimum(wb.min(1), 0)
        absmax = np.maximum(-wb.min(1), wb.max(1))
        step = np.repeat(absmax / ((1 << (bits - 1)) - 1) if symmetric else spread / ((1 << bits) - 1), block, 0)  # fmt: skip
    else:
        spread = np.maximum(w.max(0), 0) - np.minimum(w.min(0), 0)
        absmax = np.maximum(-w.min(0), w.max(0))
        step = np.broadcast_to(absmax / ((1 << (bits - 1)) - 1) if symmetric else spread / ((1 << bits) - 1), w.shape)  # fmt: skip
    bound = np.abs(x.astype(np.float64)) @ (step / 2) * (1 + 1e-3) + 1e-4
    assert np.all(np.abs(actual.astype(np.float64) - expected) <= bound)
    again, _ = _quantize(out, f"{options} format={fmt}", "onnxruntime")
    assert print_model(again) == print_model(out)  # nothing left to do


@pytest.mark.parametrize("symmetric", [False, True])
def test_qdq_model_runs_in_onnx_runtime_and_passes_the_checker(symmetric):
    """int4's default is asymmetric (uint4 codes and zero points); symmetric=true keeps int4."""
    model = _graph(64, 32)
    x = np.random.default_rng(0).standard_normal((2, 4, 64)).astype(np.float32)
    out, _ = _quantize(model, "bits=4" + (" symmetric=true" if symmetric else ""))
    proto = to_onnx(out)
    onnx.checker.check_model(proto, full_check=True)
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 1 and {a.name: a.i for a in dq[0].attribute} == {"axis": 0, "block_size": 32}
    weights = {i.name: i for i in proto.graph.initializer}
    code_type = onnx.TensorProto.INT4 if symmetric else onnx.TensorProto.UINT4
    assert weights[dq[0].input[0]].data_type == code_type
    assert len(dq[0].input) == (2 if symmetric else 3)
    if not symmetric:
        assert weights[dq[0].input[2]].data_type == onnx.TensorProto.UINT4
        assert list(weights[dq[0].input[2]].dims) == [2, 32]
    np.testing.assert_allclose(_ort(proto, {"x": x}, exact=True)[0], Interpreter(out).run({"x": x})["y"],
                               rtol=1e-4, atol=1e-4)  # fmt: skip


@pytest.mark.parametrize("k", [64, 96])  # 96: 3 blocks, zero points of a row padded to 2 bytes
def test_matmulnbits_zero_points_run_in_onnx_runtime(k):
    """The default int4 MatMulNBits (asymmetric, clip search) packs [N, blocks] 4-bit zero points
    per row, low nibble first: ONNX Runtime's kernel and the reference interpreter agree, and
    the weights it decodes are within the block's min/max step of the float ones (RMS)."""
    model = _graph(k, 24)
    w = np.array(next(iter(model.graph.initializers.values())).const_value)  # [K, N]
    x = np.random.default_rng(1).standard_normal((2, 4, k)).astype(np.float32)
    out, notes = _quantize(model, "bits=4 format=matmulnbits", "onnxruntime")
    assert not notes, notes
    (node,) = [n for n in out.graph if n.op == "com.microsoft.MatMulNBits"]
    zero = node.inputs[3]
    assert zero is not None and zero.const_value is not None
    assert zero.const_value.dtype == np.uint8 and zero.const_value.shape == (24, -(-k // 32 // 2))
    proto = to_onnx(out)
    np.testing.assert_allclose(_ort(proto, {"x": x}, exact=True)[0], Interpreter(out).run({"x": x})["y"],
                               rtol=1e-4, atol=1e-4)  # fmt: skip
    from graphopt.ir.ops.contrib_quant import dequantize_nbits

    decoded = dequantize_nbits(node.inputs[1].const_value, node.inputs[2].const_value,
                               zero.const_value, k, 24, 4, 32)  # fmt: skip
    decoded = np.asarray(decoded).reshape(24, k).T
    blocks = w.reshape(k // 32, 32, 24)
    step = (np.maximum(blocks.max(1), 0) - np.minimum(blocks.min(1), 0)) / 15
    rms = np.sqrt(np.square(decoded - w).reshape(k // 32, 32, 24).mean(1))
    assert np.all(rms <= step / 2 * (1 + 1e-4))


def _refused(model: Model, options: str, reason: str, target: str = "onnx") -> None:
    before = print_model(model)
    out, notes = _quantize(model, options, target)
    assert print_model(out) == before
    assert any(reason in note for note in notes), notes


def test_refusals():
    _refused(_graph(64, 32, shared=True), "", "is read by 2 nodes")
    _refused(_graph(64, 32, dtype=np.int32), "min-elements=1", "not float")
    _refused(_graph(16, 8), "", "fewer than min-elements=1024")
    _refused(_graph(48, 32), "bits=4", "K=48 is not a multiple of block-size=32")
    _refused(_graph(64, 32, opset=18), "bits=4", "run upgrade-opset first")
    _refused(_graph(64, 32, opset=11), "", "needs opset 13")
    _refused(_graph(64, 32), "bits=4 format=matmulnbits", "--target onnxruntime")
    gemm = _graph(64, 32, op="Gemm")
    gemm.graph.nodes[0].set_attr("alpha", 0.5)
    _refused(gemm, "bits=4 format=matmulnbits", "no alpha", "onnxruntime")


def test_per_tensor_int8_works_at_old_opsets():
    out, notes = _quantize(_graph(64, 32, opset=13), "")
    assert not notes and [n.op for n in out.graph] == ["DequantizeLinear", "MatMul"]


def test_bad_options_are_pipeline_errors():
    with pytest.raises(PipelineError, match="power of two"):
        optimize_model(_graph(64, 32), "quantize-weights{format=matmulnbits block-size=24}")
    with pytest.raises(PipelineError, match="bits"):
        optimize_model(_graph(64, 32), "quantize-weights{bits=3}")


# ----- the zoo's tiny transformers ----------------------------------------------------------------

SCHEMES = {  # name -> (pipeline, target, cosine floor)
    "int8": ("upgrade-opset,quantize-weights", "onnx", 0.99),
    "int4-b32": ("upgrade-opset,quantize-weights{bits=4}", "onnx", 0.98),
    "int4-b32-nbits": ("quantize-weights{bits=4 format=matmulnbits}", "onnxruntime", 0.98),
    "int8-b32-nbits": ("quantize-weights{format=matmulnbits block-size=32}", "onnxruntime", 0.99),
}


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
@pytest.mark.parametrize("name", ["gpt2", "bert", "llama"])
def test_zoo_accuracy_and_size(zoo_model, name, scheme, tmp_path):
    from models.zoo import sample_inputs

    passes, target, floor = SCHEMES[scheme]
    path = zoo_model(name, "dynamo")
    feeds = sample_inputs(name)
    expected = _ort(graphopt.load(path), feeds)
    result = optimize_model(graphopt.load(path), passes, target=target, verify_each=True)
    ops = [n.op for n in result.model.graph]
    assert ops.count("DequantizeLinear") + ops.count("com.microsoft.MatMulNBits") >= 4
    graphopt.save(result.model, tmp_path / "q.onnx")
    onnx.checker.check_model(str(tmp_path / "q.onnx"), full_check=True)
    actual = _ort(onnx.load(tmp_path / "q.onnx"), feeds)
    for e, a in zip(expected, actual, strict=True):
        assert _cosine(e, a) >= floor, (name, scheme, _cosine(e, a))
    # smaller than the same pipeline without quantize-weights
    float_model = optimize_model(graphopt.load(path), passes.rpartition("quantize-weights")[0].rstrip(",") or "O0").model  # fmt: skip
    graphopt.save(float_model, tmp_path / "f.onnx")
    assert (tmp_path / "q.onnx").stat().st_size < 0.75 * (tmp_path / "f.onnx").stat().st_size
