"""`SteeredCausalLM`: a Hugging Face causal LM whose attention blocks add a per-head detoxification vector.

Each attention block of the wrapped model is turned, in place, into an instance of a generated subclass of its
own class (`SteeredLlamaAttention`, ...). The subclass carries three non-learned buffers and edits the input of
the block's output projection, i.e. the concatenated per-head outputs, at every position:

    h'[head] = h[head] + alpha * w[head] * v[head]

with `v` the head's detoxification vector and `w` its weight (its probe's validation accuracy, or 1 for uniform
weighting). With all buffers at zero (the initial state) the model computes exactly what the base model computes.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from destein_pl.steering.activations import LastTokensRecorder
from destein_pl.steering.architectures import Architecture, architecture_for
from destein_pl.steering.checkpoint import load_steered

Recorder = Callable[[int, Tensor], None]


class SteeredAttention(nn.Module):
    """Mixin of the generated attention subclasses; holds the steering buffers of one layer."""

    steer_vectors: Tensor
    steer_head_weights: Tensor
    steer_alpha: Tensor

    def _init_steering(self, layer_idx: int, num_heads: int, head_dim: int, projection: nn.Module) -> None:
        weight = projection.weight
        self.steer_layer_idx = layer_idx
        self.steer_recorder: Recorder | None = None
        self.register_buffer("steer_vectors", torch.zeros(num_heads, head_dim, device=weight.device))
        self.register_buffer("steer_head_weights", torch.zeros(num_heads, device=weight.device))
        self.register_buffer("steer_alpha", torch.zeros((), device=weight.device))
        # A bound method (not a closure) so that copy.deepcopy rebinds the hook to the copied block.
        projection.register_forward_pre_hook(self._steer_projection_input)

    def steering_offset(self) -> Tensor:
        """The vector added to the projection input, `[num_heads * head_dim]`, in float32."""
        weighted = self.steer_alpha.float() * self.steer_head_weights.float()[:, None] * self.steer_vectors.float()
        return weighted.reshape(-1)

    def _steer_projection_input(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden, *rest = args
        hidden = hidden + self.steering_offset().to(device=hidden.device, dtype=hidden.dtype)
        if self.steer_recorder is not None:
            self.steer_recorder(self.steer_layer_idx, hidden)
        return (hidden, *rest)


_STEERED_CLASSES: dict[type, type] = {}


def _steered_class(cls: type[nn.Module]) -> type[nn.Module]:
    if cls not in _STEERED_CLASSES:
        _STEERED_CLASSES[cls] = type(f"Steered{cls.__name__}", (SteeredAttention, cls), {"__module__": __name__})
    return _STEERED_CLASSES[cls]


def _projection_width(projection: nn.Module) -> int | None:
    # nn.Linear names it in_features; GPT-2's Conv1D names it nx.
    return getattr(projection, "in_features", None) or getattr(projection, "nx", None)


class SteeredCausalLM(nn.Module):
    """A Hugging Face causal LM with DeStein head-wise steering at every attention block.

    `forward` and `generate` take the wrapped model's arguments. The steering buffers start at zero; set them
    with `set_steering`, `calibrate(...).apply(...)`, or load a calibrated checkpoint with `from_checkpoint`.
    `base_model` names the model for checkpoints and reports (default: the config's `_name_or_path`).
    The wrapped model's parameters are frozen: steering happens at inference time, and CPU kernels take another
    code path (other last bits) for parameters that require gradients.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None,
                 base_model: str | None = None) -> None:
        super().__init__()
        self.architecture: Architecture = architecture_for(model.config)
        model.requires_grad_(False)
        self.model = model
        self.tokenizer = tokenizer
        self.base_model = (base_model or getattr(model, "destein_source", None)
                           or getattr(model.config, "_name_or_path", None) or None)
        self.num_layers = self.architecture.num_layers(model.config)
        self.num_heads = self.architecture.num_heads(model.config)
        self.head_dim = self.architecture.head_dim(model.config)
        blocks = self.architecture.attention_blocks(model)
        if len(blocks) != self.num_layers:
            raise ValueError(f"config says {self.num_layers} layers but the model has {len(blocks)}")
        for layer_idx, block in enumerate(blocks):
            if isinstance(block, SteeredAttention):
                raise ValueError("this model is already wrapped by a SteeredCausalLM; wrap it only once")
            projection = getattr(block, self.architecture.projection)
            width = _projection_width(projection)
            if width is not None and width != self.num_heads * self.head_dim:
                raise ValueError(
                    f"layer {layer_idx}: {self.architecture.projection} takes {width} features, expected "
                    f"num_heads * head_dim = {self.num_heads} * {self.head_dim}"
                )
            block.__class__ = _steered_class(type(block))
            block._init_steering(layer_idx, self.num_heads, self.head_dim, projection)

    @property
    def blocks(self) -> list[SteeredAttention]:
        """The steered attention blocks, one per layer."""
        return self.architecture.attention_blocks(self.model)

    @property
    def config(self):
        return self.model.config

    @property
    def generation_config(self):
        return self.model.generation_config

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def vectors(self) -> Tensor:
        """Detoxification vectors, `[num_layers, num_heads, head_dim]`."""
        return torch.stack([b.steer_vectors.detach().cpu() for b in self.blocks])

    @property
    def head_weights(self) -> Tensor:
        """Per-head weights `[num_layers, num_heads]`: probe accuracies, or ones for uniform weighting."""
        return torch.stack([b.steer_head_weights.detach().cpu() for b in self.blocks])

    @property
    def probe_weights(self) -> Tensor:
        """Deprecated name of `head_weights`."""
        warnings.warn("SteeredCausalLM.probe_weights is deprecated; use head_weights", DeprecationWarning, 2)
        return self.head_weights

    @property
    def alpha(self) -> float:
        """Steering strength, shared by all layers."""
        return float(self.blocks[0].steer_alpha)

    @alpha.setter
    def alpha(self, value: float) -> None:
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"alpha must be a finite number, got {value}")
        for block in self.blocks:
            block.steer_alpha.fill_(value)

    @torch.no_grad()
    def set_steering(self, vectors: Tensor, head_weights: Tensor, alpha: float | None = None) -> None:
        """Set every head's vector `[L, H, D]` and weight `[L, H]`, and optionally alpha."""
        expected_v = (self.num_layers, self.num_heads, self.head_dim)
        expected_p = (self.num_layers, self.num_heads)
        vectors = torch.as_tensor(vectors)
        head_weights = torch.as_tensor(head_weights)
        if tuple(vectors.shape) != expected_v:
            raise ValueError(
                f"vectors must have shape [num_layers, num_heads, head_dim] = {list(expected_v)}, "
                f"got {list(vectors.shape)}"
            )
        if tuple(head_weights.shape) != expected_p:
            raise ValueError(
                f"head_weights must have shape [num_layers, num_heads] = {list(expected_p)}, "
                f"got {list(head_weights.shape)}"
            )
        for name, tensor in (("vectors", vectors), ("head_weights", head_weights)):
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{name} contains NaN or infinite values")
        for block, v, w in zip(self.blocks, vectors, head_weights):
            block.steer_vectors.copy_(v)
            block.steer_head_weights.copy_(w)
        if alpha is not None:
            self.alpha = alpha

    @torch.no_grad()
    def record_activations(self, input_ids: Tensor, attention_mask: Tensor | None = None, last_k: int = 8) -> Tensor:
        """Per-head activations at the steering site, averaged over each text's last `last_k` real tokens.

        Padding (zeros in `attention_mask`, left or right) is excluded. Returns float32 `[batch, L, H, D]`.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        recorder = LastTokensRecorder(attention_mask, last_k, self.num_layers, self.num_heads, self.head_dim)
        blocks = self.blocks
        for block in blocks:
            block.steer_recorder = recorder
        try:
            self.model(**self.architecture.padded_inputs(input_ids, attention_mask), use_cache=False)
        finally:
            for block in blocks:
                block.steer_recorder = None
        return recorder.result()

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        alpha: float | None = None,
        dtype: str | torch.dtype | None = None,
        device_map: str | dict | None = None,
    ) -> SteeredCausalLM:
        """A ready-to-generate steered model from a `.ckpt` or `.safetensors` steering checkpoint.

        Loads the base model the checkpoint names (in its dtype unless `dtype` is given), checks the checkpoint
        was made for that architecture, and applies its steering; `alpha` overrides the stored strength.
        """
        return load_steered(cls, path, alpha=alpha, dtype=dtype, device_map=device_map)

    def fold(self, inplace: bool = False) -> PreTrainedModel:
        """An ordinary Hugging Face model computing what this one computes, the steering folded into the attention
        output projections' biases (see `destein_pl.steering.folding.fold`): no cost per token, no destein-pl
        needed to run it. A copy unless `inplace` (then this object must not be used afterwards)."""
        from destein_pl.steering.folding import fold  # folding builds on this module

        return fold(self, inplace)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.generate(*args, **kwargs)
