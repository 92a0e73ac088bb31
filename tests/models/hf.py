"""Hugging Face transformers models of the zoo (GPT-2, BERT, LLaMA-style) as export-ready modules.

Each model is built from a local config with random weights (`torch.manual_seed(0)` first, so the
same config gives the same weights), in eval mode, and wrapped in a module whose `forward` takes
the graph inputs as explicit positional tensors and returns a tuple of plain tensors. The wrapper
is what both exporters see: it fixes the argument order (the TorchScript exporter otherwise binds
positional args to `forward`'s parameters in declaration order, and `BertModel.forward`'s third
parameter is not the mask) and drops the `ModelOutput` dataclass.

The decoder LMs take an `attention_mask` by default. Without one, transformers' mask code looks
for packed sequences in the position ids with `torch.diff`, which the TorchScript exporter cannot
export (`aten::diff` has no symbolic at any opset); with a mask that code is skipped. So
`attention_mask=False` is a dynamo-only option.

Imports torch and transformers at module level: `tests/models/zoo.py` imports this module only to
build a model, never on a cache hit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import transformers


class _WithMask(torch.nn.Module):
    """forward(input_ids, attention_mask) -> the named outputs of `model`, as a tuple."""

    def __init__(self, model: torch.nn.Module, outputs: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.outputs = outputs

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[Any, ...]:
        result = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return tuple(getattr(result, name) for name in self.outputs)


class _IdsOnly(torch.nn.Module):
    """forward(input_ids) -> the named outputs of `model`, as a tuple."""

    def __init__(self, model: torch.nn.Module, outputs: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.outputs = outputs

    def forward(self, input_ids: torch.Tensor) -> tuple[Any, ...]:
        result = self.model(input_ids=input_ids)
        return tuple(getattr(result, name) for name in self.outputs)


def _split(config: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """The transformers config arguments, and whether the model takes an attention mask."""
    arguments = dict(config)
    return arguments, bool(arguments.pop("attention_mask", True))


def _wrap(model: torch.nn.Module, outputs: tuple[str, ...], mask: bool) -> torch.nn.Module:
    wrapper = _WithMask(model, outputs) if mask else _IdsOnly(model, outputs)
    return wrapper.eval()


def make_gpt2(config: Mapping[str, Any]) -> torch.nn.Module:
    """GPT2LMHeadModel without KV cache; returns (logits,)."""
    arguments, mask = _split(config)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(use_cache=False, **arguments))
    return _wrap(model.eval(), ("logits",), mask)


def make_bert(config: Mapping[str, Any]) -> torch.nn.Module:
    """BertModel with its pooler; returns (last_hidden_state, pooler_output)."""
    arguments, _ = _split(config)
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**arguments), add_pooling_layer=True)
    return _wrap(model.eval(), ("last_hidden_state", "pooler_output"), True)


def make_llama(config: Mapping[str, Any]) -> torch.nn.Module:
    """LlamaForCausalLM without KV cache (grouped-query attention when kv heads < heads)."""
    arguments, mask = _split(config)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(use_cache=False, **arguments))
    return _wrap(model.eval(), ("logits",), mask)


BUILDERS = {"gpt2": make_gpt2, "bert": make_bert, "llama": make_llama}
