"""The model zoo: small real networks exported to ONNX, for tests and benchmarks.

Four families, each at two sizes ("tiny" for tests, under 1 MB and a few seconds to export;
"base" for benchmarks), built from local configs with random seeded weights (nothing downloaded)
and exported with either of torch's ONNX exporters ("dynamo", the default, or "torchscript"):

| name | model | graph inputs |
| --- | --- | --- |
| gpt2 | transformers.GPT2LMHeadModel (tiny: 2 layers, hidden 64, 4 heads, vocab 256) | input_ids, attention_mask |
| bert | transformers.BertModel (tiny: 2 layers, hidden 64, 4 heads, intermediate 128) | input_ids, attention_mask |
| llama | transformers.LlamaForCausalLM (tiny: 2 layers, hidden 64, 4 heads, 2 kv heads) | input_ids, attention_mask |
| resnet | plain torch.nn ResNet (tiny: 2 stages, 8/16 channels, 32x32; base: ResNet-18) | pixel_values |

    from models import build, sample_inputs, torch_outputs, torch_reference
    path = build("llama", folder, size="tiny", exporter="dynamo")      # cached by content key
    feeds = sample_inputs("llama")                                     # numpy, int64 ids
    expected = torch_outputs("llama", feeds)                           # the torch module's own
    feeds, expected = torch_reference(path)       # the same, saved by `build`: no torch needed

Dynamic dims are named `batch` and `sequence`. `build(..., optimize=False)` gives the raw export
(no onnxscript optimizer / constant folding: BatchNorm stays), the input of clean-up passes. The
folder defaults to the test cache (`default_cache_dir()`). In pytest use the `zoo_model` fixture
(`models.fixtures`). From the command line: `python bench/models.py gpt2 --size base --out DIR`.
Importing this package imports numpy only; torch is imported when a model is actually built.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .specs import EXPORTERS, MODELS, SIZES, InputSpec, ModelSpec, OutputSpec, get_spec
from .zoo import (
    UnsupportedExport,
    build,
    cache_key,
    cached_path,
    default_cache_dir,
    reference_path,
    sample_inputs,
    torch_module,
    torch_outputs,
    torch_reference,
)

__all__ = [
    "EXPORTERS", "MODELS", "SIZES", "InputSpec", "ModelSpec", "OutputSpec", "UnsupportedExport",
    "build", "build_bert", "build_gpt2", "build_llama", "build_resnet", "cache_key",
    "cached_path", "default_cache_dir", "get_spec", "reference_path", "sample_inputs",
    "torch_module", "torch_outputs", "torch_reference",
]  # fmt: skip

PathLike = str | os.PathLike[str]


def build_gpt2(folder: PathLike, size: str = "tiny", exporter: str = "dynamo", **kw: Any) -> Path:
    """GPT-2 (LM head, no KV cache) exported into `folder`; see `build`."""
    return build("gpt2", folder, size, exporter, **kw)


def build_bert(folder: PathLike, size: str = "tiny", exporter: str = "dynamo", **kw: Any) -> Path:
    """BERT encoder with pooler exported into `folder`; see `build`."""
    return build("bert", folder, size, exporter, **kw)


def build_llama(folder: PathLike, size: str = "tiny", exporter: str = "dynamo", **kw: Any) -> Path:
    """LLaMA-style LM (RMSNorm, rotary, GQA, SwiGLU) exported into `folder`; see `build`."""
    return build("llama", folder, size, exporter, **kw)


def build_resnet(folder: PathLike, size: str = "tiny", exporter: str = "dynamo", **kw: Any) -> Path:
    """ResNet-style CNN (ResNet-18 layout at base size) exported into `folder`; see `build`."""
    return build("resnet", folder, size, exporter, **kw)
