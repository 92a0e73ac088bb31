"""The pass API: registration, pipeline strings and their errors, analyses, instruments, report."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pytest

import graphopt
from graphopt.api.cli import main
from graphopt.ir import Builder, DType, Graph, Model, TensorType
from graphopt.ir.errors import GraphoptError
from graphopt.passes import (
    Analysis,
    GraphPass,
    ModelPass,
    PassContext,
    PassManager,
    get_pass,
    optimize_model,
    register_pass,
)
from graphopt.passes.instrument import PassCheckError
from graphopt.passes.pipeline import PipelineError, format_pass, parse_pipeline


@register_pass("test-options", "a pass with one option of each kind")
@dataclass
class OptionsPass(ModelPass):
    count: int = 1
    ratio: float = 0.5
    enabled: bool = False
    mode: Literal["fast", "exact"] = "fast"
    axes: tuple[int, ...] = ()
    label: str = ""

    def run(self, model, context):
        return False


@register_pass("test-break-relu", "turns Relu into Neg: a broken pass for check-each")
@dataclass
class BreakRelu(GraphPass):
    def run_on_graph(self, graph, context):
        changed = False
        for node in graph:
            if node.op == "Relu":
                node.op_type = "Neg"
                changed = True
        return changed


def _model() -> Model:
    g = Graph()
    b = Builder(g)
    x = g.add_input("x", TensorType(DType.FLOAT, ("batch", 4)))
    dead = b.Exp(x)
    del dead
    y = b.Relu(b.Add(x, b.const(np.zeros(4, np.float32))))
    y.type = TensorType(DType.FLOAT, ("batch", 4))
    g.set_outputs([y], ["y"])
    return Model(g, {"": 18})


def test_pipeline_options_are_typed():
    (p,) = parse_pipeline(
        "test-options{count=3 ratio=0.25 enabled=true mode=exact axes=0,2 label=hi}"
    )
    assert (p.count, p.ratio, p.enabled, p.mode, p.axes, p.label) == (
        3,
        0.25,
        True,
        "exact",
        (0, 2),
        "hi",
    )
    assert (
        format_pass(p)
        == "test-options{count=3 ratio=0.25 enabled=true mode=exact axes=0,2 label=hi}"
    )


@pytest.mark.parametrize(
    "text,message,caret",
    [
        ("fold-constant,eliminate-dead-code", "unknown pass 'fold-constant'", "^^^^^^^^^^^^^"),
        ("eliminate-dead-code,test-options{cont=2}", "has no option 'cont'", "^^^^"),
        ("test-options{count=two}", "expected an integer", "^^^"),
        ("test-options{mode=slow}", "not one of fast, exact", "^^^^"),
        ("test-options{count=2", "never closed", "^"),
        ("O1;canonicalize", "expected ','", "^"),
        ("O1{x=1}", "takes no options", "^"),
    ],
)
def test_pipeline_errors_point_at_the_mistake(text, message, caret):
    with pytest.raises(PipelineError, match=message) as info:
        parse_pipeline(text)
    shown = str(info.value)
    assert text in shown and caret in shown


def test_unknown_pass_suggests_close_names():
    with pytest.raises(PipelineError) as info:
        parse_pipeline("eliminate-dead-cod")
    assert "did you mean eliminate-dead-code" in str(info.value)


def test_presets_expand():
    assert parse_pipeline("O0") == []
    (fixpoint,) = parse_pipeline("O1")
    assert [p.name for p in fixpoint.passes][:2] == ["freeze-initializers", "infer-shapes"]


def test_names_are_registered_once():
    with pytest.raises(ValueError, match="already registered"):
        register_pass("test-options", "again")(OptionsPass)
    with pytest.raises(ValueError, match="already registered"):

        @register_pass("fold-constants", "a second one")
        def fold(model, context):
            return False


def test_a_function_can_be_a_pass():
    calls = []

    @register_pass("test-function-pass", "records that it ran")
    def record(model, context):
        calls.append(model)
        return False

    model = _model()
    optimize_model(model, "test-function-pass")
    assert calls == [model] and get_pass("test-function-pass").description == "records that it ran"


def test_analyses_are_cached_until_a_pass_changes_the_model():
    computed = []

    class NodeCount(Analysis):
        def compute(self, model):
            computed.append(1)
            return len(model.graph)

    model = _model()
    context = PassContext(model)
    assert context.analysis(NodeCount) == 3 and context.analysis(NodeCount) == 3
    assert len(computed) == 1
    PassManager(parse_pipeline("eliminate-dead-code")).run(model, context)
    assert context.analysis(NodeCount) == 2 and len(computed) == 2


def test_records_count_nodes_and_time():
    result = optimize_model(_model(), "eliminate-dead-code,test-options")
    dce, options = result.records
    assert (dce.nodes_before, dce.nodes_after, dce.changed) == (3, 2, True)
    assert not options.changed and options.seconds >= 0
    assert result.to_json()["passes"][0]["name"] == "eliminate-dead-code"


def test_check_each_names_the_pass_that_changes_outputs():
    with pytest.raises(PassCheckError, match="test-break-relu.*output 'y'"):
        optimize_model(_model(), "eliminate-dead-code,test-break-relu", check_each=True)


def test_a_crashing_pass_is_named_with_what_ran_before():
    @register_pass("test-crash", "raises")
    def crash(model, context):
        raise KeyError("boom")

    with pytest.raises(GraphoptError, match="pass 'test-crash' failed") as info:
        optimize_model(_model(), "eliminate-dead-code,test-crash")
    assert "eliminate-dead-code" in str(info.value)


def test_optimize_api_runs_the_pipeline():
    model = graphopt.optimize(_model(), "eliminate-dead-code")
    assert [n.op for n in model.graph] == ["Add", "Relu"]


def test_command_line_report_and_dump(tmp_path, capsys):
    source = tmp_path / "m.onnx"
    graphopt.save(_model(), source)
    report = tmp_path / "report.json"
    code = main(["optimize", str(source), "-o", str(tmp_path / "o.onnx"), "--passes",
                 "eliminate-dead-code", "--report", str(report), "--dump-ir",
                 "after:eliminate-dead-code", "--verify-each", "--check-each", "--dim", "batch=2"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "IR after eliminate-dead-code" in out and "Exp(" not in out.split("IR after")[1]
    data = json.loads(report.read_text())
    assert data["nodes_before"] == 3 and data["nodes_after"] == 2


@pytest.mark.parametrize(
    "passes,message",
    [("nope", "unknown pass 'nope'"), ("test-options{count=x}", "expected an integer"),
     ("test-options{bogus=1}", "no option 'bogus'")],
)  # fmt: skip
def test_command_line_pipeline_errors_exit_2(tmp_path, capsys, passes, message):
    source = tmp_path / "m.onnx"
    graphopt.save(_model(), source)
    out = tmp_path / "o.onnx"
    assert main(["optimize", str(source), "-o", str(out), "--passes", passes]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not out.exists()


def test_passes_command_lists_passes(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "fold-constants" in out and "O1:" in out


def test_plugin_passes_come_from_entry_points(monkeypatch):
    """A third-party package's entry point in group `graphopt.passes` becomes a pass."""
    import importlib.metadata

    import graphopt.passes.manager as manager

    class FakeEntryPoint:
        name = "test-plugin-pass"
        value = "plugin_module:plugin_pass"
        dist = None

        def load(self):
            def plugin_pass(model, context):
                """Counts nodes (a plugin's pass)."""
                context.note(f"{len(model.graph)} nodes")
                return False

            return plugin_pass

    def entry_points(group=None):
        return [FakeEntryPoint()] if group == "graphopt.passes" else []

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    monkeypatch.setattr(manager, "_LOADED_PLUGINS", False)
    info = manager.all_passes()["test-plugin-pass"]
    assert (
        info.origin.startswith("plugin") and info.description == "Counts nodes (a plugin's pass)."
    )
    result = optimize_model(_model(), "test-plugin-pass")
    assert [n.message for n in result.notes] == ["3 nodes"]
    manager._REGISTRY.pop("test-plugin-pass")
