"""`SteeredCausalLM`: a Hugging Face causal LM whose attention blocks add a per-head detoxification vector.

Each attention block of the wrapped model is turned, in place, into an instance of a generated subclass of its
own class (`SteeredLlamaAttention`, ...). The subclass carries three non-learned buffers and edits the input of
the block's output projection, i.e. the concatenated per-head outputs, at every position:

    h'[head] = h[head] + alpha * w[head] * v[head]

with `v` the head's detoxification vector and `w` its weight (its probe's validation accuracy, or 1 for uniform
weighting). With all buffers at zero (the initial state) the model computes exactly what the base model computes.

Two options change that formula (both off by default, where the model computes exactly the formula above):
`fusion` selects how the vectors are combined with the activations (`paper`, `norm_preserving`, `published`;
`destein_pl.steering.fusion`), and `gate` scales each row's alpha by how toxic the calibrated probes find its
context (`destein_pl.steering.gating`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from destein_pl.steering import fusion as fusions
from destein_pl.steering.activations import LastTokensRecorder
from destein_pl.steering.architectures import Architecture, architecture_for
from destein_pl.steering.checkpoint import load_steered
from destein_pl.steering.gating import GateProbes, GateSettings, ProbeGate, as_gate_settings

Recorder = Callable[[int, Tensor], None]


class SteeredAttention(nn.Module):
    """Mixin of the generated attention subclasses; holds the steering buffers of one layer.

    Besides the buffers, plain attributes: `steer_fusion` (the fusion variant), `steer_gate` (the gate `[batch, seq]`
    of the current forward, set and cleared by the model's `ProbeGate`; None: ungated) and `steer_tap` (set only
    during the gate's unsteered shadow pass: it reads the projection input, and nothing is steered).
    """

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
        self.steer_fusion: str = "paper"
        self.steer_gate: Tensor | None = None
        self.steer_tap: Callable[[int, Tensor], None] | None = None
        # Bound methods (not closures) so that copy.deepcopy rebinds the hooks to the copied block.
        projection.register_forward_pre_hook(self._steer_projection_input)
        projection.register_forward_hook(self._steer_projection_output)

    def steering_offset(self) -> Tensor:
        """The vector added to the projection input, `[num_heads * head_dim]`, in float32."""
        weighted = self.steer_alpha.float() * self.steer_head_weights.float()[:, None] * self.steer_vectors.float()
        return weighted.reshape(-1)

    def _steer_projection_input(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        hidden, *rest = args
        if self.steer_tap is not None:  # the gate's shadow pass: read the unsteered activations, steer nothing
            self.steer_tap(self.steer_layer_idx, hidden)
            return None
        fusion, gate = self.steer_fusion, self.steer_gate
        if fusion == "paper" and gate is None:
            hidden = hidden + self.steering_offset().to(device=hidden.device, dtype=hidden.dtype)
        elif fusion == "paper":
            hidden = fusions.paper(hidden, self.steering_offset(), gate)
        elif fusion == "norm_preserving":
            hidden = fusions.norm_preserving(hidden, self.steering_offset(), self.steer_vectors.shape[0], gate)
        if self.steer_recorder is not None:
            self.steer_recorder(self.steer_layer_idx, hidden)
        return (hidden, *rest)

    def _steer_projection_output(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor | None:
        """The `published` fusion, which acts on the projection output; nothing for the other variants."""
        if self.steer_fusion != "published" or self.steer_tap is not None:
            return None
        if float(self.steer_alpha) == 0 or not self.steer_vectors.any():
            return None  # zero steering is the base model exactly
        direction = fusions.published_direction(module, self.steer_vectors, self.steer_head_weights)
        return fusions.published(output, direction, self.steer_alpha, self.steer_gate)


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
        self.gate_probes: GateProbes | None = None
        """The calibrated probes the gate reads (set by calibration or a checkpoint that has them)."""
        self._gate_settings = GateSettings()
        self._gate: ProbeGate | None = None

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

    @property
    def fusion(self) -> str:
        """How the vectors are combined with the activations: `paper` (default), `norm_preserving` or `published`
        (see `destein_pl.steering.fusion`)."""
        return self.blocks[0].steer_fusion

    @fusion.setter
    def fusion(self, value: str) -> None:
        fusions.check_fusion(value)
        if value == "published" and self.config.hidden_size != self.num_heads * self.head_dim:
            raise ValueError(f"fusion='published' slices the attention output into heads, which needs hidden_size == "
                             f"num_heads * head_dim; this model has {self.config.hidden_size} != "
                             f"{self.num_heads} * {self.head_dim}")
        for block in self.blocks:
            block.steer_fusion = value

    @property
    def gate(self) -> GateSettings:
        """How the calibrated probes gate the steering (`mode` `none`: not at all; see `set_gate`)."""
        return self._gate_settings

    @gate.setter
    def gate(self, value: GateSettings | dict | str | None) -> None:
        self.set_gate(value)

    def set_gate(self, settings: GateSettings | dict | str | None, probes: GateProbes | None = None) -> None:
        """Gate the steering by the probes (`destein_pl.steering.gating`): settings, a dict of them, a mode name
        (`none`, `hard`, `smooth`) or None (`none`). `probes` replaces `gate_probes`; a gate needs them."""
        settings = as_gate_settings(settings)
        if probes is not None:
            if tuple(probes.coef.shape) != (self.num_layers, self.num_heads, self.head_dim):
                raise ValueError(f"probes must have coef [num_layers, num_heads, head_dim] = "
                                 f"{[self.num_layers, self.num_heads, self.head_dim]}, got {list(probes.coef.shape)}")
            self.gate_probes = probes
        gate = None
        if settings.enabled:
            if self.gate_probes is None:
                raise ValueError(f"gate={settings.mode!r} needs the calibrated probes; calibrate, or load a checkpoint "
                                 "that has them (probe_coef, probe_intercept, probe_accuracy)")
            gate = ProbeGate(self.model, self.architecture, settings, self.gate_probes)
        if self._gate is not None:
            self._gate.remove()
        self._gate, self._gate_settings = gate, settings

    def gate_values(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """`(gate, score)`, each `[batch, seq]`: what the gate would apply at every position of whole sequences, and
        the probes' score it comes from, from the unsteered model (whatever alpha is)."""
        if self._gate is None:
            raise ValueError("the gate is off (mode 'none'); set_gate(...) first")
        return self._gate.values(input_ids, attention_mask)

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
        fusion: str | None = None,
        gate: GateSettings | dict | str | None = None,
    ) -> SteeredCausalLM:
        """A ready-to-generate steered model from a `.ckpt` or `.safetensors` steering checkpoint.

        Loads the base model the checkpoint names (in its dtype unless `dtype` is given), checks the checkpoint
        was made for that architecture, and applies its steering, fusion and gate (checkpoints without them: `paper`,
        `none`); `alpha`, `fusion` and `gate` override the stored ones.
        """
        return load_steered(cls, path, alpha=alpha, dtype=dtype, device_map=device_map, fusion=fusion, gate=gate)

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
