"""The `graphopt` command line: `optimize`, `show`, `run` and `passes`.

Errors a user can cause (bad files, bad graphs, bad options) print one message on stderr and exit
with status 2; no traceback, no partial output file. `tools/optimize.py` is `graphopt optimize`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

import numpy as np

from graphopt.ir.errors import GraphoptError

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
    run.add_argument("model", help="an .onnx file")
    run.add_argument("--backend", default="reference", help="reference (default) or onnxruntime")
    run.add_argument("--inputs", help=".npz file with one array per input name")
    run.add_argument("--outputs", help="write the outputs to this .npz file")
    run.add_argument("--seed", type=int, default=0, help="seed for random inputs (default 0)")
    run.add_argument(
        "--dim", action="append", default=[], metavar="NAME=N", help="value of a symbolic dim"
    )
    run.set_defaults(func=_cmd_run)

    passes = commands.add_parser("passes", help="list the registered passes and presets")
    passes.set_defaults(func=_cmd_passes)
    return parser


def add_optimize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="the input .onnx file")
    parser.add_argument("-o", "--output", required=True, help="where to write the optimized model")
    parser.add_argument("--passes", default="O1", help="pipeline string or preset (default O1)")
    parser.add_argument(
        "--external-data", action="store_true", help="write weights to <output>.data"
    )
    parser.set_defaults(func=_cmd_optimize)


def _cmd_optimize(args: argparse.Namespace) -> int:
    import graphopt

    start = time.perf_counter()
    model = graphopt.load(args.model)
    before = sum(1 for _ in model.graph.all_nodes())
    model = graphopt.optimize(model, args.passes)
    after = sum(1 for _ in model.graph.all_nodes())
    graphopt.save(model, args.output, external_data=args.external_data or None)
    elapsed = time.perf_counter() - start
    _console().print(
        f"[bold]{args.model}[/] -> [bold]{args.output}[/]: {before} -> {after} nodes "
        f"(passes: {args.passes}) in {elapsed:.2f} s"
    )
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    import graphopt
    from graphopt.ir.printer import print_model

    text = print_model(graphopt.load(args.model), elide_large=not args.full)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    import graphopt
    from graphopt.api.feeds import load_feeds, random_feeds

    model = graphopt.load(args.model)
    if args.inputs:
        feeds = load_feeds(args.inputs, model)
        source = args.inputs
    else:
        feeds = random_feeds(model, seed=args.seed, dims=_parse_dims(args.dim))
        source = f"random inputs, seed {args.seed}"
    start = time.perf_counter()
    outputs = graphopt.run(model, feeds, backend=args.backend)
    elapsed = time.perf_counter() - start
    _print_outputs(outputs, f"{args.model} on {args.backend} ({source}) in {elapsed * 1e3:.1f} ms")
    if args.outputs:
        _save_npz_atomically(args.outputs, outputs)
    return 0


def _cmd_passes(args: argparse.Namespace) -> int:
    from graphopt.passes.pipeline import PRESETS

    console = _console()
    for name, members in PRESETS.items():
        console.print(f"{name}: {', '.join(members) if members else '(no passes yet)'}")
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
