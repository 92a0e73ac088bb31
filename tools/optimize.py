"""`python tools/optimize.py model.onnx -o out.onnx [--passes O1]`: the same as `graphopt optimize`."""

from __future__ import annotations

import sys

from graphopt.api.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["optimize", *sys.argv[1:]]))
