"""The torch.export frontend (`graphopt.from_torch`): zoo models and small modules translated to the
IR must compute what eager PyTorch computes, in the reference interpreter and, written as ONNX, in
ONNX Runtime; attention must arrive as `Attention` with no fusion pass; symbolic dims keep their
`torch.export.Dim` names to the written ONNX; an op with no translation is one clear error naming
the op and the source line; a `.pt2` file goes through `graphopt optimize`.
"""

from __future__ import annotations

import collections
import inspect
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from models import sample_inputs, torch_module
from models.specs import MODELS

import graphopt
from graphopt.backends.onnx import to_onnx
from graphopt.backends.reference import Interpreter
from graphopt.frontends.torch import from_torch, translatable_as_is
from graphopt.ir.core import Model
from graphopt.ir.errors import UnsupportedOpError
from graphopt.ir.verifier import verify

TOLERANCE = 1e-4  # max |IR - eager| over max |eager|, per output
ZOO_LAYERS = {"gpt2": 2, "bert": 2, "llama": 2, "resnet": 0}  # attention layers at size tiny


def relative_error(expected: np.ndarray, actual: np.ndarray) -> float:
    expected64, actual64 = np.asarray(expected, np.float64), np.asarray(actual, np.float64)
    assert expected64.shape == actual64.shape
    scale = max(float(np.abs(expected64).max()), 1e-12)
    return float(np.abs(expected64 - actual64).max()) / scale


def eager(module: torch.nn.Module, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        results = module(*(torch.from_numpy(v) for v in inputs.values()))
    results = results if isinstance(results, (tuple, list)) else (results,)
    return [r.numpy() for r in results]


def ort_run(model: Model, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(
        to_onnx(model).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return session.run(None, inputs)


def assert_matches(expected: list[np.ndarray], actual: list[np.ndarray], what: str) -> None:
    assert len(expected) == len(actual), what
    for index, (e, a) in enumerate(zip(expected, actual, strict=True)):
        error = relative_error(e, a) if e.dtype.kind == "f" else float(np.any(e != a))
        assert error <= TOLERANCE, f"{what}: output {index} differs by {error:.3g} relative"


def check_equal_to_eager(
    model: Model, module: torch.nn.Module, inputs: dict[str, np.ndarray]
) -> None:
    """Reference interpreter and ONNX Runtime both equal eager PyTorch on `inputs`."""
    expected = eager(module, inputs)
    reference = Interpreter(model).run(inputs)
    assert_matches(expected, list(reference.values()), "reference interpreter")
    assert_matches(expected, ort_run(model, inputs), "ONNX Runtime")


# ----- the zoo ------------------------------------------------------------------------------------


def zoo_dynamic_shapes(name: str) -> dict[str, dict[int, Any]]:
    dims = {"batch": torch.export.Dim("batch"), "sequence": torch.export.Dim("sequence", max=128)}
    return {
        spec.name: {axis: dims[d] for axis, d in enumerate(spec.shape) if d in dims}
        for spec in MODELS[name].inputs
    }


@pytest.fixture(scope="module")
def zoo() -> dict[str, tuple[torch.nn.Module, Model]]:
    """Each tiny zoo model as a module and as translated by from_torch (once per module run)."""
    built = {}
    for name in ZOO_LAYERS:
        module = torch_module(name)
        example = sample_inputs(name, batch=2, sequence=8)
        arguments = tuple(torch.from_numpy(v) for v in example.values())
        built[name] = (module, graphopt.from_torch(module, arguments, zoo_dynamic_shapes(name)))
    return built


@pytest.mark.parametrize("name", list(ZOO_LAYERS))
def test_zoo_model_equals_eager_at_two_sizes(zoo: Any, name: str) -> None:
    module, model = zoo[name]
    verify(model)
    check_equal_to_eager(model, module, sample_inputs(name, batch=2, sequence=8))
    # sizes other than the traced ones: the symbolic dims are really symbolic
    other = sample_inputs(name, batch=3, sequence=13, seed=1)
    assert_matches(eager(module, other), ort_run(model, other), f"{name} at batch 3, sequence 13")


@pytest.mark.parametrize("name", list(ZOO_LAYERS))
def test_zoo_attention_arrives_whole(zoo: Any, name: str) -> None:
    _, model = zoo[name]
    ops = collections.Counter(node.op for node in model.graph)
    assert ops["Attention"] == ZOO_LAYERS[name]
    assert ops["Softmax"] == 0  # no unfused attention left over
    if name in ("gpt2", "bert"):
        assert ops["LayerNormalization"] == 5  # 2 per layer + final / embedding norm
    if name == "resnet":
        assert ops["Conv"] == 6 and ops["BatchNormalization"] == 6 and ops["GlobalAveragePool"] == 1


@pytest.mark.parametrize("name", ["gpt2", "resnet"])
def test_zoo_symbolic_dims_reach_the_onnx_file(zoo: Any, name: str) -> None:
    _, model = zoo[name]
    proto = to_onnx(model)
    for graph_input in proto.graph.input:
        dims = graph_input.type.tensor_type.shape.dim
        assert dims[0].dim_param == "batch"
        if name == "gpt2":
            assert dims[1].dim_param == "sequence"
    assert proto.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_from_torch_is_public() -> None:
    from graphopt import api

    assert "from_torch" in graphopt.__all__ and "from_torch" in api.__all__
    assert graphopt.from_torch is api.from_torch


def test_zoo_weights_share_the_module_storage(zoo: Any) -> None:
    module, model = zoo["llama"]
    weight = module.model.model.embed_tokens.weight
    constants = {v.name: v.const_value for v in model.graph.initializers.values()}
    array = constants["model.model.embed_tokens.weight"]
    assert np.shares_memory(array, weight.detach().numpy())
    assert not array.flags.writeable and weight.detach().numpy().flags.writeable
    assert all(not a.flags.owndata for a in constants.values() if a.size > 1024)


# ----- small modules ------------------------------------------------------------------------------


class ConvBnRelu(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(8)
        self.bn.running_mean.uniform_(-0.5, 0.5)
        self.bn.running_var.uniform_(0.5, 2.0)
        self.depthwise = torch.nn.Conv2d(8, 8, 3, stride=2, groups=8, padding="valid")
        self.up = torch.nn.ConvTranspose2d(8, 4, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(torch.relu(self.depthwise(torch.relu(self.bn(self.conv(x))))))


class Pooling(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pooled = torch.nn.functional.max_pool2d(x, 3, stride=2, padding=1)
        averaged = torch.nn.functional.avg_pool2d(x, 2, ceil_mode=True, count_include_pad=False)
        return (
            torch.nn.functional.adaptive_avg_pool2d(pooled, 1).flatten(1),
            torch.nn.functional.adaptive_avg_pool2d(x, (5, 4)),
            averaged,
        )


class Norms(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer_norm = torch.nn.LayerNorm(16)
        self.bare_layer_norm = torch.nn.LayerNorm(16, elementwise_affine=False)
        self.rms_norm = torch.nn.RMSNorm(16, eps=1e-6)
        torch.nn.init.uniform_(self.rms_norm.weight, 0.5, 1.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        normalized = torch.nn.functional.normalize(x, dim=-1)  # linalg_vector_norm
        return self.layer_norm(x), self.bare_layer_norm(x), self.rms_norm(x), normalized


class Activations(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        functional = torch.nn.functional
        return (
            functional.gelu(x, approximate="tanh"), functional.gelu(x), functional.silu(x),
            functional.hardswish(x), functional.leaky_relu(x, 0.1),
            torch.sigmoid(x).clamp(0.2, 0.7), functional.softplus(x), torch.softmax(x, -1),
            torch.log_softmax(x, 1),
        )  # fmt: skip


class MaskedAttention(torch.nn.Module):
    """SDPA with a bool padding mask [B, 1, 1, L], an additive float mask [S, L], and 3-D inputs
    [B, S, D] with a 3-D mask [B, S, L]."""

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        keep = torch.ones(q.shape[0], 1, 1, k.shape[2], dtype=torch.bool)
        keep[1, :, :, -2:] = False
        bias = torch.linspace(-1.0, 1.0, q.shape[2] * k.shape[2]).view(q.shape[2], k.shape[2])
        sdpa = torch.nn.functional.scaled_dot_product_attention
        flat = sdpa(q[:, 0], k[:, 0], v[:, 0], attn_mask=keep[:, 0].expand(-1, q.shape[2], -1))
        return sdpa(q, k, v, attn_mask=keep), sdpa(q, k, v, attn_mask=bias, scale=0.3), flat


class CausalAttention(torch.nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


class GroupedQueryAttention(torch.nn.Module):
    """4 query heads reading 2 K/V heads."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        sdpa = torch.nn.functional.scaled_dot_product_attention
        return sdpa(q, k, v, is_causal=True, enable_gqa=True, scale=0.5)


class EmbeddingLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(32, 16)
        self.linear = torch.nn.Linear(16, 8)
        self.head = torch.nn.Linear(8, 4, bias=False)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden = self.linear(self.embedding(ids))
        return self.head(hidden), self.head(hidden[:, 0])  # 3-D MatMul and 2-D Gemm


class CatSplit(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        first, second, third = torch.split(x, [2, 3, 3], dim=1)
        halves = torch.chunk(x, 2, dim=-1)  # not in the table: the decomposed path
        stacked = torch.stack([first.sum(1), third.mean(1)], dim=0)
        return torch.cat([third, first * 2, second], dim=1), halves[1], stacked


class Slicing(torch.nn.Module):
    """Steps, negative bounds, select, flip (a negative step, which torch slicing forbids)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (
            x[:, 1:-1:2],
            x[..., -1],
            x.flip(-1)[:, ::3],
            x.transpose(1, 2)[:, -3:],
            x.narrow(2, 1, 2),
        )


class Indexing(torch.nn.Module):
    def forward(self, x: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rows = torch.arange(x.shape[0]).unsqueeze(1)
        return (
            x[rows, index], x[:, index[0]], torch.gather(x[..., 0], 1, index),
            torch.index_select(x, 2, index[0, :2]), x.argmax(-1), x.amax(1), x.var(-1),
            *x.max(dim=1), *x.topk(2, dim=-1),  # two outputs each
        )  # fmt: skip


class TypesAndMasks(torch.nn.Module):
    """int64 -> float promotion, comparisons, masked_fill, where, cumsum, floor division."""

    def forward(self, ids: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        positions = torch.cumsum(ids != 0, dim=1) * (ids != 0)
        scaled = ids * 0.5 + x.sum(-1)
        masked = x.masked_fill(ids.unsqueeze(-1) > 5, -1e4)
        chosen = torch.where(ids >= 3, x[..., 0], torch.zeros_like(x[..., 0]))
        return positions, scaled, masked, chosen, ids // 3, torch.remainder(ids - 4, 3)


def _image(seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((2, 3, 10, 12)).astype(np.float32)}


def _floats(*shapes: tuple[int, ...]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    names = ("q", "k", "v") if len(shapes) == 3 else ("x",)
    return {
        n: rng.standard_normal(s).astype(np.float32) for n, s in zip(names, shapes, strict=True)
    }


def _ids_and_floats() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "ids": rng.integers(0, 8, (2, 6), dtype=np.int64),
        "x": rng.standard_normal((2, 6, 4)).astype(np.float32),
    }


def _gather_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x": rng.standard_normal((3, 5, 4)).astype(np.float32),
        "index": rng.integers(0, 4, (3, 4), dtype=np.int64),
    }


SMALL_MODULES = {  # name: (module, inputs, ops the IR must hold)
    "conv_bn_relu": (ConvBnRelu, _image, {"Conv": 2, "BatchNormalization": 1, "ConvTranspose": 1}),
    "pooling": (Pooling, _image, {"MaxPool": 1, "AveragePool": 2, "GlobalAveragePool": 1}),
    "norms": (Norms, lambda: _floats((2, 5, 16)), {"LayerNormalization": 2, "RMSNormalization": 1, "ReduceL2": 1}),
    "activations": (
        Activations, lambda: _floats((2, 3, 8)), {"Gelu": 2, "HardSwish": 1, "Softmax": 1},
    ),
    "sdpa_masks": (
        MaskedAttention, lambda: _floats((2, 4, 5, 8), (2, 4, 7, 8), (2, 4, 7, 8)),
        {"Attention": 3},
    ),
    "sdpa_causal": (
        CausalAttention, lambda: _floats((2, 4, 6, 8), (2, 4, 6, 8), (2, 4, 6, 8)),
        {"Attention": 1},
    ),
    "sdpa_gqa": (
        GroupedQueryAttention, lambda: _floats((2, 4, 6, 8), (2, 2, 6, 8), (2, 2, 6, 8)),
        {"Attention": 1},
    ),
    "embedding_linear": (
        EmbeddingLinear,
        lambda: {"ids": np.random.default_rng(0).integers(0, 32, (2, 5), dtype=np.int64)},
        {"Gather": 2, "Gemm": 1, "MatMul": 2},
    ),
    "cat_split": (CatSplit, lambda: _floats((2, 8, 6)), {"Concat": 2, "Split": 2}),
    "slicing": (Slicing, lambda: _floats((2, 9, 6)), {"Slice": 5}),
    "indexing": (Indexing, _gather_inputs, {"GatherND": 1, "GatherElements": 1, "ArgMax": 2, "TopK": 1}),
    "types_and_masks": (TypesAndMasks, _ids_and_floats, {"CumSum": 1, "Where": 2}),
}  # fmt: skip


@pytest.mark.parametrize("name", list(SMALL_MODULES))
def test_small_module_equals_eager(name: str) -> None:
    make, make_inputs, expected_ops = SMALL_MODULES[name]
    torch.manual_seed(0)
    module = make().eval()
    inputs = make_inputs()
    model = from_torch(module, tuple(torch.from_numpy(v) for v in inputs.values()))
    verify(model)
    ops = collections.Counter(node.op for node in model.graph)
    for op, count in expected_ops.items():
        assert ops[op] == count, f"{op}: {ops[op]} in {dict(ops)}"
    check_equal_to_eager(model, module, inputs)


def test_symbolic_sequence_in_a_small_module() -> None:
    """A derived size (batch * sequence) in a view, and sizes computed from sym_size."""

    class Flatten(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            flat = x.reshape(x.shape[0] * x.shape[1], -1)
            return flat + torch.arange(x.shape[1]).repeat(x.shape[0]).unsqueeze(1)

    sequence = torch.export.Dim("sequence")
    model = from_torch(
        Flatten(), (torch.ones(2, 5, 3),), ({0: torch.export.Dim("batch"), 1: sequence},)
    )
    assert model.graph.outputs[0].type.shape == ("batch*sequence", 3)
    inputs = _floats((4, 7, 3))
    assert_matches(eager(Flatten(), inputs), ort_run(model, inputs), "Flatten at 4 x 7")


# ----- what fails, and how ------------------------------------------------------------------------


class UsesFFT(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfft(x).abs()  # the line the error must name


@torch.library.custom_op("graphopt_test::double", mutates_args=())
def _double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_double.register_fake
def _double_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class UsesCustomOp(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _double(x) + 1  # the line the error must name


@pytest.mark.parametrize(
    ("module", "op", "hint"),
    [
        (UsesFFT, "aten._fft_r2c.default", "core ATen"),
        (UsesCustomOp, "graphopt_test.double.default", "custom"),
    ],
)
def test_untranslatable_op_names_op_and_source_line(module: Any, op: str, hint: str) -> None:
    source, first = inspect.getsourcelines(module.forward)
    line = first + next(i for i, text in enumerate(source) if "error must name" in text)
    with pytest.raises(UnsupportedOpError) as caught:
        from_torch(module(), (torch.randn(2, 8),))
    message = str(caught.value)
    assert op in message
    assert f"{Path(__file__).name}:{line}" in message
    assert hint in message
    assert "error must name" in message  # the source text itself


def test_training_mode_dropout_is_refused() -> None:
    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5)).train()
    with pytest.raises(UnsupportedOpError, match="eval"):
        from_torch(module, (torch.randn(2, 4),))


# ----- .pt2 files and the command line ------------------------------------------------------------


def test_pt2_through_the_command_line(tmp_path: Path) -> None:
    from graphopt.api.cli import main

    torch.manual_seed(0)
    module = ConvBnRelu().eval()
    inputs = _image()
    program = torch.export.export(
        module, (torch.from_numpy(inputs["x"]),), dynamic_shapes=({0: torch.export.Dim("n")},)
    )
    assert translatable_as_is(program)
    path = tmp_path / "model.pt2"
    torch.export.save(program, path)
    output = tmp_path / "model.onnx"
    assert main(["optimize", str(path), "-o", str(output), "--passes", "O2", "-q"]) == 0
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    for batch in (2, 5):
        feeds = {"x": _image(seed=batch)["x"].repeat(3, axis=0)[:batch]}
        assert_matches(eager(module, feeds), session.run(None, feeds), f".pt2 at batch {batch}")
    # a program read back from a file keeps no Dim names: dims are named after input and axis
    assert session.get_inputs()[0].shape[0] == "x_dim0"
