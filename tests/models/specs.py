"""What each zoo model is, as plain data: sizes, inputs, outputs, and known exporter problems.

Kept free of torch so that cache keys, file names and sample inputs can be computed (and a cached
model used) without importing torch or transformers: a cache hit costs milliseconds, not the two
seconds `import torch` takes.

A model's hyper-parameters are the `sizes` entry for its size plus its build options; the module
named by `builder` (in this package, imported only to build) turns them into a `torch.nn.Module`
whose `forward` takes the inputs below, in order, and returns a tuple of the outputs below.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

SIZES = ("tiny", "base")
EXPORTERS = ("dynamo", "torchscript")
DEFAULT_OPSET = {"dynamo": 18, "torchscript": 17}


@dataclass(frozen=True)
class InputSpec:
    """One graph input. `shape` holds ints, the dynamic dims "batch" / "sequence", and names of
    config entries for static dims that depend on the size ("image");
    `kind` says how sample values are drawn: "ids" (ints in [0, config[high])), "mask" (ones,
    with the tail of the second row padded), "float" (standard normal)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]
    kind: str = "float"
    high: str = ""


@dataclass(frozen=True)
class OutputSpec:
    """One graph output; `dims` names its dynamic axes by position (the rest are static)."""

    name: str
    dims: tuple[str, ...]


@dataclass(frozen=True)
class ModelSpec:
    """A zoo model: `sizes` maps a size to its hyper-parameters; `options` are the build options
    and their defaults (they change the graph, so they are part of the cache key);
    `sequence_limit` names the config entry bounding the sequence dim (position embeddings):
    torch.export rejects an unbounded `Dim` there, and the ONNX exporter would trace twice."""

    name: str
    builder: str
    sizes: Mapping[str, Mapping[str, Any]]
    inputs: tuple[InputSpec, ...]
    outputs: tuple[OutputSpec, ...]
    options: Mapping[str, Any] = field(default_factory=dict)
    sequence_limit: str = ""
    description: str = ""

    def config(self, size: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Hyper-parameters for `size` merged with the options (defaults filled in)."""
        if size not in self.sizes:
            raise ValueError(f"model {self.name!r} has no size {size!r}; sizes: {list(self.sizes)}")
        unknown = set(options or {}) - set(self.options)
        if unknown:
            raise ValueError(
                f"model {self.name!r} has no option {sorted(unknown)}; options: {dict(self.options)}"
            )
        return {**self.sizes[size], **self.options, **(options or {})}

    def torchscript_problem(self, config: Mapping[str, Any]) -> str | None:
        """Why the TorchScript exporter cannot export this model, or None when it can."""
        if "attention_mask" in self.options and not config["attention_mask"]:
            return (
                f"the TorchScript exporter cannot export {self.name} without an attention_mask"
                " input: transformers then checks the position ids for packed sequences with"
                " torch.diff, and aten::diff has no ONNX symbolic. Use exporter='dynamo' or"
                " attention_mask=True."
            )
        return None

    def active_inputs(self, config: Mapping[str, Any]) -> tuple[InputSpec, ...]:
        """The inputs the graph has under `config` (an LM built without a mask takes ids only)."""
        if config.get("attention_mask", True):
            return self.inputs
        return tuple(spec for spec in self.inputs if spec.kind != "mask")


_IDS = InputSpec("input_ids", "int64", ("batch", "sequence"), kind="ids", high="vocab_size")
_MASK = InputSpec("attention_mask", "int64", ("batch", "sequence"), kind="mask")
_LOGITS = OutputSpec("logits", ("batch", "sequence"))

GPT2 = ModelSpec(
    name="gpt2",
    builder="hf",
    description="transformers.GPT2LMHeadModel, use_cache=False: LayerNorm, GELU (tanh), tied LM head",
    sizes={
        "tiny": {
            "n_layer": 2,
            "n_embd": 64,
            "n_head": 4,
            "vocab_size": 256,
            "n_positions": 128,
            "bos_token_id": 255,
            "eos_token_id": 255,
        },
        "base": {
            "n_layer": 12,
            "n_embd": 768,
            "n_head": 12,
            "vocab_size": 50257,
            "n_positions": 1024,
        },  # GPT-2 small (GPT2Config's defaults)
    },
    inputs=(_IDS, _MASK),
    outputs=(_LOGITS,),
    options={"attention_mask": True},
    sequence_limit="n_positions",
)

BERT = ModelSpec(
    name="bert",
    builder="hf",
    description="transformers.BertModel with pooler: post-LayerNorm encoder, GELU (erf), padding mask",
    sizes={
        "tiny": {
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "vocab_size": 256,
            "max_position_embeddings": 128,
        },
        "base": {
            "num_hidden_layers": 12,
            "hidden_size": 768,
            "num_attention_heads": 12,
            "intermediate_size": 3072,
            "vocab_size": 30522,
            "max_position_embeddings": 512,
        },
    },
    inputs=(_IDS, _MASK),
    outputs=(
        OutputSpec("last_hidden_state", ("batch", "sequence")),
        OutputSpec("pooler_output", ("batch",)),
    ),
    sequence_limit="max_position_embeddings",
)

LLAMA = ModelSpec(
    name="llama",
    builder="hf",
    description="transformers.LlamaForCausalLM, use_cache=False: RMSNorm, rotary, GQA, SwiGLU",
    sizes={
        "tiny": {
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 128,
            "vocab_size": 256,
            "max_position_embeddings": 128,
        },
        "base": {
            "num_hidden_layers": 12,
            "hidden_size": 768,
            "num_attention_heads": 12,
            "num_key_value_heads": 4,
            "intermediate_size": 2048,
            "vocab_size": 32000,
            "max_position_embeddings": 2048,
        },  # about 125M parameters, 4 query heads per kv
    },
    inputs=(_IDS, _MASK),
    outputs=(_LOGITS,),
    options={"attention_mask": True},
)

RESNET = ModelSpec(
    name="resnet",
    builder="resnet",
    description="plain torch.nn ResNet: conv-BN-ReLU basic blocks, residual adds, maxpool, GAP, linear",
    sizes={
        "tiny": {
            "stem_kernel": 3,
            "stem_stride": 1,
            "channels": (8, 16),
            "blocks": (1, 1),
            "classes": 10,
            "image": 32,
        },
        "base": {
            "stem_kernel": 7,
            "stem_stride": 2,
            "channels": (64, 128, 256, 512),
            "blocks": (2, 2, 2, 2),
            "classes": 1000,
            "image": 224,
        },  # ResNet-18
    },
    inputs=(InputSpec("pixel_values", "float32", ("batch", 3, "image", "image")),),
    outputs=(OutputSpec("logits", ("batch",)),),
)

MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in (GPT2, BERT, LLAMA, RESNET)}


def get_spec(name: str) -> ModelSpec:
    """The spec named `name`; a clear error listing the zoo otherwise."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"no zoo model {name!r}; models: {sorted(MODELS)}") from None


def concrete_shape(
    spec: InputSpec, config: Mapping[str, Any], batch: int, sequence: int
) -> tuple[int, ...]:
    """`spec.shape` with its symbols replaced: batch, sequence, or a config entry ("image")."""
    sizes = {"batch": batch, "sequence": sequence}
    return tuple(
        d if isinstance(d, int) else int(sizes[d] if d in sizes else config[d]) for d in spec.shape
    )
