"""Conformance of graphopt's ONNX import/export, reference interpreter and text form.

Runs the node test cases the `onnx` package generates and the light models it ships through:
  (a) round trip: ONNX -> IR -> ONNX, run by ONNX Runtime, compared with the expected outputs;
  (b) the reference interpreter on the imported IR, compared with the expected outputs;
  (c) the text form: print -> parse -> print must give identical text.
Cases that ONNX Runtime itself fails on the original model are counted apart: (a) and (b) rates are
over the cases ORT passes, as the foundation issue defines them.

    python tools/conformance.py                 # everything, summary + failures by op
    python tools/conformance.py --only light    # the 9 light models
    python tools/conformance.py -k gather --json report.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

CASE_TIMEOUT_S = 120


@dataclass
class Case:
    name: str
    kind: str  # "node" or "light"
    model: onnx.ModelProto
    inputs: list[Any]
    outputs: list[Any]
    rtol: float
    atol: float

    @property
    def op(self) -> str:
        ops = [n.op_type for n in self.model.graph.node if n.op_type != "Constant"]
        return (
            ops[0] if len(ops) == 1 else (self.kind if self.kind == "light" else "+".join(ops[:2]))
        )

    @property
    def tensors_only(self) -> bool:
        return all(isinstance(a, np.ndarray) for a in [*self.inputs, *self.outputs])


@dataclass
class Result:
    name: str
    op: str
    kind: str
    tensors_only: bool
    ort_original: bool = False
    roundtrip: bool = False
    interpreter: bool = False
    text: bool | None = None  # None: the model did not import
    errors: dict[str, str] = field(default_factory=dict)


def node_cases() -> Iterator[Case]:
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases(None)
    for case in cases:
        for inputs, outputs in case.data_sets or []:
            yield Case(
                case.name, "node", case.model, list(inputs), list(outputs), case.rtol, case.atol
            )
            break


def light_cases() -> Iterator[Case]:
    from onnx import numpy_helper

    folder = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
    tolerances = {"densenet121": 2e-3}
    for file in sorted(os.listdir(folder)):
        if not file.endswith(".onnx"):
            continue
        stem = file[: -len(".onnx")]
        model = onnx.load(os.path.join(folder, file))
        initializers = {t.name for t in model.graph.initializer}
        inputs = []
        for info in model.graph.input:
            if info.name in initializers:
                continue
            shape = tuple(
                d.dim_value if d.HasField("dim_value") else 1
                for d in info.type.tensor_type.shape.dim
            )
            n = int(np.prod(shape))
            inputs.append((np.arange(n).reshape(shape) / n).astype(np.float32))
        expected = onnx.load_tensor(os.path.join(folder, f"{stem}_output_0.pb"))
        name = stem.removeprefix("light_")
        yield Case(name, "light", model, inputs, [numpy_helper.to_array(expected)],
                   tolerances.get(name, 1e-3), 1e-7)  # fmt: skip


def feed_dict(model: onnx.ModelProto, inputs: list[Any]) -> dict[str, Any]:
    initializers = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initializers]
    return dict(zip(names, inputs, strict=False))


def outputs_match(expected: list[Any], actual: list[Any], rtol: float, atol: float) -> str | None:
    """None when equal within tolerance, else a short reason."""
    if len(expected) != len(actual):
        return f"{len(actual)} outputs, expected {len(expected)}"
    for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
        reason = _value_mismatch(e, a, rtol, atol)
        if reason:
            return f"output {i}: {reason}"
    return None


def _value_mismatch(e: Any, a: Any, rtol: float, atol: float) -> str | None:
    if e is None or a is None:
        return None if e is None and a is None else "optional presence differs"
    if isinstance(e, list):
        if not isinstance(a, list) or len(a) != len(e):
            return "sequence length differs"
        for x, y in zip(e, a, strict=True):
            reason = _value_mismatch(x, y, rtol, atol)
            if reason:
                return reason
        return None
    e, a = np.asarray(e), np.asarray(a)
    if e.shape != a.shape:
        return f"shape {a.shape}, expected {e.shape}"
    if e.dtype.kind in "OUS" or a.dtype.kind in "OUS":
        return None if e.tolist() == a.tolist() else "strings differ"
    if e.dtype != a.dtype and not (e.dtype.kind == a.dtype.kind == "f"):
        return f"dtype {a.dtype}, expected {e.dtype}"
    try:
        np.testing.assert_allclose(
            a.astype(np.float64), e.astype(np.float64), rtol=rtol, atol=atol, equal_nan=True
        )
    except AssertionError:
        diff = np.nanmax(np.abs(a.astype(np.float64) - e.astype(np.float64))) if e.size else 0
        return f"values differ (max abs diff {diff:.3g})"
    except (TypeError, ValueError):
        return None if np.array_equal(e.view(np.uint8), a.view(np.uint8)) else "values differ"
    return None


def _ort_run(model: onnx.ModelProto, inputs: list[Any]) -> list[Any]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feed_dict(model, inputs))


class _Timeout(Exception):
    pass


def _with_timeout(seconds: int, fn: Callable[[], Any]) -> Any:
    def on_alarm(signum: int, frame: Any) -> None:
        raise _Timeout(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        return fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def check_case(case: Case) -> Result:
    from graphopt.backends.onnx import to_onnx
    from graphopt.backends.reference import Interpreter
    from graphopt.frontends.onnx import from_onnx
    from graphopt.ir.parser import parse_model
    from graphopt.ir.printer import print_model

    result = Result(case.name, case.op, case.kind, case.tensors_only)
    try:
        reason = outputs_match(
            case.outputs, _ort_run(case.model, case.inputs), case.rtol, case.atol
        )
        result.ort_original = reason is None
        if reason:
            result.errors["ort"] = reason
    except Exception as error:  # ORT rejects the original: counted apart
        result.errors["ort"] = _short(error)
    try:
        ir_model = from_onnx(case.model)
    except Exception as error:
        result.errors["import"] = _short(error)
        return result
    try:
        exported = to_onnx(ir_model)
        reason = outputs_match(case.outputs, _ort_run(exported, case.inputs), case.rtol, case.atol)
        result.roundtrip = reason is None
        if reason:
            result.errors["roundtrip"] = reason
    except Exception as error:
        result.errors["roundtrip"] = _short(error)
    try:
        interpreter = Interpreter(ir_model)
        feeds = feed_dict(case.model, case.inputs)
        produced = _with_timeout(CASE_TIMEOUT_S, lambda: interpreter.run(feeds))
        reason = outputs_match(case.outputs, list(produced.values()), case.rtol, case.atol)
        result.interpreter = reason is None
        if reason:
            result.errors["interpreter"] = reason
    except Exception as error:
        result.errors["interpreter"] = _short(error)
    try:
        text = print_model(ir_model)
        result.text = print_model(parse_model(text)) == text
        if not result.text:
            result.errors["text"] = "print -> parse -> print differs"
    except Exception as error:
        result.text = False
        result.errors["text"] = _short(error)
    return result


def _short(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".replace("\n", " ")
    return text[:300]


def summarize(results: list[Result]) -> dict[str, Any]:
    def rate(passed: int, total: int) -> float:
        return round(100.0 * passed / total, 2) if total else 0.0

    summary: dict[str, Any] = {}
    for kind in ("node", "light"):
        group = [r for r in results if r.kind == kind and (kind == "light" or r.tensors_only)]
        if not group:
            continue
        ort_ok = [r for r in group if r.ort_original]
        imported = [r for r in group if r.text is not None]
        summary[kind] = {
            "cases": len(group),
            "ort_passes_original": len(ort_ok),
            "ort_fails_original": len(group) - len(ort_ok),
            "roundtrip_pass": sum(r.roundtrip for r in ort_ok),
            "roundtrip_rate": rate(sum(r.roundtrip for r in ort_ok), len(ort_ok)),
            "interpreter_pass": sum(r.interpreter for r in ort_ok),
            "interpreter_rate": rate(sum(r.interpreter for r in ort_ok), len(ort_ok)),
            "interpreter_rate_all_cases": rate(sum(r.interpreter for r in group), len(group)),
            "imported": len(imported),
            "text_identical": sum(bool(r.text) for r in imported),
            "text_rate": rate(sum(bool(r.text) for r in imported), len(imported)),
        }
    return summary


def failures_by_op(results: list[Result]) -> dict[str, dict[str, list[str]]]:
    grouped: dict[str, dict[str, list[str]]] = collections.defaultdict(
        lambda: collections.defaultdict(list)
    )
    for r in results:
        if r.kind == "node" and not r.tensors_only:
            continue
        for stage in ("import", "roundtrip", "interpreter", "text"):
            if stage in r.errors and (r.ort_original or stage == "text"):
                grouped[stage][r.op].append(f"{r.name}: {r.errors[stage]}")
    return {stage: dict(ops) for stage, ops in grouped.items()}


def run_cases(cases: list[Case], progress: bool = True) -> list[Result]:
    from rich.progress import Progress

    results = []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("conformance", total=len(cases))
        for case in cases:
            bar.update(task, description=case.name[:40])
            results.append(check_case(case))
            bar.advance(task)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=["node", "light"], help="run one family of cases")
    parser.add_argument("-k", dest="pattern", help="only cases whose name contains this text")
    parser.add_argument("--json", help="write the summary, failures and per-case results here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    warnings.simplefilter("ignore")
    cases: list[Case] = []
    if args.only in (None, "node"):
        cases.extend(node_cases())
    if args.only in (None, "light"):
        cases.extend(light_cases())
    if args.pattern:
        cases = [c for c in cases if args.pattern in c.name]
    start = time.perf_counter()
    results = run_cases(cases, progress=not args.no_progress and sys.stderr.isatty())
    summary = summarize(results)
    failures = failures_by_op(results)
    _print_report(summary, failures, time.perf_counter() - start)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "failures": failures,
                       "results": [asdict(r) for r in results]}, f, indent=1)  # fmt: skip
    return 0


def _print_report(summary: dict[str, Any], failures: dict[str, Any], seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    table = Table(title=f"graphopt conformance ({seconds:.0f} s)")
    for column in (
        "family",
        "cases",
        "ORT fails original",
        "round trip",
        "interpreter",
        "text form",
    ):
        table.add_column(column)
    for kind, s in summary.items():
        table.add_row(
            kind, str(s["cases"]), str(s["ort_fails_original"]),
            f"{s['roundtrip_pass']}/{s['ort_passes_original']} ({s['roundtrip_rate']}%)",
            f"{s['interpreter_pass']}/{s['ort_passes_original']} ({s['interpreter_rate']}%)",
            f"{s['text_identical']}/{s['imported']} ({s['text_rate']}%)",
        )  # fmt: skip
    console.print(table)
    for stage, ops in failures.items():
        console.print(f"[bold]{stage} failures[/] ({sum(len(v) for v in ops.values())}):")
        for op, names in sorted(ops.items()):
            console.print(f"  {op}: {len(names)}", markup=False)
            for line in names[:3]:
                console.print(f"    {line}", markup=False)
    print(json.dumps({"bench": "conformance", **{k: v for k, v in summary.items()}}))


if __name__ == "__main__":
    raise SystemExit(main())
