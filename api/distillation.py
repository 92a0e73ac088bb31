"""Knowledge distillation: train a student model's weights to reproduce a teacher's outputs.

    student = graphopt.distill(student, teacher, "random:64", steps=300, loss="mse")
    result = distill_model(student, teacher, data, ...)   # the model and a DistillReport

(`graphopt.distill` is `graphopt.api.distill`, the thin public function that calls
`distill_model` here; this module is the training itself.)

Why here: after a lossy pass (pruning, 4-bit weights) a few hundred steps of distillation on
unlabelled inputs recover much of the accuracy the pass cost, and graphopt already has every
piece: the torch backend makes the student a trainable `torch.fx.GraphModule` with the same
graph, and writes the trained values back into the same initializers.

How:

1. The samples (input dicts: an iterable, an `.npz` file as `--calibration` reads it, or
   `"random:N"`, see `random_samples`) are split: the last `holdout` of them (a fraction or a
   count) are held out for evaluation, the rest train.
2. The teacher runs once per sample (ONNX Runtime by default, or any backend by name); its
   outputs are kept as the targets.
3. The student becomes a GraphModule (`graphopt.backends.torch`); its float weights of two or
   more elements train with Adam (scalars such as a GELU's 0.5 or a Pow exponent stay as they
   are). With `keep_sparsity` (default) weights of rank >= 2 that are exactly zero stay zero:
   a pruned student stays pruned. Quantized (QDQ) weights train as float latents through the
   straight-through estimator and are re-quantized onto their unchanged grid when written
   (their zero codes are not pruning: they may move).
4. Each step takes one training sample (in shuffled order, epoch after epoch) and minimizes
   `loss` over the chosen `outputs` (default: the float outputs both models have): "mse" on
   the raw values (logits, hidden states), or "kl": KL(teacher || student) of the softmaxes
   over the last axis at `temperature` T, times T^2 (the usual scaling that keeps gradients
   comparable across T).
5. The trained values go back into the student's initializers (nothing else changes), and the
   report gives the mean cosine similarity of student and teacher outputs on the held-out
   samples, before and after, measured on the written model, with steps and time.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphopt.ir.core import Model, Value
from graphopt.ir.errors import GraphoptError
from graphopt.ir.types import DType, TensorType

__all__ = ["DistillReport", "Distillation", "cosine", "distill_model", "random_samples"]

Feeds = Mapping[str, np.ndarray]
_PASS_THROUGH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"}


@dataclass
class DistillReport:
    """What a distillation did and how close the student came to the teacher."""

    steps: int
    seconds: float
    train_samples: int
    holdout_samples: int
    loss: str
    outputs: list[str]
    cosine_before: float  # mean over held-out samples and outputs
    cosine_after: float
    first_loss: float
    last_loss: float  # mean over the last tenth of the steps
    changed: list[str] = field(default_factory=list)  # initializers written

    @property
    def gap_closed(self) -> float:
        """The fraction of the distance to cosine 1.0 that distillation closed."""
        gap = 1.0 - self.cosine_before
        return (self.cosine_after - self.cosine_before) / gap if gap > 0 else 0.0

    def summary(self) -> str:
        return (
            f"held-out cosine {self.cosine_before:.5f} -> {self.cosine_after:.5f} "
            f"({100 * self.gap_closed:.0f}% of the gap closed); loss ({self.loss}) "
            f"{self.first_loss:.4g} -> {self.last_loss:.4g}; {self.steps} steps in "
            f"{self.seconds:.1f} s; {self.train_samples} training / {self.holdout_samples} "
            f"held-out samples; {len(self.changed)} initializers updated"
        )


@dataclass
class Distillation:
    model: Model
    report: DistillReport


# ----- data -----------------------------------------------------------------------------------


def _gather_table_size(value: Value, depth: int = 0) -> int | None:
    """The row count of the constant table an integer input indexes (following Cast, Reshape
    and friends), or None if it indexes none."""
    for node, index in value.uses:
        if node.op == "Gather" and index == 1 and node.inputs[0] is not None:
            table = node.inputs[0].const_value
            if table is not None:
                return int(table.shape[int(node.get_attr("axis", 0))])
        if node.op in _PASS_THROUGH and index == 0 and depth < 4:
            found = _gather_table_size(node.outputs[0], depth + 1)
            if found is not None:
                return found
    return None


def random_samples(
    model: Model, n: int, *, seed: int = 0, dims: Mapping[str, int] | None = None
) -> list[dict[str, np.ndarray]]:
    """`n` seeded random input dicts for distillation: floats standard normal; integer inputs
    that index a constant table (token ids into an embedding) uniform over its rows; other
    integer inputs (attention masks) ones; bools true. Symbolic dims take `dims`, else 8."""
    from graphopt.api.feeds import runtime_inputs

    rng = np.random.default_rng(seed)
    dims = dict(dims or {})
    specs = []
    for value in runtime_inputs(model.graph):
        t = value.type
        if not isinstance(t, TensorType) or t.shape is None:
            raise GraphoptError(f"input %{value.name} has no known shape for random samples")
        shape = tuple(d if isinstance(d, int) else dims.get(str(d), 8) for d in t.shape)
        specs.append((value.name or "", t.dtype, shape, _gather_table_size(value)))
    samples = []
    for _ in range(n):
        sample: dict[str, np.ndarray] = {}
        for name, dtype, shape, rows in specs:
            if dtype.is_float:
                sample[name] = rng.standard_normal(shape).astype(dtype.numpy)
            elif dtype.is_integer and rows:
                sample[name] = rng.integers(0, rows, shape).astype(dtype.numpy)
            elif dtype.is_integer or dtype is DType.BOOL:
                sample[name] = np.ones(shape, dtype.numpy)
            else:
                raise GraphoptError(f"cannot make random {dtype.short_name} input %{name}")
        samples.append(sample)
    return samples


def _samples(data: Any, model: Model, dims: Mapping[str, int] | None) -> list[dict[str, Any]]:
    if isinstance(data, str):
        kind, sep, count = data.partition(":")
        if kind == "random" and sep:
            if not count.isdigit() or int(count) < 2:
                raise GraphoptError(f"bad data '{data}'", hint="write random:N with N >= 2")
            return random_samples(model, int(count), dims=dims)
    if isinstance(data, (str, os.PathLike)):
        from graphopt.passes.quantization.calibration import from_npz

        data = from_npz(data, model)
    return [dict(sample) for sample in data]


def _split(samples: list[Any], holdout: float | int) -> tuple[list[Any], list[Any]]:
    if len(samples) < 2:
        raise GraphoptError("distillation needs at least 2 samples (one to train on, one held out)")
    count = int(holdout) if isinstance(holdout, int) else math.ceil(holdout * len(samples))
    count = min(max(count, 1), len(samples) - 1)
    return samples[:-count], samples[-count:]


# ----- training -------------------------------------------------------------------------------


def _teacher_outputs(
    teacher: Model, samples: list[Feeds], backend: str, names: Sequence[str]
) -> list[dict[str, np.ndarray]]:
    from graphopt.backends.base import get_backend

    executable = get_backend(backend).compile(teacher)
    wanted = {v.name for v in teacher.graph.inputs}
    results = []
    for sample in samples:
        outputs = executable.run({k: v for k, v in sample.items() if k in wanted})
        results.append({name: np.asarray(outputs[name]) for name in names})
    return results


def _output_names(student: Model, teacher: Model, outputs: Sequence[str] | None) -> list[str]:
    def floats(model: Model) -> list[str]:
        return [
            name
            for name, v in zip(model.graph.output_names, model.graph.outputs, strict=True)
            if isinstance(v.type, TensorType) and v.type.dtype.is_float
        ]

    common = [name for name in floats(student) if name in set(floats(teacher))]
    if outputs is None:
        if not common:
            raise GraphoptError("the student and the teacher have no float output in common")
        return common
    missing = [name for name in outputs if name not in common]
    if missing:
        raise GraphoptError(
            f"not float outputs of both models: {', '.join(missing)}",
            hint=f"outputs both have: {', '.join(common) or 'none'}",
        )
    return list(outputs)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two arrays, flattened."""
    x, y = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    norm = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(x @ y) / norm if norm > 0 else float(np.array_equal(x, y))


def _mean_cosine(model: Model, samples: list[Feeds], targets: list[dict[str, np.ndarray]]) -> float:
    from graphopt.backends.base import get_backend

    executable = get_backend("torch").compile(model)
    wanted = set(executable.input_names)
    values = []
    for sample, target in zip(samples, targets, strict=True):
        outputs = executable.run({k: v for k, v in sample.items() if k in wanted})
        values += [cosine(outputs[name], expected) for name, expected in target.items()]
    return float(np.mean(values))


def _loss_fn(kind: str, temperature: float) -> Any:
    import torch
    import torch.nn.functional as F

    if kind == "mse":
        return lambda s, t: F.mse_loss(s, t)
    if kind == "kl":

        def kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            log_s = F.log_softmax(s.reshape(-1, s.shape[-1]) / temperature, dim=-1)
            log_t = F.log_softmax(t.reshape(-1, t.shape[-1]) / temperature, dim=-1)
            return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * temperature**2

        return kl
    raise GraphoptError(f"unknown distillation loss '{kind}'", hint="use mse or kl")


def _trainable(module: Any) -> list[Any]:
    """The parameters that train (two or more elements); the others stop asking for grads."""
    chosen = []
    for parameter in module.parameters():
        if parameter.numel() < 2:
            parameter.requires_grad_(False)
            continue
        chosen.append(parameter)
    return chosen


def distill_model(
    student: Model | str | os.PathLike[str],
    teacher: Model | str | os.PathLike[str],
    data: Any,
    *,
    steps: int = 200,
    loss: str = "mse",
    temperature: float = 1.0,
    lr: float = 1e-3,
    outputs: Sequence[str] | None = None,
    holdout: float | int = 0.25,
    keep_sparsity: bool = True,
    teacher_backend: str = "onnxruntime",
    device: str = "cpu",
    dims: Mapping[str, int] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Distillation:
    """Distill `teacher` into `student` (changed in place); see the module docstring."""
    import torch

    from graphopt.api import load
    from graphopt.backends.torch import binding_of, to_graph_module, to_tensor, write_weights

    student, teacher = load(student), load(teacher)
    if steps < 1:
        raise GraphoptError(f"steps must be >= 1, not {steps}")
    loss_of = _loss_fn(loss, temperature)
    names = _output_names(student, teacher, outputs)
    train, held = _split(_samples(data, student, dims), holdout)
    train_targets = _teacher_outputs(teacher, train, teacher_backend, names)
    held_targets = _teacher_outputs(teacher, held, teacher_backend, names)
    before = _mean_cosine(student, held, held_targets)

    module = to_graph_module(student, device)
    binding = binding_of(module)
    order = {name: i for i, name in enumerate(binding.output_names)}
    params = _trainable(module)
    latents = {id(getattr(module, q.latent)) for q in binding.quantized.values()}
    masks = [
        (p, (p != 0).to(p.dtype))
        for p in params
        if keep_sparsity and p.dim() >= 2 and id(p) not in latents  # a zero code is no prune
    ]
    masks = [(p, m) for p, m in masks if not bool(m.all())]
    optimizer = torch.optim.Adam(params, lr=lr)

    def tensors(sample: Feeds) -> list[Any]:
        return [
            to_tensor(sample[n]).to(device) if n in sample else None for n in binding.input_names
        ]

    inputs = [tensors(sample) for sample in train]
    targets = [{n: to_tensor(t[n]).to(device) for n in names} for t in train_targets]
    rng = np.random.default_rng(seed)
    losses: list[float] = []
    start = time.perf_counter()
    with _progress(progress, steps) as advance:
        permutation: list[int] = []
        for _ in range(steps):
            if not permutation:
                permutation = list(rng.permutation(len(train)))
            i = permutation.pop()
            results = module(*inputs[i])
            value = sum(loss_of(results[order[n]].float(), targets[i][n].float()) for n in names)
            optimizer.zero_grad(set_to_none=True)
            value.backward()  # type: ignore[union-attr]
            for parameter, mask in masks:
                if parameter.grad is not None:
                    parameter.grad.mul_(mask)
            optimizer.step()
            with torch.no_grad():
                for parameter, mask in masks:
                    parameter.mul_(mask)
            losses.append(float(value.detach()))  # type: ignore[union-attr]
            advance(losses[-1])
    seconds = time.perf_counter() - start
    changed = write_weights(student, module)
    after = _mean_cosine(student, held, held_targets)
    tail = losses[-max(1, steps // 10) :]
    report = DistillReport(
        steps, seconds, len(train), len(held), loss, names, before, after, losses[0],
        float(np.mean(tail)), changed,
    )  # fmt: skip
    return Distillation(student, report)


class _progress:
    """A rich progress bar with the current loss, or nothing."""

    def __init__(self, show: bool, total: int):
        self.show, self.total = show, total
        self.bar: Any = None

    def __enter__(self) -> Any:
        if not self.show:
            return lambda loss: None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.bar = Progress(
            TextColumn("distill"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.5g}"), TimeElapsedColumn(),
        )  # fmt: skip
        self.bar.__enter__()
        task = self.bar.add_task("distill", total=self.total, loss=float("nan"))
        return lambda loss: self.bar.update(task, advance=1, loss=loss)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
