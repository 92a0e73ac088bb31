"""The `graphopt` command line: `optimize`, `show`, `run`, `distill` and `passes`.

Errors a user can cause (bad files, bad graphs, bad options) print one message on stderr and exit
with status 2; no traceback, no partial output file. `tools/optimize.py` is `graphopt optimize`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from graphopt.ir.errors import GraphoptError

if TYPE_CHECKING:
    from graphopt.ir.core import Model

EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except GraphoptError as error:
        _stderr(f"error: {error}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        _stderr("interrupted")
        return 130


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="graphopt", description="A compiler-style graph optimizer for neural networks."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    opt = commands.add_parser("optimize", help="optimize an ONNX model and write the result")
    add_optimize_arguments(opt)

    show = commands.add_parser("show", help="print a model as IR text")
    show.add_argument("model", help="an .onnx file")
    show.add_argument("--full", action="store_true", help="print large constants in full (base64)")
    show.set_defaults(func=_cmd_show)

    run = commands.add_parser("run", help="run a model and print its outputs' shapes and stats")
    run.add_argument("model", help="an .onnx file, or a .so written by --target tvm:...")
    run.add_argument(
        "--backend",
        default="reference",
        help="a backend from `graphopt backends` (default reference)",
    )
    run.add_argument("--inputs", help=".npz file with one array per input name")
    run.add_argument("--outputs", help="write the outputs to this .npz file")
    run.add_argument("--seed", type=int, default=0, help="seed for random inputs (default 0)")
    run.add_argument(
        "--dim", action="append", default=[], metavar="NAME=N", help="value of a symbolic dim"
    )
    run.set_defaults(func=_cmd_run)

    distill = commands.add_parser(
        "distill", help="train a student model's weights to match a teacher's outputs"
    )
    add_distill_arguments(distill)

    passes = commands.add_parser("passes", help="list the registered passes and presets")
    passes.set_defaults(func=_cmd_passes)

    backends = commands.add_parser("backends", help="list the backends and whether they run here")
    backends.set_defaults(func=_cmd_backends)
    return parser


def add_optimize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", help="the input .onnx file, or a .pt2 file written by torch.export.save"
    )
    parser.add_argument("-o", "--output", required=True, help="where to write the optimized model")
    parser.add_argument(
        "--passes",
        default="O1",
        help="pipeline string or preset, e.g. 'O1,fold-constants{max-elements=4096}'",
    )
    parser.add_argument(
        "--target",
        default="onnx",
        help="onnx (default), onnxruntime, openvino (writes OpenVINO IR .xml/.bin) or auto (the "
        "fastest backend that computes the reference's outputs; writes its artifact), or "
        "tvm:llvm[:native], tvm:aarch64, tvm:cuda[:sm_80] (writes a compiled .so and its .json)",
    )
    parser.add_argument(
        "--external-data", action="store_true", help="write weights to <output>.data"
    )
    parser.add_argument(
        "--verify-each", action="store_true", help="run the verifier after every pass"
    )
    parser.add_argument(
        "--check-each",
        action="store_true",
        help="run the reference interpreter on random inputs around every pass; stop at the first "
        "pass that changes the outputs",
    )
    parser.add_argument(
        "--dim",
        action="append",
        default=[],
        metavar="NAME=N",
        help="symbolic dim size for --check-each",
    )
    parser.add_argument(
        "--dump-ir",
        action="append",
        default=[],
        metavar="WHEN:PASS",
        help="print the IR before/after a pass: before:fold-constants, after:all (repeatable)",
    )
    parser.add_argument("--dump-dir", help="write --dump-ir files here instead of printing")
    parser.add_argument("--report", metavar="FILE", help="write a JSON report of every pass here")
    parser.add_argument("-q", "--quiet", action="store_true", help="print no summary table")
    parser.add_argument(
        "--inputs", help="--target auto: .npz inputs to check and time on (default random, --dim)"
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="--target auto/openvino: threads (default 2)"
    )
    parser.add_argument(
        "--tune", type=int, default=0, metavar="N",
        help="--target tvm:... or auto: MetaSchedule trials (database in <output stem>.tuning/)",
    )  # fmt: skip
    parser.add_argument(
        "--fallback", nargs="?", const="onnxruntime", choices=["onnxruntime", "reference"],
        help="--target tvm:...: run nodes TVM cannot lower on ONNX Runtime (or reference)",
    )  # fmt: skip
    parser.add_argument(
        "--calibration", metavar="FILE.npz|random:N",
        help="calibration data for quantize-static and activation-aware pruning "
        "(scores=activation): an .npz with one array per input name, "
        "samples on axis 0, or random:N for N seeded random samples (quick runs only)",
    )  # fmt: skip
    parser.add_argument(
        "--max-accuracy-drop", metavar="X",
        help="quantize-static/-dynamic/-weights: keep the layers that hurt most in float until "
        "1 - cosine similarity of the outputs vs the float model, worst over outputs and "
        "calibration samples, is at most X (0 <= X < 1; needs --calibration)",
    )  # fmt: skip
    parser.set_defaults(func=_cmd_optimize)


def add_distill_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="the student .onnx (e.g. a pruned or quantized model)")
    parser.add_argument("--teacher", required=True, help="the teacher .onnx")
    parser.add_argument("-o", "--output", required=True, help="where to write the student")
    parser.add_argument(
        "--calibration", default="random:64", metavar="FILE.npz|random:N",
        help="training inputs: an .npz with one array per input name, samples on axis 0, or "
        "random:N seeded random samples (token ids over the embedding; default random:64)",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    parser.add_argument("--loss", choices=["mse", "kl"], default="mse", help="default mse")
    parser.add_argument("--temperature", type=float, default=1.0, help="for --loss kl")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    parser.add_argument("--outputs", help="comma-separated outputs to match (default all float)")
    parser.add_argument(
        "--holdout", type=float, default=0.25, help="fraction of samples held out (0.25)"
    )
    parser.add_argument("--device", default="cpu", help="torch device: cpu (default) or cuda")
    parser.add_argument(
        "--teacher-backend", default="onnxruntime", help="backend running the teacher"
    )
    parser.add_argument(
        "--dim", action="append", default=[], metavar="NAME=N",
        help="symbolic dim size for random samples (default 8)",
    )  # fmt: skip
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_cmd_distill)


def _cmd_distill(args: argparse.Namespace) -> int:
    import graphopt
    from graphopt.api.distillation import distill_model

    holdout: float | int = int(args.holdout) if args.holdout >= 1 else args.holdout
    result = distill_model(
        args.model, args.teacher, args.calibration, steps=args.steps, loss=args.loss,
        temperature=args.temperature, lr=args.lr, holdout=holdout, device=args.device,
        outputs=args.outputs.split(",") if args.outputs else None,
        teacher_backend=args.teacher_backend, dims=_parse_dims(args.dim),
        progress=not args.quiet,
    )  # fmt: skip
    graphopt.save(result.model, args.output)
    _console().print(f"{args.model} -> {args.output}: {result.report.summary()}", markup=False)
    return 0


def _parse_dumps(items: Sequence[str]) -> tuple[list[str], list[str]]:
    before: list[str] = []
    after: list[str] = []
    for item in items:
        when, sep, names = item.partition(":")
        if not sep or when not in ("before", "after", "both") or not names:
            raise GraphoptError(
                f"bad --dump-ir '{item}'", hint="write WHEN:PASS[,PASS], WHEN before, after or both"
            )
        for name in names.split(","):
            if when in ("before", "both"):
                before.append(name)
            if when in ("after", "both"):
                after.append(name)
    return before, after


def _cmd_optimize(args: argparse.Namespace) -> int:
    import graphopt
    from graphopt.passes import optimize_model

    start = time.perf_counter()
    if args.tune and not (args.target == "auto" or args.target.startswith("tvm:")):
        raise GraphoptError(
            f"--tune applies to TVM, not to --target {args.target}",
            hint="use --target tvm:llvm (or auto, which tunes its TVM candidate) or drop --tune",
        )
    model = graphopt.load(args.model)
    before, after = _parse_dumps(args.dump_ir)
    compiled = args.target in ("auto", "openvino") or args.target.startswith("tvm:")
    # passes see target onnx; a backend compiles
    result = optimize_model(
        model, args.passes, target="onnx" if compiled else args.target,
        verify_each=args.verify_each, check_each=args.check_each, check_dims=_parse_dims(args.dim),
        dump_before=before, dump_after=after, dump_folder=args.dump_dir,
        calibration=_calibration(args, model), options=_run_options(args),
    )  # fmt: skip
    output = args.output
    if compiled:
        output = _compile_for_target(args, result.model)
    else:
        graphopt.save(result.model, args.output, external_data=args.external_data or None)
    if args.report:
        result.write_json(args.report)
    console = _console()
    if not args.quiet:
        console.print(result.table())
        for table in result.artifact_tables():  # e.g. the per-layer quantization report
            console.print(table)
        refused = [n for n in result.notes if n.kind != "info"]
        for note in refused[:20]:
            console.print(
                f"  {note.pass_name}: {note.kind} at {note.node}: {note.message}", markup=False
            )
        if len(refused) > 20:
            console.print(f"  ... {len(refused) - 20} more notes (--report FILE has them all)")
    console.print(
        f"[bold]{args.model}[/] -> [bold]{output}[/]: {result.nodes_before} -> "
        f"{result.nodes_after} nodes (passes: {args.passes}) in {time.perf_counter() - start:.2f} s"
    )
    return 0


def _run_options(args: argparse.Namespace) -> dict[str, object]:
    """Options of the run that passes read from `context.options`."""
    from graphopt.passes.quantization.mixed_precision import OPTION, check_budget

    options: dict[str, object] = {}
    if args.max_accuracy_drop is not None:
        options[OPTION] = check_budget(args.max_accuracy_drop, "--max-accuracy-drop")
    return options


def _calibration(args: argparse.Namespace, model: Model) -> object:
    """--calibration: samples from an .npz file, or random:N seeded random ones (labelled)."""
    from graphopt.passes.quantization.calibration import from_npz, random_feeds

    if not args.calibration:
        return None
    kind, sep, count = args.calibration.partition(":")
    if kind == "random" and sep:
        if not count.isdigit() or int(count) < 1:
            raise GraphoptError(
                f"bad --calibration '{args.calibration}'", hint="write random:N with N >= 1"
            )
        return random_feeds(model, int(count), seed=0, dims=_parse_dims(args.dim))
    return from_npz(args.calibration, model)


def _compile_for_target(args: argparse.Namespace, model: Model) -> str:
    """--target openvino|auto: compile with the backend (auto: the fastest correct one, see
    graphopt.backends.auto), write its artifact and return its path (-o's extension may change)."""
    if args.target.startswith("tvm:"):  # --dim binds symbolic dims (tuning binds the rest to 1)
        from graphopt.backends.tvm import compile_to_file

        return compile_to_file(
            model, args.target, args.output, tune=args.tune, fallback=args.fallback,
            dims=_parse_dims(args.dim), say=lambda text: _console().print(text, markup=False),
        )[0]  # fmt: skip
    from graphopt.api.feeds import load_feeds, random_feeds
    from graphopt.backends.auto import compile_and_save, feed_dims

    feeds = None
    options: dict[str, dict[str, object]] = {}
    if args.target == "auto":
        feeds = (
            load_feeds(args.inputs, model)
            if args.inputs
            else random_feeds(model, seed=0, dims=_parse_dims(args.dim))
        )
        if args.tune:  # tuned TVM is compiled for the shapes of the inputs it is timed on
            tuning_dir = os.path.splitext(args.output)[0] + ".tuning"
            dims = feed_dims(model, feeds)
            options["tvm"] = {"tune": args.tune, "tuning_dir": tuning_dir, "dims": dims}
    console = _console()
    written, selection = compile_and_save(
        model, args.target, args.output, feeds=feeds, threads=args.threads,
        external_data=args.external_data or None, compile_options=options,
    )  # fmt: skip
    name = args.target
    if selection is not None and selection.winner is not None:
        if not args.quiet:
            console.print(selection.table())
        name = selection.winner.backend
        console.print(f"auto: chose [bold]{name}[/] (fastest correct backend)")
    if written[0] != args.output:
        console.print(f"{name}: wrote {', '.join(written)} (not {args.output})", markup=False)
    return written[0]


def _cmd_show(args: argparse.Namespace) -> int:
    import graphopt
    from graphopt.ir.printer import print_model

    text = print_model(graphopt.load(args.model), elide_large=not args.full)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    import graphopt
    from graphopt.api.feeds import load_feeds, random_feeds
    from graphopt.backends.tvm import is_library, library_signature

    library = is_library(args.model)  # a .so from --target tvm:...: its JSON gives the inputs
    model = library_signature(args.model) if library else graphopt.load(args.model)
    if args.inputs:
        feeds = load_feeds(args.inputs, model)
        source = args.inputs
    else:
        feeds = random_feeds(model, seed=args.seed, dims=_parse_dims(args.dim))
        source = f"random inputs, seed {args.seed}"
    start = time.perf_counter()
    outputs = graphopt.run(args.model if library else model, feeds, backend=args.backend)
    elapsed = time.perf_counter() - start
    backend = "tvm" if library else args.backend
    _print_outputs(outputs, f"{args.model} on {backend} ({source}) in {elapsed * 1e3:.1f} ms")
    if args.outputs:
        _save_npz_atomically(args.outputs, outputs)
    return 0


def _cmd_passes(args: argparse.Namespace) -> int:
    from rich.table import Table

    from graphopt.passes import all_passes
    from graphopt.passes.pipeline import PRESETS, _option_fields, _type_name

    table = Table(title="passes", title_justify="left")
    for column in ("name", "what it does", "options"):
        table.add_column(column)
    for name, info in all_passes().items():
        fields = _option_fields(info.cls)
        options = " ".join(f"{k}={d!r}:{_type_name(t)}" for k, (_, t, d) in fields.items())
        table.add_row(name, info.description, options)
    console = _console()
    console.print(table)
    for name, members in PRESETS.items():
        console.print(f"{name}: {', '.join(members) if members else '(nothing)'}")
    return 0


def _cmd_backends(args: argparse.Namespace) -> int:
    from rich.table import Table

    from graphopt.backends.base import all_backends

    table = Table(title="backends", title_justify="left")
    for column in ("name", "available here", "what it is", "from"):
        table.add_column(column)
    for name, info in sorted(all_backends().items()):
        try:
            backend = info.load()()
            reason = backend.unavailable()
            description = backend.description
        except ImportError as error:
            reason, description = f"cannot load: {error}", ""
        table.add_row(name, "yes" if reason is None else f"no: {reason}", description, info.origin)
    _console().print(table)
    return 0


def _parse_dims(items: Sequence[str]) -> dict[str, int]:
    dims: dict[str, int] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not value.isdigit():
            raise GraphoptError(f"bad --dim '{item}'", hint="write NAME=N, e.g. --dim batch=2")
        dims[name] = int(value)
    return dims


def _print_outputs(outputs: dict[str, np.ndarray], title: str) -> None:
    from rich.table import Table

    table = Table(title=title)
    for column in ("output", "dtype", "shape", "min", "max", "mean", "nan"):
        table.add_column(column)
    for name, array in outputs.items():
        array = np.asarray(array)
        numeric = array.dtype.kind in "biuf" and array.size > 0
        stats = (
            [f"{array.min():.4g}", f"{array.max():.4g}", f"{array.astype(np.float64).mean():.4g}"]
            if numeric
            else ["-", "-", "-"]
        )
        nans = str(int(np.isnan(array).sum())) if array.dtype.kind == "f" else "-"
        table.add_row(name, str(array.dtype), str(list(array.shape)), *stats, nans)
    _console().print(table)


def _save_npz_atomically(path: str, arrays: dict[str, np.ndarray]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    temp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}.npz")
    try:
        np.savez(temp, **arrays)  # type: ignore[arg-type]  # numpy's stub misreads **kwds
        os.replace(temp, path)
    except OSError as error:
        if os.path.exists(temp):
            os.unlink(temp)
        raise GraphoptError(f"cannot write outputs: {error.strerror}", where=path) from None


def _console():  # type: ignore[no-untyped-def]
    from rich.console import Console

    return Console(highlight=False)


def _stderr(text: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False).print(text, markup=False)


if __name__ == "__main__":
    raise SystemExit(main())
