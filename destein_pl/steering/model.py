"""`SteeredCausalLM`: a Hugging Face causal LM whose attention blocks add a per-head detoxification vector.

Each attention block of the wrapped model is turned, in place, into a steered subclass of its own class
(`destein_pl.steering.attention`) holding three non-learned buffers, and by default its output projection's input,
i.e. the concatenated per-head outputs, is edited at every position:

    h'[head] = h[head] + alpha * w[head] * v[head]

with `v` the head's detoxification vector and `w` its weight (its probe's validation accuracy, or 1 for uniform
weighting). With all buffers at zero (the initial state) the model computes exactly what the base model computes.

Two settings change that formula, both applied in one place (`configure`): `fusion` names the steering operator
(`paper`, the formula above, `norm_preserving` or `published`; `destein_pl.steering.operators`), and `gate` scales
each row's alpha by how toxic the calibrated probes find its context (`destein_pl.steering.gating`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from destein_pl.steering.activations import LastTokensRecorder
from destein_pl.steering.architectures import Architecture, architecture_for
from destein_pl.steering.attention import SteeredAttention, steered_class
from destein_pl.steering.checkpoint import (
    LIGHTNING_PREFIX,
    STEER_KEY_MARK,
    CheckpointError,
    check_format,
    check_signature,
    check_values,
    read_checkpoint,
    steering_options,
)
from destein_pl.steering.folding import fold
from destein_pl.steering.gating import GateSettings, ProbeGate
from destein_pl.steering.loading import load_base_model
from destein_pl.steering.operators import SteeringOperator, operator_for
from destein_pl.steering.probes import Probes


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
            block.__class__ = steered_class(type(block))
            block._init_steering(self.num_heads, self.head_dim, projection)
        self.gate_probes: Probes | None = None
        """The calibrated probes the gate reads by default (set by calibration or a checkpoint that has them)."""
        self.continuation_probes: Probes | None = None
        """Probes fit on the model's own continuations (`destein gate`), which a gate with `probes: continuation`
        reads."""
        self._operator: SteeringOperator = blocks[0].steer_operator
        self._gate_settings = GateSettings()
        self._gate: ProbeGate | None = None
        self.method = None
        """A baseline method run in place of DeStein's calibrated steering (`destein_pl.baselines`), at this model's
        alpha; None: DeStein."""

    def set_method(self, method) -> None:
        """Run a baseline method (`destein_pl.baselines.Method`, or its name) at this model's alpha in place of
        DeStein's steering, which must be zero (a fresh model); None: back to DeStein alone. The method is attached
        (calibrated, its hooks installed) here, at alpha 0."""
        from destein_pl.baselines import build_method

        if self.method is not None:
            self.method.detach(self)
            self.method = None
        if method is None:
            return
        if self.vectors.any() or self.gate.enabled:
            raise ValueError("a baseline method runs on the base model; this model holds calibrated steering (or a "
                             "gate): use a fresh SteeredCausalLM, or give no steering checkpoint")
        method = build_method(method)
        alpha = self.alpha
        self.alpha = 0.0
        try:
            method.attach(self)
        finally:
            self.alpha = alpha
        self.method = method

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

    @contextmanager
    def row_alphas(self, alphas: Sequence[float] | Tensor) -> Iterator[None]:
        """Within the block, row `i` of every forward is steered at `alphas[i]` instead of the shared alpha: one batch
        can hold the base model (0), the checkpoint's alpha and any other strength. With a gate, each row keeps its
        own gate value, which multiplies its alpha.

        Equal alphas run the shared-alpha path (exactly `self.alpha = a`); different ones set every layer's alpha to
        1 and scale each row by its own, which equals a batch of one at that alpha up to float rounding. Every forward
        inside must have `len(alphas)` rows. The shared alpha is restored on exit."""
        rows = torch.as_tensor(alphas, dtype=torch.float32).detach().cpu()
        if rows.dim() != 1 or rows.numel() == 0:
            raise ValueError(f"per-row alphas must be a non-empty list (one per batch row), got shape "
                             f"{list(rows.shape)}")
        if not torch.isfinite(rows).all():
            raise ValueError(f"per-row alphas must be finite numbers, got {rows.tolist()}")
        if self.method is not None and not bool((rows == rows[0]).all()):
            raise ValueError(f"per-row alphas steer DeStein's vectors; the baseline method {self.method.name!r} "
                             f"takes one alpha for the whole batch")
        shared, blocks = self.alpha, self.blocks
        try:
            if bool((rows == rows[0]).all()):
                self.alpha = float(rows[0])
            else:
                self.alpha = 1.0
                for block in blocks:
                    block.steer_rows = rows.to(block.steer_alpha.device)
            yield
        finally:
            for block in blocks:
                block.steer_rows = None
            self.alpha = shared

    @property
    def fusion(self) -> str:
        """The steering operator's name: `paper` (default), `norm_preserving` or `published`
        (`destein_pl.steering.operators`)."""
        return self._operator.name

    @fusion.setter
    def fusion(self, value: str) -> None:
        self.configure(fusion=value)

    @property
    def gate(self) -> GateSettings:
        """How the calibrated probes gate the steering (`mode` `none`: not at all; see `set_gate`)."""
        return self._gate_settings

    @gate.setter
    def gate(self, value: GateSettings | None) -> None:
        self.configure(gate=value or GateSettings())

    def set_gate(self, settings: GateSettings | None, probes: Probes | None = None) -> None:
        """Gate the steering by the probes (`destein_pl.steering.gating`); None: no gate. `probes` replaces the set
        that `settings.probes` names (`gate_probes` or `continuation_probes`); a gate needs that set."""
        settings = settings or GateSettings()
        self.configure(gate=settings, **{self._PROBE_SETS[settings.probes]: probes})

    _PROBE_SETS: ClassVar[dict[str, str]] = {"context": "gate_probes", "continuation": "continuation_probes"}
    """Each `GateSettings.probes` value and the attribute holding that set."""

    def configure(self, fusion: str | None = None, gate: GateSettings | None = None,
                  gate_probes: Probes | None = None, continuation_probes: Probes | None = None) -> None:
        """Set the steering operator (by name), the gate settings and the gate's probe sets; None keeps the current
        one. The one place where these settings reach the attention blocks."""
        operator = self._operator if fusion is None else operator_for(fusion)
        operator.check(self.config, self.num_heads, self.head_dim)
        if gate is not None and not isinstance(gate, GateSettings):
            raise TypeError(f"gate must be GateSettings or None, got {type(gate).__name__}")
        given = {"gate_probes": gate_probes, "continuation_probes": continuation_probes}
        for probes in given.values():
            if probes is not None and probes.shape != (self.num_layers, self.num_heads, self.head_dim):
                raise ValueError(f"probes must have coef [num_layers, num_heads, head_dim] = "
                                 f"{[self.num_layers, self.num_heads, self.head_dim]}, got {list(probes.shape)}")
        sets = {name: getattr(self, name) if probes is None else probes for name, probes in given.items()}
        settings = self._gate_settings if gate is None else gate
        modifier = self._gate
        if gate is not None or any(p is not None for p in given.values()):
            probes = sets[self._PROBE_SETS[settings.probes]]
            if settings.enabled and probes is None:
                raise ValueError(
                    f"gate={settings.mode!r} needs the calibrated probes; calibrate, or load a checkpoint that has them "
                    f"(gate_probe_coef, gate_probe_intercept, gate_probe_accuracy)" if settings.probes == "context" else
                    f"gate={settings.mode!r} with probes 'continuation' needs the continuation probes; fit them on the "
                    f"model's own continuations with `destein gate`, or load a checkpoint that has them "
                    f"(continuation_probe_coef, continuation_probe_intercept, continuation_probe_accuracy)")
            if self._gate is not None:
                self._gate.remove()
            modifier = ProbeGate(self.model, self.architecture, settings, probes) if settings.enabled else None
        self._operator, self._gate_settings, self._gate = operator, settings, modifier
        self.gate_probes, self.continuation_probes = sets["gate_probes"], sets["continuation_probes"]
        for block in self.blocks:
            block.steer_operator, block.steer_modifier = operator, modifier

    @property
    def active_gate_probes(self) -> Probes | None:
        """The probe set the gate reads (`gate.probes`), whether or not a gate is on."""
        return getattr(self, self._PROBE_SETS[self.gate.probes])

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
        # after the steering hooks, so the recorder sees what the projection gets
        handles = [projection.register_forward_pre_hook(lambda module, args, layer=layer: recorder(layer, args[0]))
                   for layer, projection in enumerate(self.architecture.projections(self.model))]
        try:
            self.model(**self.architecture.padded_inputs(input_ids, attention_mask), use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        return recorder.result()

    def signature(self) -> dict[str, Any]:
        """What a steering checkpoint must match: family, model type and the shape of the steering site."""
        return {
            "family": self.architecture.family,
            "model_type": self.config.model_type,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "hidden_size": self.config.hidden_size,
        }

    def steering_digest(self) -> str:
        """sha256 of what the steered generations depend on beyond alpha: the vectors, the head weights, a
        fusion or gate other than the default with the gate's probes, and a baseline method's settings. Evaluation reuses stored generations only
        for the same digest, `results.json` records it, and export checks a results file against it. The default
        options add nothing, so evaluation folders made before they existed still resume."""
        digest = hashlib.sha256()
        for tensor in (self.vectors, self.head_weights):
            digest.update(tensor.float().contiguous().numpy().tobytes())
        if self.fusion != "paper" or self.gate.enabled:
            digest.update(json.dumps({"fusion": self.fusion, "gate": self.gate.metadata()}, sort_keys=True).encode())
        if self.gate.enabled:
            for tensor in self.active_gate_probes.arrays("").values():
                digest.update(tensor.contiguous().numpy().tobytes())
        if self.method is not None:
            digest.update(json.dumps(self.method.settings(), sort_keys=True).encode())
        return digest.hexdigest()

    def steering_settings(self) -> dict[str, Any]:
        """The steering this model runs with, as `results.json` records it: fusion, gate, alpha and digest."""
        settings = {"fusion": self.fusion, "gate": self.gate.metadata(), "alpha": self.alpha,
                    "digest": self.steering_digest()}
        return settings if self.method is None else {**settings, "method": self.method.settings()}

    def steering_tensors(self) -> dict[str, Tensor]:
        """The steering as a checkpoint stacks it: `vectors`, `head_weights`, `alpha`."""
        return {"vectors": self.vectors, "head_weights": self.head_weights, "alpha": torch.tensor(self.alpha)}

    def load_steering(self, tensors: dict[str, Tensor], metadata: dict[str, Any] | None,
                      source: str | os.PathLike) -> None:
        """Set this model's steering, fusion, gate and probes from a checkpoint's tensors and metadata
        (`read_checkpoint`), after checking they were made for this architecture.

        `tensors` is either the stacked export (`vectors`, `head_weights`, `alpha`) or a Lightning state dict whose
        per-block buffers sit under the LightningModule's `steered.` attribute.
        """
        metadata = check_format(metadata, source)
        check_signature(metadata, self.signature(), source)
        check_values(tensors, source)
        fusion, gate, probes = steering_options(tensors, metadata, source)
        self.gate_probes = self.continuation_probes = None  # the checkpoint's probes, or none
        self.configure(fusion=fusion, gate=gate, gate_probes=probes["context"],
                       continuation_probes=probes["continuation"])
        if "vectors" in tensors:
            try:
                self.set_steering(tensors["vectors"], tensors["head_weights"], float(tensors["alpha"]))
            except (KeyError, ValueError) as err:
                raise CheckpointError(f"{source}: steering tensors do not fit the model ({err})") from err
            return
        state = {k[len(LIGHTNING_PREFIX) :]: v for k, v in tensors.items()
                 if k.startswith(LIGHTNING_PREFIX) and STEER_KEY_MARK in k}
        result = self.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if STEER_KEY_MARK in k]
        if missing or result.unexpected_keys:
            raise CheckpointError(f"{source}: steering state does not fit the model (missing {missing[:3]}, "
                                  f"unexpected {result.unexpected_keys[:3]})")

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        alpha: float | None = None,
        dtype: str | torch.dtype | None = None,
        device_map: str | dict | None = None,
        fusion: str | None = None,
        gate: GateSettings | None = None,
    ) -> SteeredCausalLM:
        """A ready-to-generate steered model from a `.ckpt` or `.safetensors` steering checkpoint.

        Loads the base model the checkpoint names (in its dtype unless `dtype` is given), checks the checkpoint
        was made for that architecture, and applies its steering, fusion and gate; `alpha`, `fusion` and `gate`
        override the stored ones.
        """
        tensors, metadata = read_checkpoint(path)
        base = (metadata or {}).get("base_model")
        if not isinstance(base, dict) or "name_or_path" not in base:
            raise CheckpointError(f"{path}: not a destein-pl steering checkpoint (no base model recorded)")
        model, tokenizer = load_base_model(base["name_or_path"], dtype=dtype or base.get("dtype"),
                                           device_map=device_map)
        steered = cls(model, tokenizer, base_model=base["name_or_path"])
        steered.load_steering(tensors, metadata, path)
        if alpha is not None:
            steered.alpha = alpha
        steered.configure(fusion=fusion, gate=gate)
        return steered

    def fold(self, inplace: bool = False) -> PreTrainedModel:
        """An ordinary Hugging Face model computing what this one computes, the steering folded into the attention
        output projections' biases (see `destein_pl.steering.folding.fold`): no cost per token, no destein-pl
        needed to run it. A copy unless `inplace` (then this object must not be used afterwards)."""
        return fold(self, inplace)

    def forward(self, *args: Any, alpha: Sequence[float] | Tensor | None = None, **kwargs: Any) -> Any:
        """The wrapped model's forward; `alpha`, one per batch row, steers each row at its own strength
        (`row_alphas`; None: every row at `self.alpha`)."""
        if alpha is None:
            return self.model(*args, **kwargs)
        with self.row_alphas(alpha):
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, alpha: Sequence[float] | Tensor | None = None, **kwargs: Any) -> Any:
        """The wrapped model's `generate`; `alpha`, one per input row, steers each row (and its
        `num_return_sequences` continuations) at its own strength (`row_alphas`; None: all at `self.alpha`)."""
        if alpha is None:
            return self.model.generate(*args, **kwargs)
        rows = torch.as_tensor(alpha, dtype=torch.float32).repeat_interleave(kwargs.get("num_return_sequences") or 1)
        with self.row_alphas(rows):
            return self.model.generate(*args, **kwargs)
