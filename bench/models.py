"""Build the zoo's models (tests/models) from the command line, for benchmarks and by hand.

    python bench/models.py gpt2 --size base --out DIR [--exporter torchscript] [--raw]
    python bench/models.py all --size tiny --out DIR --exporter dynamo torchscript

For each model prints its path, then its node count, op histogram, file size and how long the
export took (or "cached": a file with the same content key was already in DIR); `--json` prints
one JSON line per model instead. Other scripts here use the zoo through this module:
`from models import build` (run from bench/, `models` is this file; it forwards to tests/models). Models have random, seeded weights; nothing is downloaded.
Building needs torch and transformers (`pip install 'graphopt[torch]'`); `--out` defaults to
`$GRAPHOPT_MODEL_CACHE` or `~/.cache/graphopt-models`, the cache the tests use.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

_ZOO = Path(__file__).resolve().parent.parent / "tests" / "models"
_ALIAS = "graphopt_model_zoo"


def zoo() -> Any:
    """The `tests/models` package, imported by path under another name: both it and this file
    are `models` on their own sys.path (tests/ for pytest, bench/ for the scripts here)."""
    module = sys.modules.get(_ALIAS)
    if module is None:
        spec = importlib.util.spec_from_file_location(
            _ALIAS, _ZOO / "__init__.py", submodule_search_locations=[str(_ZOO)]
        )
        assert spec is not None and spec.loader is not None, f"no model zoo at {_ZOO}"
        module = importlib.util.module_from_spec(spec)
        sys.modules[_ALIAS] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[_ALIAS]
            raise
    return module


def __getattr__(name: str) -> Any:
    """The zoo's API through this module, so that scripts in bench/ can `from models import
    build` (or `build_gpt2`, `sample_inputs`, ...) exactly as the tests do."""
    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(zoo(), name)


def describe(path: Path) -> dict[str, Any]:
    """Node count, op histogram (most frequent first), initializer count and size of a model."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops = Counter(node.op_type for node in model.graph.node)
    return {
        "nodes": len(model.graph.node),
        "initializers": len(model.graph.initializer),
        "mb": round(os.path.getsize(path) / 2**20, 3),
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
        "inputs": [i.name for i in model.graph.input],
        "ops": dict(ops.most_common()),
    }


def main(argv: list[str] | None = None) -> int:
    models = zoo()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+", choices=[*models.MODELS, "all"], metavar="MODEL",
                        help=f"one or more of {', '.join(models.MODELS)}, or all")  # fmt: skip
    parser.add_argument("--size", choices=models.SIZES, default="tiny")
    parser.add_argument("--exporter", nargs="+", choices=models.EXPORTERS, default=["dynamo"])
    parser.add_argument("--out", type=Path, default=None, help="folder (default: the test cache)")
    parser.add_argument(
        "--opset", type=int, default=None, help="default: 18 dynamo, 17 torchscript"
    )
    parser.add_argument("--raw", action="store_true", help="skip the exporter's own optimizer")
    parser.add_argument("--no-mask", action="store_true", help="decoder LMs without attention_mask")
    parser.add_argument("--json", action="store_true", help="one JSON line per model")
    args = parser.parse_args(argv)

    out = args.out or models.default_cache_dir()
    names = list(models.MODELS) if "all" in args.names else args.names
    failed = 0
    for name in names:
        options: dict[str, Any] = {"opset": args.opset, "optimize": not args.raw}
        if args.no_mask and "attention_mask" in models.MODELS[name].options:
            options["attention_mask"] = False
        for exporter in args.exporter:
            cached = models.cached_path(name, out, args.size, exporter, **options).exists()
            start = time.perf_counter()
            try:
                path = models.build(name, out, args.size, exporter, **options)
            except models.UnsupportedExport as error:
                print(f"{name} ({exporter}): {error}", file=sys.stderr)
                failed += 1
                continue
            seconds = None if cached else round(time.perf_counter() - start, 2)
            facts = {"model": name, "size": args.size, "exporter": exporter, "path": str(path),
                     "export_s": seconds, **describe(path)}  # fmt: skip
            if args.json:
                print(json.dumps(facts))
                continue
            top = ", ".join(f"{op} {count}" for op, count in list(facts["ops"].items())[:8])
            took = "cached" if seconds is None else f"exported in {seconds:.1f} s"
            print(path)
            print(f"  {name} {args.size} {exporter}: {facts['nodes']} nodes ({top}),"
                  f" {facts['mb']} MB, opset {facts['opset']}, {took}")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
