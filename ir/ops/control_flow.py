"""Kernels for control flow: If, Loop, Scan and SequenceMap run their bodies as IR subgraphs.

The bodies are `Graph`s of the IR whose nodes may read values of enclosing graphs, so they must be
run by graphopt's interpreter (through the `Frame` it hands to these kernels), not by ONNX's.
Semantics follow the ONNX operator spec: Loop's optional trip count and condition, loop-carried
values and stacked scan outputs; Scan's per-input axes and directions (and opset 8's batch form).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from graphopt.ir.core import Graph, Node
from graphopt.ir.errors import GraphoptError
from graphopt.ir.registry import Frame, Kernel, KernelEnv, register_kernel
from graphopt.ir.types import TensorType


def _truth(value: Any, node: Node, what: str) -> bool:
    array = np.asarray(value)
    if array.size != 1:
        raise GraphoptError(f"{node.describe()}: {what} must hold one element, got {array.shape}")
    return bool(array.reshape(-1)[0])


@register_kernel("If", needs_frame=True)
def if_kernel(node: Node, env: KernelEnv) -> Kernel:
    then_branch: Graph = node.get_attr("then_branch")
    else_branch: Graph = node.get_attr("else_branch")

    def run(frame: Frame, cond: Any) -> list[Any]:
        branch = then_branch if _truth(cond, node, "the condition") else else_branch
        return frame.run_graph(branch, [])

    return run


def _empty_scan_output(body: Graph, index: int) -> np.ndarray:
    """The value of a scan output after zero iterations: shape [0, *element shape]."""
    t = body.outputs[index].type
    if isinstance(t, TensorType) and t.shape is not None:
        dims = [d if isinstance(d, int) else 0 for d in t.shape]
        return np.zeros((0, *dims), dtype=t.dtype.numpy)
    return np.zeros((0,), dtype=np.float32)


@register_kernel("Loop", needs_frame=True)
def loop_kernel(node: Node, env: KernelEnv) -> Kernel:
    body: Graph = node.get_attr("body")
    carried_count = len(node.inputs) - 2

    def run(frame: Frame, trip_count: Any, cond: Any, *carried: Any) -> list[Any]:
        limit = None if trip_count is None else int(np.asarray(trip_count).reshape(-1)[0])
        going = True if cond is None else _truth(cond, node, "the loop condition")
        state = list(carried)
        scans: list[list[Any]] = []
        i = 0
        while going and (limit is None or i < limit):
            outs = frame.run_graph(body, [np.array(i, np.int64), np.array(going), *state])
            going = _truth(outs[0], node, "the body's condition output")
            state = list(outs[1 : 1 + carried_count])
            extra = outs[1 + carried_count :]
            if not scans:
                scans = [[] for _ in extra]
            for collected, value in zip(scans, extra, strict=True):
                collected.append(value)
            i += 1
        scan_count = len(body.outputs) - 1 - carried_count
        stacked = [
            np.stack(scans[k])
            if scans and scans[k]
            else _empty_scan_output(body, 1 + carried_count + k)
            for k in range(scan_count)
        ]
        return [*state, *stacked]

    return run


def _normalized(axes: Sequence[int], ranks: Sequence[int]) -> list[int]:
    return [a + r if a < 0 else a for a, r in zip(axes, ranks, strict=True)]


@register_kernel("Scan", needs_frame=True)
def scan_kernel(node: Node, env: KernelEnv) -> Kernel:
    body: Graph = node.get_attr("body")
    scan_inputs = int(node.get_attr("num_scan_inputs"))
    if env.opset("") < 9:
        return _scan8(node, body, scan_inputs)
    state_count = len(node.inputs) - scan_inputs
    in_axes = list(node.get_attr("scan_input_axes", [0] * scan_inputs))
    in_dirs = list(node.get_attr("scan_input_directions", [0] * scan_inputs))
    out_count = len(node.outputs) - state_count
    out_axes = list(node.get_attr("scan_output_axes", [0] * out_count))
    out_dirs = list(node.get_attr("scan_output_directions", [0] * out_count))

    def run(frame: Frame, *args: Any) -> list[Any]:
        state, xs = list(args[:state_count]), [np.asarray(x) for x in args[state_count:]]
        axes = _normalized(in_axes, [x.ndim for x in xs])
        steps = xs[0].shape[axes[0]] if xs else 0
        collected: list[list[Any]] = [[] for _ in range(out_count)]
        for t in range(steps):
            slices = [
                np.take(x, steps - 1 - t if d else t, axis=a)
                for x, a, d in zip(xs, axes, in_dirs, strict=True)
            ]
            outs = frame.run_graph(body, [*state, *slices])
            state = list(outs[:state_count])
            for k, value in enumerate(outs[state_count:]):
                collected[k].append(value)
        results = []
        for k in range(out_count):
            items = collected[k][::-1] if out_dirs[k] else collected[k]
            stacked = np.stack(items) if items else _empty_scan_output(body, state_count + k)
            axis = out_axes[k] + stacked.ndim if out_axes[k] < 0 else out_axes[k]
            results.append(np.moveaxis(stacked, 0, axis))
        return [*state, *results]

    return run


def _scan8(node: Node, body: Graph, scan_inputs: int) -> Kernel:
    """Opset 8 Scan: a leading batch axis on every input and output, scanning axis 1."""
    state_count = len(node.inputs) - 1 - scan_inputs
    directions = list(node.get_attr("directions", [0] * scan_inputs))

    def run(frame: Frame, sequence_lens: Any, *args: Any) -> list[Any]:
        states = [np.asarray(s) for s in args[:state_count]]
        xs = [np.asarray(x) for x in args[state_count:]]
        batch = xs[0].shape[0] if xs else states[0].shape[0]
        per_batch: list[list[Any]] = []
        for b in range(batch):
            steps = xs[0].shape[1]
            if sequence_lens is not None:
                steps = int(np.asarray(sequence_lens).reshape(-1)[b])
            state = [s[b] for s in states]
            collected: list[list[Any]] = []
            for t in range(steps):
                slices = [
                    x[b, steps - 1 - t if d else t] for x, d in zip(xs, directions, strict=True)
                ]
                outs = frame.run_graph(body, [*state, *slices])
                state = list(outs[:state_count])
                if not collected:
                    collected = [[] for _ in outs[state_count:]]
                for k, value in enumerate(outs[state_count:]):
                    collected[k].append(value)
            per_batch.append([*state, *(np.stack(c) for c in collected)])
        return [np.stack([r[i] for r in per_batch]) for i in range(len(node.outputs))]

    return run


@register_kernel("SequenceMap", needs_frame=True)
def sequence_map_kernel(node: Node, env: KernelEnv) -> Kernel:
    body: Graph = node.get_attr("body")

    def run(frame: Frame, sequence: list[Any], *extra: Any) -> list[Any]:
        results: list[list[Any]] = [[] for _ in node.outputs]
        for i, item in enumerate(sequence):
            args = [item, *(e[i] if isinstance(e, list) else e for e in extra)]
            for collected, value in zip(results, frame.run_graph(body, args), strict=True):
                collected.append(value)
        return results

    return run
