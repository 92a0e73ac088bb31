"""The one driver behind prune-channels, prune-mlp and prune-heads.

Each of the three passes prunes the regions of one kind (`structure.Region.kind`: "conv",
"dense" for MLP hidden layers, "attention" for head groups): it scores every unit of every region,
drops the lowest `floor(ratio * units)` per region (at least one unit kept:
`importance.select_per_layer`), optionally refits the consumer layers (`refit.py`), and removes the
slices (`slicing.remove`). Scores of a unit add up over every weight slice that goes with it:

- `magnitude`: the squared L2 norm of the unit's slice of each source and sink weight, each
  tensor's scores divided by their mean first (so that wide and narrow tensors weigh alike), then
  the square root;
- `activation`: Wanda's `|W| * ||x_j||` summed over the sink weights' rows/channels of the unit,
  `||x_j||` the L2 norm of the sink's input channel j over the calibration data;
- `bn-gamma` (channels): `|gamma|` of the BatchNormalization entries of the unit.

The report (notes, shown in the command line's table, and the `structured-pruning` artifact,
`structured_report.py`, for `--report`): per group what was removed, parameters and
MatMul/Gemm/Conv FLOPs before and after (FLOPs per batch x sequence element: symbolic dims count
1), and, with calibration data, the cosine similarity of the model's outputs before and after on
(up to `SIMILARITY_SAMPLES` of) the calibration samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from graphopt.ir.core import Graph, Model, Node, Value
from graphopt.ir.errors import GraphoptError
from graphopt.ir.types import TensorType
from graphopt.passes.manager import ModelPass, PassContext
from graphopt.passes.pruning import importance
from graphopt.passes.pruning.refit import SinkCut, refit
from graphopt.passes.pruning.slicing import Plan, drop_if_unused, remove
from graphopt.passes.pruning.structure import ConstEdit, Region, analyze
from graphopt.passes.pruning.structured_report import (
    GroupRow,
    PassSummary,
    RefitRow,
    structured_report,
)

__all__ = ["SIMILARITY_SAMPLES", "StructuredPrune", "layer_flops", "output_cosine"]

SIMILARITY_SAMPLES = 4
AUTO_MIN_BLOCKS = 4  # multiple=0 rounds a Conv group to SIMD blocks from this many blocks up
LAYER_OPS = ("MatMul", "Gemm", "Conv", "com.microsoft.FusedConv")


class StructuredPrune(ModelPass):
    """Base of the structured pruning passes; subclasses set `kind`, `unit` and the options."""

    exact: ClassVar[bool] = False
    kind: ClassVar[str] = ""
    unit: ClassVar[str] = ""
    group: ClassVar[str] = ""
    score_kinds: ClassVar[tuple[str, ...]] = ("magnitude", "activation")

    ratio: float
    scores: str
    refit: bool
    multiple: int

    def run(self, model: Model, context: PassContext) -> bool:
        if not 0.0 <= float(self.ratio) < 1.0:
            raise GraphoptError(
                f"ratio must be in [0, 1), got {self.ratio}",
                hint=f"{self.name}{{ratio=0.3}} removes 30% of the {self.unit}s of each group",
            )
        if int(self.multiple) < 0:
            raise GraphoptError(
                f"multiple must be 0 (auto) or a positive integer, got {self.multiple}",
                hint="multiple=8 keeps channel counts that are multiples of 8",
            )
        if self.scores not in self.score_kinds:
            raise GraphoptError(
                f"unknown scores '{self.scores}'",
                hint=f"{self.name} takes scores={'|'.join(self.score_kinds)}",
            )
        needs_data = self.refit or self.scores == "activation"
        samples = list(context.calibration) if context.calibration is not None else None
        if needs_data and not samples:
            what = "refit=true" if self.refit else "scores=activation"
            raise GraphoptError(
                f"{self.name} with {what} needs calibration data",
                hint="give --calibration calib.npz (or random:N), or "
                "graphopt.optimize(..., calibration=feeds)",
            )
        graph = model.graph
        regions = [r for r in analyze(graph) if r.kind == self.kind]
        usable = [r for r in regions if not r.refusal and r.units()[1] >= 2]
        for r in regions:
            if r.refusal:
                context.note(
                    f"left alone {r.describe()}: {r.refusal}", r.refused_at or r.seed, "refused"
                )
        if self.scores == "bn-gamma":
            usable = self._with_batchnorm(usable, context)
        if not usable:
            reasons = "; ".join(f"{r.describe()}: {r.refusal}" for r in regions[:3])
            raise GraphoptError(
                f"the model has no prunable {self.group} group",
                where=f"graph '{graph.name}'",
                hint=reasons or f"no {self.kind} layers found",
            )
        if self.ratio == 0:
            return False
        scores = self._scores(model, usable, samples)
        plans = [
            Plan(r, importance.lowest(s, self._drop_count(len(s))))
            for r, s in zip(usable, scores, strict=True)
        ]
        plans = [p for p in plans if len(p.drop)]
        if not plans:
            context.note(f"ratio {self.ratio} removes no whole {self.unit} from any group")
            return False
        before_out = _run(model, samples) if samples else None
        flops_before = {id(r): _region_flops(r) for r in usable}
        params_before = {id(p.region): _region_params(p.region) for p in plans}
        total_before = (model_flops(graph), model_params(graph))
        base: dict[tuple[Node, int], np.ndarray] = {}
        bias: dict[Node, np.ndarray] = {}
        if self.refit:
            cuts = [SinkCut(e.node, p.keep(e.ids)) for p in plans for e in p.region.sinks]
            result = refit(model, samples or [], cuts)
            base, bias = result.weights, result.bias
            for node, reason in result.skipped:
                context.note(f"not refit: {reason}", node)
            for node, how in result.chosen.items():
                context.note(f"refit: {how}", node)
                structured_report(context).refits.append(
                    RefitRow(self.name, node.describe(), how, result.heldout_ratio.get(node))
                )
        output_keep = {e.node: p.keep(e.ids) for p in plans for e in p.region.sources}
        remove(graph, plans, base)
        _fold_bias(graph, bias, output_keep)
        report = structured_report(context)
        for p in plans:
            _, units = p.region.units()
            row = GroupRow(
                self.name, p.region.describe(), len(p.drop), units, self.unit,
                params_before[id(p.region)], _region_params(p.region),
                flops_before[id(p.region)], _region_flops(p.region),
            )  # fmt: skip
            report.groups.append(row)
            context.note(
                f"removed {row.removed} of {units} {self.unit}s from {row.group}: parameters "
                f"{row.params_before:,} -> {row.params_after:,}, FLOPs {row.flops_before:,} -> "
                f"{row.flops_after:,}"
            )
        summary = PassSummary(
            self.name, total_before[0], model_flops(graph), total_before[1], model_params(graph)
        )
        if before_out is not None:
            summary.cosine = output_cosine(before_out, _run(model, samples))
        report.passes.append(summary)
        context.note(
            f"MatMul/Gemm/Conv FLOPs {summary.flops_before:,} -> {summary.flops_after:,} "
            f"({summary.flops_after / max(summary.flops_before, 1):.0%}), parameters "
            f"{summary.params_before:,} -> {summary.params_after:,}"
            + (
                f", output cosine on the calibration data {summary.cosine:.4f}"
                if summary.cosine is not None
                else ""
            )
        )
        return True

    def _drop_count(self, units: int) -> int:
        """`floor(ratio * units)`, at least one kept, and the kept count rounded up to a
        multiple of `multiple` (`_multiple`: 0 picks one)."""
        count = importance.drop_count(units, float(self.ratio), 1)
        multiple = self._multiple(units)
        if multiple > 1:
            keep = -(-(units - count) // multiple) * multiple
            count = units - min(units, keep)
        return count

    def _multiple(self, units: int) -> int:
        """`multiple`, or with 0 (auto) the SIMD block of this CPU's blocked convolutions for
        Conv channel groups of at least `AUTO_MIN_BLOCKS` blocks, else 1: ONNX Runtime runs a
        Conv in its fast NCHWc layout only when the channel counts are multiples of the block
        (8 floats on AVX2, 16 on AVX-512); a group of 45 channels (64 less 30%) falls back to
        the slow path, and the pruned ResNet-18 gains 0.70 of its FLOP reduction instead of
        0.92. MatMul neurons and heads have no such block."""
        if self.multiple or self.kind != "conv":
            return max(int(self.multiple), 1)
        from graphopt.passes.quantization.cpu_features import detect_cpu

        block = 16 if detect_cpu().has("avx512f") else 8
        return block if units >= AUTO_MIN_BLOCKS * block else 1

    def _with_batchnorm(self, regions: list[Region], context: PassContext) -> list[Region]:
        kept = []
        for r in regions:
            if any(e.node.op_type == "BatchNormalization" and e.index == 1 for e in r.consts):
                kept.append(r)
            else:
                context.note(
                    f"left alone {r.describe()}: scores=bn-gamma needs a BatchNormalization "
                    "(O1's fold-batchnorm folds them: prune before O1, or use magnitude)",
                    r.seed,
                    "refused",
                )
        return kept

    def _scores(
        self, model: Model, regions: Sequence[Region], samples: list | None
    ) -> list[np.ndarray]:
        norms: dict[str, np.ndarray] = {}
        if self.scores == "activation":
            from graphopt.passes.pruning.activations import input_norms

            requests: dict[str, int] = {}
            for r in regions:
                for e in r.sinks:
                    x = e.node.inputs[0]
                    assert x is not None
                    requests[x.name or ""] = r.values[x][0]
            norms = input_norms(model, samples or [], requests)
        result = []
        for r in regions:
            _, count = r.units()
            total = np.zeros(count)
            for e in r.consts:
                per_position = self._position_scores(e, norms)
                if per_position is None:
                    continue
                np.add.at(total, r.unit_of(e.ids), per_position)
            result.append(np.sqrt(total) if self.scores == "magnitude" else total)
        return result

    def _position_scores(self, e: ConstEdit, norms: dict[str, np.ndarray]) -> np.ndarray | None:
        """One score per position of `e`'s axis (None: this edit does not score)."""
        value = e.node.inputs[e.index]
        assert value is not None and value.const_value is not None
        array = value.const_value
        if self.scores == "magnitude":
            if e.role == "param":
                return None
            s = importance.magnitude(array, axis=e.axis, norm="l2") ** 2
            mean = float(s.mean())
            return s / mean if mean > 0 else s
        if self.scores == "bn-gamma":
            if e.node.op_type == "BatchNormalization" and e.index == 1:
                return importance.bn_gamma(array)
            return None
        if e.role != "sink":
            return None
        norm = norms[e.node.inputs[0].name or ""]  # type: ignore[union-attr]
        s = importance.activation_aware(array, norm, e.axis)
        return importance.reduce_scores(s, e.axis, "l1")


def _run(model: Model, samples: Sequence | None) -> list[np.ndarray]:
    from graphopt.backends.reference import Interpreter

    interpreter = Interpreter(model)
    outputs: list[np.ndarray] = []
    for feeds in list(samples or [])[:SIMILARITY_SAMPLES]:
        outputs.extend(
            np.asarray(v, dtype=np.float64).ravel()
            for v in interpreter.run(feeds).values()
            if np.issubdtype(np.asarray(v).dtype, np.floating)
        )
    return outputs


def output_cosine(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    """Cosine similarity of two lists of output arrays, all concatenated."""
    x = np.concatenate([np.ravel(v).astype(np.float64) for v in a])
    y = np.concatenate([np.ravel(v).astype(np.float64) for v in b])
    denom = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(x @ y / denom) if denom > 0 else 1.0


def layer_flops(node: Node) -> int:
    """MatMul/Gemm/Conv FLOPs of `node` from declared types (symbolic dims count 1)."""
    from graphopt.ir.ops.costs import conv_cost, matmul_cost

    ins = [v.type if v is not None else None for v in node.inputs]
    outs = [v.type for v in node.outputs]
    conv = node.op_type in ("Conv", "FusedConv")
    cost = conv_cost(node, ins, outs) if conv else matmul_cost(node, ins, outs)
    return int(cost.flops)


def model_flops(graph: Graph) -> int:
    return sum(layer_flops(n) for n in graph if n.op in LAYER_OPS)


def model_params(graph: Graph) -> int:
    return sum(
        int(v.const_value.size)
        for v in graph.initializers.values()
        if v.const_value is not None and np.issubdtype(v.const_value.dtype, np.floating)
    )


def _region_flops(region: Region) -> int:
    return sum(layer_flops(n) for n in {e.node for e in region.consts if e.node.op in LAYER_OPS})


def _region_params(region: Region) -> int:
    seen: dict[int, int] = {}
    for e in region.consts:
        v = e.node.inputs[e.index]
        if v is not None and v.const_value is not None:
            seen[id(v)] = int(v.const_value.size)
    return sum(seen.values())


def _fold_bias(
    graph: Graph, deltas: dict[Node, np.ndarray], output_keep: dict[Node, np.ndarray]
) -> None:
    """Add each refit sink's bias delta to its bias (a new constant, or a new Add after a
    MatMul). Refit solved the uncut layer: when the layer also lost outputs (a Conv that is the
    source of another pruned region), only the kept outputs' deltas are used."""
    for node, delta in deltas.items():
        out = node.outputs[0]
        t = out.type
        assert isinstance(t, TensorType) and t.shape is not None
        if node in output_keep:
            delta = delta[output_keep[node]]
        if not np.any(delta):
            continue
        width = len(delta)
        dtype = node.inputs[1].const_value.dtype  # type: ignore[union-attr]
        hint = node.name or node.op_type.lower()
        if node.op_type in ("Conv", "FusedConv", "Gemm"):
            old = node.inputs[2] if len(node.inputs) > 2 else None
            current = (
                np.zeros(width)
                if old is None or old.const_value is None
                else np.broadcast_to(old.const_value.reshape(-1), (width,))
            )
            new = graph.add_initializer(
                graph.scope.fresh(f"{hint}_refit_bias"), (current + delta).astype(dtype)
            )
            if old is None:
                inputs = list(node.inputs)
                if len(inputs) > 2:
                    inputs[2] = new  # FusedConv with a sum input Z but no bias
                else:
                    inputs.append(new)
                node.set_inputs(inputs)
            else:
                node.set_input(2, new)
                drop_if_unused(graph, old)
            continue
        if _merge_into_bias_add(graph, out, delta, hint):
            continue
        bias = graph.add_initializer(graph.scope.fresh(f"{hint}_refit_bias"), delta.astype(dtype))
        users = out.uses
        add = Node("Add", [out, bias], name=graph.scope.fresh(f"{hint}_refit_add"))
        graph.insert_after(node, add)
        add.output.type = t
        for user, i in users:
            user.set_input(i, add.output)


def _merge_into_bias_add(graph: Graph, out: Value, delta: np.ndarray, hint: str) -> bool:
    """A MatMul whose only reader is `Add(out, b)` with a constant per-column b: b += delta."""
    users = out.uses
    if len(users) != 1 or users[0][0].op != "Add":
        return False
    add, index = users[0]
    other_index = 1 - index
    other = add.inputs[other_index]
    bias = other.const_value if other is not None and other.is_constant else None
    if bias is None or bias.size != len(delta) or bias.shape[-1] != len(delta):
        return False
    new = graph.add_initializer(
        graph.scope.fresh(f"{hint}_refit_bias"),
        (bias + delta.reshape(bias.shape)).astype(bias.dtype),
    )
    add.set_input(other_index, new)
    drop_if_unused(graph, other)  # type: ignore[arg-type]
    return True
