"""Registry of the model families that can be steered.

Everything the library knows about a family's module layout lives here: where the decoder layers are, which
child of a layer is the attention block, and which child of the attention block is the output projection whose
input is the concatenation of the per-head outputs, and, for folding the steering into a bias, how each model
type's stock class holds a bias on that projection (`BiasSlot`). Adding a family is adding an entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig


@dataclass(frozen=True)
class BiasSlot:
    """How the stock Hugging Face class of one model type holds a bias on the output projection.

    Folding turns the steering into that bias; exporting needs a stock loader (transformers, vLLM, ...) to create
    and load it from nothing but the saved config.
    """

    model_type: str
    flag: str | None = None
    """Config attribute that, set true, makes the stock class create the bias; None: no flag is needed (the bias
    is always there) or none exists (`stock` is False)."""
    companions: tuple[str, ...] = ()
    """Other linear modules, as paths from a decoder layer, that the flag also gives a bias (filled with zeros when
    the model has none: vLLM silently skips weights it has no slot for, and transformers would initialize them)."""
    stock: bool = True
    """Whether the stock class can hold the bias at all."""
    export_as: str | None = None
    """Model type of an exactly equivalent stock class that can hold the bias, when this one cannot; equivalent
    only while no sliding window is in effect (the target attends to the whole context)."""
    note: str = ""
    """Why the stock class cannot hold the bias (quoted in errors)."""
    gguf_arch: str | None = None
    """The llama.cpp architecture (GGUF `general.architecture`) that reads an optional output-projection bias
    tensor `blk.N.attn_output.bias` for this model type; None: no GGUF export."""
    gguf_note: str = ""
    """Why there is no GGUF export (quoted in its refusal), where llama.cpp has a graph for the model type."""


@dataclass(frozen=True)
class Architecture:
    """Where the steering site is in one family of Hugging Face causal LMs."""

    family: str
    model_types: tuple[str, ...]
    layers: str
    """Dotted path from the causal-LM module to the `ModuleList` of decoder layers."""
    attention: str
    """Attribute of a decoder layer holding the attention block."""
    projection: str
    """Attribute of the attention block holding the output projection (input: `[batch, seq, heads * head_dim]`)."""
    takes_position_ids: bool = True
    """Whether `forward` takes `position_ids` (needed for left-padded batches; ALiBi models take none)."""
    context_attr: str = "max_position_embeddings"
    """Config attribute holding the longest sequence the model accepts."""
    bias_slots: tuple[BiasSlot, ...] = ()
    """How each of `model_types` holds a bias on the output projection (folding and export)."""

    def num_layers(self, config: PretrainedConfig) -> int:
        return config.num_hidden_layers

    def num_heads(self, config: PretrainedConfig) -> int:
        # Query heads: with grouped-query attention these are what the output projection sees.
        return config.num_attention_heads

    def head_dim(self, config: PretrainedConfig) -> int:
        return getattr(config, "head_dim", None) or config.hidden_size // self.num_heads(config)

    def context_length(self, config: PretrainedConfig) -> int:
        return getattr(config, self.context_attr)

    def padded_inputs(self, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        """Forward arguments for a padded batch, with positions counted from each row's first real token."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.takes_position_ids:
            inputs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return inputs

    def step_inputs(self, token: Tensor, attention_mask: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Forward arguments for one cached decoding step on `token` (one per row), and the attention mask grown by
        that step's column; a row's position is its count of real tokens before it."""
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        inputs = {"input_ids": token[:, None], "attention_mask": attention_mask}
        if self.takes_position_ids:
            inputs["position_ids"] = attention_mask.sum(dim=1, keepdim=True) - 1
        return inputs, attention_mask

    def layer_modules(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def attention_blocks(self, model: nn.Module) -> list[nn.Module]:
        return [getattr(layer, self.attention) for layer in self.layer_modules(model)]

    def projections(self, model: nn.Module) -> list[nn.Module]:
        """The output projection of every layer's attention block."""
        return [getattr(block, self.projection) for block in self.attention_blocks(model)]

    def bias_slot(self, model_type: str) -> BiasSlot:
        """How `model_type`'s stock class holds a bias on the output projection."""
        for slot in self.bias_slots:
            if slot.model_type == model_type:
                return slot
        raise UnsupportedArchitectureError(f"family {self.family!r} has no bias slot entry for {model_type!r}")

    def sliding_window_in_effect(self, config: PretrainedConfig) -> bool:
        """Whether some layer attends to a window shorter than the context (no full-attention class is then
        equivalent). Mistral applies `sliding_window` to every layer; Qwen2 only to its `sliding_attention` layer
        types, and sets `sliding_window` to None unless `use_sliding_window`."""
        window = getattr(config, "sliding_window", None)
        if window is None or window >= self.context_length(config):
            return False
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            return "sliding_attention" in layer_types
        return bool(getattr(config, "use_sliding_window", True))


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        "gpt2", ("gpt2",), layers="transformer.h", attention="attn", projection="c_proj",
        bias_slots=(BiasSlot("gpt2"),),  # Conv1D c_proj always has a bias
    ),
    Architecture(
        "llama", ("llama", "mistral", "qwen2"), layers="model.layers", attention="self_attn", projection="o_proj",
        bias_slots=(
            BiasSlot("llama", flag="attention_bias", companions=_QKV, gguf_arch="llama"),
            BiasSlot("mistral", stock=False, export_as="llama",
                     note="transformers' MistralAttention creates o_proj with bias=False and has no config flag"),
            BiasSlot("qwen2", stock=False, export_as="llama",
                     note="transformers' Qwen2Attention has q/k/v biases but creates o_proj with bias=False"),
        ),
    ),
    Architecture(
        # Gemma 3's attention output passes through its own RMSNorm (`post_attention_layernorm`) before the
        # residual add, so the steering shifts the direction of the attention output, not the residual by a fixed
        # amount; and its heads are wider than hidden_size / heads (4 x 256 against 640 for the 270M model).
        "gemma3", ("gemma3_text",), layers="model.layers", attention="self_attn", projection="o_proj",
        bias_slots=(BiasSlot("gemma3_text", flag="attention_bias", companions=_QKV, gguf_note=(
            "llama.cpp's gemma3 graph (src/models/gemma3.cpp) passes no bias to its attention output projection "
            "(build_attn(..., wo, NULL, ...)), so a folded blk.N.attn_output.bias would be ignored")),),
    ),
    Architecture(
        "opt", ("opt",), layers="model.decoder.layers", attention="self_attn", projection="out_proj",
        bias_slots=(BiasSlot("opt", flag="enable_bias", companions=(*_QKV, "fc1", "fc2")),),
    ),
    Architecture(
        "mpt", ("mpt",), layers="transformer.blocks", attention="attn", projection="out_proj",
        takes_position_ids=False, context_attr="max_seq_len",
        bias_slots=(BiasSlot("mpt", stock=False, note=(
            "transformers' MptAttention creates out_proj with bias=False whatever config.no_bias says, and no "
            "stock class computes MPT's ALiBi attention with that bias")),),
    ),
)

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for a in ARCHITECTURES for t in a.model_types)


class UnsupportedArchitectureError(ValueError):
    """The model's family has no entry in the registry."""


def architecture_for(config: PretrainedConfig) -> Architecture:
    """The registry entry for a model config, or a clear error listing what is supported."""
    model_type = getattr(config, "model_type", None)
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    raise UnsupportedArchitectureError(
        f"model_type {model_type!r} is not supported for steering; supported model types: "
        f"{', '.join(SUPPORTED_MODEL_TYPES)}"
    )
