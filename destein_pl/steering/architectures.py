"""Registry of the model families that can be steered.

Everything the library knows about a family's module layout lives here: where the decoder layers are, which
child of a layer is the attention block, and which child of the attention block is the output projection whose
input is the concatenation of the per-head outputs. Adding a family is adding an entry.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn
from transformers import PretrainedConfig


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

    def layer_modules(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def attention_blocks(self, model: nn.Module) -> list[nn.Module]:
        return [getattr(layer, self.attention) for layer in self.layer_modules(model)]


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("gpt2", ("gpt2",), layers="transformer.h", attention="attn", projection="c_proj"),
    Architecture(
        "llama", ("llama", "mistral", "qwen2"), layers="model.layers", attention="self_attn", projection="o_proj"
    ),
    Architecture("opt", ("opt",), layers="model.decoder.layers", attention="self_attn", projection="out_proj"),
    Architecture(
        "mpt", ("mpt",), layers="transformer.blocks", attention="attn", projection="out_proj",
        takes_position_ids=False, context_attr="max_seq_len",
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
