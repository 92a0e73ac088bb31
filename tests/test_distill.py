"""Knowledge distillation: a GPT-2 pruned to half its MLP neurons gets most of the way back to
its teacher's outputs on held-out inputs after a hundred or so steps on random tokens; a 4-bit
QDQ student trains through the straight-through estimator and stays a 4-bit QDQ model; only
initializer values change; the command line writes the distilled model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import graphopt
from graphopt.api.cli import main
from graphopt.api.distillation import cosine, distill_model, random_samples
from graphopt.backends.onnxruntime import run_onnxruntime
from graphopt.ir.errors import GraphoptError
from graphopt.ir.types import DType

torch.set_num_threads(1)
DIMS = {"batch": 4, "sequence": 16}


def _structure(model: graphopt.Model) -> list:
    """Everything but the initializer values: ops, attributes, wiring, initializer types."""
    nodes = [
        (n.op, sorted(n.attrs), [v.name if v else None for v in n.inputs], [v.name for v in n.outputs])
        for n in model.graph
    ]  # fmt: skip
    inits = {k: (v.const_value.dtype, v.const_value.shape) for k, v in model.graph.initializers.items()}  # fmt: skip
    return [nodes, inits, model.graph.output_names]


@pytest.fixture(scope="module")
def gpt2(zoo_model):
    path = str(zoo_model("gpt2"))
    return lambda passes: graphopt.optimize(graphopt.load(path), passes)


def test_distillation_closes_most_of_the_pruning_gap(gpt2, tmp_path):
    teacher = gpt2("O2")
    student = gpt2("O2,prune-mlp{ratio=0.5}")
    widths = [v.const_value.shape for k, v in student.graph.initializers.items() if "c_fc" in k]
    assert widths == [(64, 128), (64, 128)]  # half of the 256 neurons of each layer are gone
    shape = _structure(student)
    result = distill_model(
        student, teacher, "random:40", steps=150, lr=1e-3, holdout=8, dims=DIMS, progress=False
    )
    report = result.report
    print(report.summary())
    assert report.cosine_before < 0.97  # pruning costs something worth recovering
    assert report.cosine_after - report.cosine_before >= (1 - report.cosine_before) / 3
    assert report.last_loss < report.first_loss / 3
    assert result.model is student and _structure(student) == shape
    assert report.changed and all(k in student.graph.initializers for k in report.changed)
    # the written model, saved and run by ONNX Runtime on fresh inputs, is as close
    path = tmp_path / "distilled.onnx"
    graphopt.save(student, path)
    saved = graphopt.load(str(path))
    assert _structure(saved) == shape
    for sample in random_samples(student, 2, seed=99, dims=DIMS):
        ours = run_onnxruntime(saved, sample)["logits"]
        assert cosine(ours, run_onnxruntime(teacher, sample)["logits"]) > 0.985


def test_kl_loss_with_a_temperature_also_recovers(gpt2):
    teacher, student = gpt2("O2"), gpt2("O2,prune-mlp{ratio=0.5}")
    report = distill_model(
        student, teacher, "random:24", steps=80, loss="kl", temperature=2.0, lr=1e-3,
        holdout=6, dims=DIMS, progress=False,
    ).report  # fmt: skip
    assert report.cosine_after - report.cosine_before >= (1 - report.cosine_before) / 3


def test_zeros_of_a_sparse_student_stay_zero(gpt2):
    teacher, student = gpt2("O2"), gpt2("O2")
    weight = student.graph.initializers["model.transformer.h.0.mlp.c_fc.weight"]
    pruned = weight.const_value.copy()
    pruned[:, ::2] = 0  # every other neuron
    weight.const_value = pruned
    distill_model(student, teacher, "random:8", steps=10, holdout=2, dims=DIMS, progress=False)
    assert not weight.const_value[:, ::2].any() and weight.const_value[:, 1::2].all()
    assert not np.array_equal(weight.const_value, pruned)


def test_a_4_bit_qdq_student_trains_through_the_ste(gpt2):
    teacher = gpt2("O2")
    student = gpt2("O2,upgrade-opset,quantize-weights{bits=4 min-elements=256}")
    codes = [n.inputs[0] for n in student.graph if n.op == "DequantizeLinear"]
    quantized = {  # the 4-bit weight codes (uint4 when asymmetric; zero points are not codes)
        v.name: v.const_value.copy() for v in codes if v.type.dtype in (DType.INT4, DType.UINT4)
    }
    assert quantized
    result = distill_model(
        student, teacher, "random:40", steps=150, lr=1e-4, holdout=8, dims=DIMS, progress=False
    )
    report = result.report
    assert report.last_loss < report.first_loss
    assert report.cosine_after > report.cosine_before
    written = student.graph.initializers
    assert all(written[k].const_value.dtype == v.dtype for k, v in quantized.items())
    assert any(k in report.changed for k in quantized)  # codes moved on their grid
    ops = [n.op for n in student.graph]
    assert ops.count("DequantizeLinear") == len(quantized)


def test_random_samples_index_the_whole_embedding_and_leave_masks_on(gpt2):
    samples = random_samples(gpt2("O2"), 4, dims=DIMS)
    ids = np.concatenate([s["input_ids"].ravel() for s in samples])
    assert ids.min() >= 0 and ids.max() < 256 and ids.max() > 200
    assert all((s["attention_mask"] == 1).all() for s in samples)
    assert samples[0]["input_ids"].shape == (4, 16)


def test_bad_requests_are_errors(gpt2):
    model = gpt2("O2")
    with pytest.raises(GraphoptError, match="unknown distillation loss 'l1'"):
        distill_model(model, model, "random:4", loss="l1", progress=False)
    with pytest.raises(GraphoptError, match="not float outputs of both models: nope"):
        distill_model(model, model, "random:4", outputs=["nope"], progress=False)
    with pytest.raises(GraphoptError, match="at least 2 samples"):
        distill_model(model, model, [random_samples(model, 1)[0]], progress=False)


def test_distill_command(gpt2, tmp_path, capsys):
    teacher, student = tmp_path / "teacher.onnx", tmp_path / "student.onnx"
    graphopt.save(gpt2("O2"), teacher)
    graphopt.save(gpt2("O2,prune-mlp{ratio=0.5}"), student)
    out = tmp_path / "distilled.onnx"
    argv = [
        "distill", str(student), "--teacher", str(teacher), "--calibration", "random:12",
        "--steps", "30", "--dim", "batch=2", "--dim", "sequence=8", "-o", str(out), "-q",
    ]  # fmt: skip
    assert main(argv) == 0
    text = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "held-out cosine" in text and "30 steps" in text
    before, after = graphopt.load(str(student)), graphopt.load(str(out))
    assert _structure(after) == _structure(before)
    with pytest.raises(SystemExit):
        main([*argv, "--loss", "hinge"])
