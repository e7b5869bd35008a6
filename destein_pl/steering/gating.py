"""Probe-gated steering: steer a row only as much as the calibrated probes call its context toxic.

The paper steers every context, which costs fluency on clean prompts too. The calibrated probes are linear
classifiers (toxic vs non-toxic) over the very head activations being steered; here they decide, per sequence row
and per position, how much of alpha that row gets.

**The score.** The `heads` heads with the most accurate probes (ties: lower (layer, head) first) are the gate heads.
At every position, each gate head's probe logit `coef . a + intercept` is taken on the head's activation `a` (its
slice of the output projection's input), and averaged over the last `window` positions of the row (padding
excluded). As the probes were fit on activations averaged over each text's last `last_k` tokens, and a linear
probe's logit of a mean is the mean of its logits, this is the probe applied to exactly the feature it was fit on
when `window == last_k` (default 8 for both). The score is the mean over gate heads of the sigmoid of those
logits: the probes' mean toxic probability for the context up to and including the position.

**The gate.** `hard`: 1 where score >= threshold, else 0; `smooth`: `sigmoid((score - threshold) / temperature)`.
Both are monotone non-decreasing in the score and lie in [0, 1]. The gate multiplies alpha for that row and
position (see `fusion` for how each variant uses it); at gate 0 every variant leaves the row exactly unsteered.
A position whose window holds only padding (left padding of a batch) gets gate 0.

**Which activations: unsteered ones, from a shadow pass.** Steering at one layer changes the activations of every
later layer, and the steering vectors point against the probes' toxic direction, so a gate read from the steered
model would partly measure its own steering (and, in the prefill, the gate of layer 0 would need the scores of
deeper layers of the same forward). So before each forward of the steered model, the gate runs the *base* model
(steering off at every layer) through layers 0 to the deepest gate layer only, with a KV cache of its own, and
reads the gate heads there: the scores are exactly those of the unsteered model on the same context, whatever alpha,
fusion or earlier gates were. The price is that partial forward (the deepest gate layer's share of the layers)
and its KV cache; nothing is computed beyond the deepest gate layer.

**State, and the sampler's guarantees.** A cached forward needs, per row, the shadow pass's KV cache and the last
`window - 1` positions' probe logits. Both are kept *as extra layers of the model's own cache object* (appended
after the model's layers when the cache is first filled): the cache's batch operations (`batch_select_indices`,
`batch_repeat_interleave`, `reorder_cache`, `crop`, `reset`), which the sampler and `generate` apply after the
prefill, then act on them as on the keys and values of the same rows. Nothing is kept on the model between calls.
A row's gate depends only on that row's tokens, so a continuation does not depend on its batch neighbours or on the
number of processes; a cached step gives the gate of a full forward over the whole sequence (window sums are taken
in a fixed order, so they do not depend on how the sequence was split into forwards).

**What the checkpoint stores.** The probes' coefficients `[L, H, D]`, intercepts `[L, H]` and accuracies
`[L, H]` (tensors `probe_coef`, `probe_intercept`, `probe_accuracy`; `probes.*` in a Lightning `.ckpt`) and the
settings under `options.gate` in the metadata. No activation scaling is needed: `calibration.probes` fits its
logistic regressions on the raw (unstandardized) float activations, so coefficients and intercepts apply to raw
activations as they are (metadata `probe_scaling: none`; a checkpoint naming any other scaling is refused).

With `mode: none` (the default, and what checkpoints without gate settings load as) no hook is installed and the
model computes exactly what it computed before gating existed. Alpha 0 skips the shadow pass (nothing to gate).
Only a dynamic (growing) cache is supported for cached generation.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from destein_pl.steering.architectures import Architecture

GateMode = Literal["none", "hard", "smooth"]
GATE_MODES: tuple[str, ...] = ("none", "hard", "smooth")
PROBE_SCALING = "none"
"""How activations are scaled before the probes: not at all (`fit_head_probes` fits on raw activations)."""

_INPUTS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids", "token_type_ids", "cache_position")
"""Forward arguments of the causal LM that the shadow pass passes on to the base model."""
_CACHE_ARGS = ("cache", "past_key_values")


@dataclass(frozen=True)
class GateSettings:
    """How the probes gate the steering.

    Args:
        mode: `none` (steer every context: the paper), `hard` (steer a row only where its score reaches `threshold`)
            or `smooth` (scale by `sigmoid((score - threshold) / temperature)`).
        threshold: score, a mean toxic probability in [0, 1], at which the gate opens (hard) or is one half (smooth).
        temperature: > 0; the smooth gate's width in score units (small: close to hard).
        heads: number of gate heads, those with the most accurate probes (all heads if there are fewer).
        window: the score averages the probe logits over a row's last `window` positions (padding excluded).
    """

    mode: GateMode = "none"
    threshold: float = 0.5
    temperature: float = 0.05
    heads: int = 16
    window: int = 8

    def __post_init__(self) -> None:
        if self.mode not in GATE_MODES:
            raise ValueError(f"gate must be one of {', '.join(GATE_MODES)}; got {self.mode!r}")
        if not (math.isfinite(self.threshold) and 0 <= self.threshold <= 1):
            raise ValueError(f"gate threshold must be in [0, 1] (a mean toxic probability), got {self.threshold}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"gate temperature must be a finite number > 0, got {self.temperature}")
        if int(self.heads) != self.heads or self.heads < 1:
            raise ValueError(f"gate heads must be an integer >= 1, got {self.heads}")
        if int(self.window) != self.window or self.window < 1:
            raise ValueError(f"gate window must be an integer >= 1, got {self.window}")

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def metadata(self) -> dict[str, Any]:
        return {**asdict(self), "probe_scaling": PROBE_SCALING}

    @classmethod
    def from_metadata(cls, data: dict[str, Any] | None) -> GateSettings:
        """Settings from checkpoint metadata (`options.gate`); missing: `none`."""
        if not data:
            return cls()
        scaling = data.get("probe_scaling", PROBE_SCALING)
        if scaling != PROBE_SCALING:
            raise ValueError(f"the gate's probes expect activation scaling {scaling!r}, which this version does not "
                             f"know (it applies probes to raw activations: {PROBE_SCALING!r})")
        return cls(**{k: data[k] for k in ("mode", "threshold", "temperature", "heads", "window") if k in data})

    def __call__(self, score: Tensor) -> Tensor:
        """The gate, in [0, 1], for scores (mean toxic probabilities); monotone non-decreasing."""
        if self.mode == "hard":
            return (score >= self.threshold).to(score.dtype)
        if self.mode == "smooth":
            return torch.sigmoid((score - self.threshold) / self.temperature)
        return torch.ones_like(score)


def as_gate_settings(value: GateSettings | dict[str, Any] | str | None) -> GateSettings:
    """`GateSettings` from settings, a dict of them, a mode name, or None (`none`)."""
    if value is None:
        return GateSettings()
    if isinstance(value, GateSettings):
        return value
    if isinstance(value, str):
        return GateSettings(mode=value)
    if isinstance(value, dict):
        return GateSettings.from_metadata(value)
    raise TypeError(f"gate settings must be GateSettings, a dict, a mode name or None; got {type(value).__name__}")


@dataclass
class GateProbes:
    """The calibrated probes, as the gate uses them: raw-activation logistic regressions, one per head."""

    coef: Tensor
    """`[L, H, D]`; a positive logit means toxic."""
    intercept: Tensor
    """`[L, H]`."""
    accuracy: Tensor
    """`[L, H]` validation accuracy; chooses the gate heads."""

    def __post_init__(self) -> None:
        self.coef, self.intercept, self.accuracy = (torch.as_tensor(t).detach().float().cpu()
                                                    for t in (self.coef, self.intercept, self.accuracy))
        if self.coef.dim() != 3 or self.intercept.shape != self.coef.shape[:2] or \
                self.accuracy.shape != self.coef.shape[:2]:
            raise ValueError(f"probes must be coef [L, H, D], intercept [L, H] and accuracy [L, H]; got "
                             f"{list(self.coef.shape)}, {list(self.intercept.shape)}, {list(self.accuracy.shape)}")
        if not all(torch.isfinite(t).all() for t in (self.coef, self.intercept, self.accuracy)):
            raise ValueError("probes contain NaN or infinite values")

    def top_heads(self, k: int) -> list[tuple[int, int]]:
        """The (layer, head) of the `k` most accurate probes (all heads if fewer), by layer then head."""
        order = torch.sort(self.accuracy.flatten(), descending=True, stable=True).indices[:k]
        num_heads = self.accuracy.shape[1]
        return sorted((int(i) // num_heads, int(i) % num_heads) for i in order)

    def arrays(self) -> dict[str, Tensor]:
        return {"probe_accuracy": self.accuracy, "probe_coef": self.coef, "probe_intercept": self.intercept}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> GateProbes | None:
        """The gate's probes among checkpoint tensors: `gate_probe_*` (fit on the pairs without cues), else the
        head-weight probes `probe_*` (checkpoints made before the gate probes existed); `probes.` before each name in
        a Lightning state dict."""
        for prefix in ("gate_", "probes.gate_", "", "probes."):
            names = [f"{prefix}probe_{k}" for k in ("coef", "intercept", "accuracy")]
            if all(n in tensors for n in names):
                return cls(*(tensors[n] for n in names))
        return None


class GateHistory(DynamicLayer):
    """The gate's past in a row of the cache: per position, each gate head's probe logit (`keys`, `[B, 1, T, K]`)
    and whether the position is a real token (`values`, `[B, 1, T, 1]`). A cache layer, so that the cache's batch
    operations keep it aligned with the keys and values of its rows."""


class GateStateError(RuntimeError):
    """A cached forward whose cache lacks (or has mismatched) gate state."""


class _ShadowDone(Exception):
    """Raised after the deepest gate layer to end the shadow pass."""


def gate_state(cache: Any) -> tuple[list[Any], GateHistory] | None:
    """The shadow KV layers and the history that a gated forward left in `cache`, or None."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return None
    history = next((layer for layer in layers if isinstance(layer, GateHistory)), None)
    if history is None:
        return None
    return [layer for layer in layers if getattr(layer, "destein_gate_shadow", False)], history


class ProbeGate:
    """The gate of one wrapped model: forward hooks on the causal LM that run the shadow pass and set each attention
    block's `steer_gate` (`[batch, seq]`) for the forward, then clear it. Holds references only to the model (and
    tensors), so a deep copy of the model carries a coherent copy of its gate."""

    def __init__(self, model: nn.Module, architecture: Architecture, settings: GateSettings, probes: GateProbes):
        if not settings.enabled:
            raise ValueError("ProbeGate needs a gate mode other than 'none'")
        base = model.base_model
        if base is model:
            raise ValueError(f"{type(model).__name__} exposes no base model to run the gate's shadow pass on")
        self.model, self.architecture, self.settings = model, architecture, settings
        heads = probes.top_heads(settings.heads)
        self.heads = heads
        self.taps: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        for layer in sorted({layer for layer, _ in heads}):
            index = torch.tensor([h for la, h in heads if la == layer])
            self.taps[layer] = (index, probes.coef[layer, index], probes.intercept[layer, index])
        self.last_layer = max(self.taps)
        self.forward_params = [name for name, p in inspect.signature(model.forward).parameters.items()
                               if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        base_params = inspect.signature(base.forward).parameters
        self.cache_arg = "cache" if "cache" in base_params else "past_key_values"
        self._logits: list[Tensor] = []
        self._pending: tuple[list[Any], GateHistory] | None = None
        self._handles = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                         model.register_forward_hook(self._after, with_kwargs=True)]

    def remove(self) -> None:
        """Remove the hooks (the model is then ungated)."""
        for handle in self._handles:
            handle.remove()
        for block in self.architecture.attention_blocks(self.model):
            block.steer_gate = None

    # ---- the shadow pass -----------------------------------------------------------------------------------
    def _tap(self, layer: int, hidden: Tensor) -> None:
        tap = self.taps.get(layer)
        if tap is not None:
            index, coef, intercept = (t.to(hidden.device) for t in tap)
            heads = hidden.float().unflatten(-1, (-1, coef.shape[-1]))[..., index, :]  # [B, T, k, D]
            self._logits.append((heads * coef).sum(dim=-1) + intercept)

    def _stop(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        raise _ShadowDone  # after the deepest gate layer has finished (and its own hooks, e.g. FSDP's, have run)

    @torch.no_grad()
    def _probe_logits(self, inputs: dict[str, Any], shadow: Any) -> Tensor:
        """Each gate head's probe logit at every position of this forward, `[B, T, K]`, from the base model."""
        blocks = self.architecture.attention_blocks(self.model)
        self._logits = []
        for block in blocks:
            block.steer_tap = self._tap
        stop = self.architecture.layer_modules(self.model)[self.last_layer].register_forward_hook(self._stop)
        try:
            self.model.base_model(**inputs, **{self.cache_arg: shadow}, use_cache=shadow is not None)
        except _ShadowDone:
            pass
        finally:
            stop.remove()
            for block in blocks:
                block.steer_tap = None
        logits, self._logits = torch.cat(self._logits, dim=-1), []
        return logits

    def _window_scores(self, logits: Tensor, valid: Tensor, past: tuple[Tensor, Tensor] | None
                       ) -> tuple[Tensor, Tensor]:
        """Mean toxic probability over gate heads of the window-averaged logits, `[B, T]`, and whether the window
        holds a real token at all (not at a left padding position)."""
        width = self.settings.window
        batch, steps, _ = logits.shape
        if past is not None and width > 1:
            past_logits, past_valid = past
            logits = torch.cat([past_logits[:, -(width - 1):], logits], dim=1)
            valid = torch.cat([past_valid[:, -(width - 1):], valid], dim=1)
        missing = width - 1 - (logits.shape[1] - steps)
        if missing > 0:
            logits = torch.cat([logits.new_zeros(batch, missing, logits.shape[2]), logits], dim=1)
            valid = torch.cat([valid.new_zeros(batch, missing), valid], dim=1)
        logits = torch.where(valid[..., None], logits, torch.zeros_like(logits))
        total, count = torch.zeros_like(logits[:, :steps]), torch.zeros_like(logits[:, :steps, 0])
        for offset in range(width):  # a fixed summation order: the same sums however the sequence was split
            total = total + logits[:, offset : offset + steps]
            count = count + valid[:, offset : offset + steps].to(count.dtype)
        return torch.sigmoid(total / count.clamp_min(1)[..., None]).mean(dim=-1), count > 0

    def gate(self, inputs: dict[str, Any], cache: Any, caching: bool) -> tuple[Tensor, Tensor]:
        """Gate and score `[B, T]` for one forward's inputs; with `caching`, the forward's state is stored (in
        `cache`'s gate layers, or pending until the forward's cache exists)."""
        state = gate_state(cache) if cache is not None else None
        past_length = cache.get_seq_length() if cache is not None else 0
        if state is None and past_length > 0:
            raise GateStateError("gated steering needs the gate state that a gated forward leaves in its KV cache; "
                                 "this cache was filled without it (e.g. at alpha 0 or with another gate): start "
                                 "again from the prompt")
        if state is not None and (len(state[0]) != self.last_layer + 1 or
                                  state[1].get_seq_length() != past_length):
            raise GateStateError("the cache's gate state does not match this gate or this cache (the gate settings "
                                 "or alpha changed during generation); start again from the prompt")
        shadow = None
        if state is not None:
            shadow = DynamicCache(config=self.model.config)
            shadow.layers[: len(state[0])] = state[0]
        elif caching:
            shadow = DynamicCache(config=self.model.config)
        logits = self._probe_logits(inputs, shadow)
        batch, steps, _ = logits.shape
        mask = inputs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            valid = mask[:, -steps:].to(device=logits.device) != 0
        else:
            valid = torch.ones(batch, steps, dtype=torch.bool, device=logits.device)
        past = None
        if state is not None and past_length > 0:
            history = state[1]
            past = (history.keys[:, 0], history.values[:, 0, :, 0] != 0)
        score, context = self._window_scores(logits, valid, past)
        if caching:
            history = state[1] if state is not None else GateHistory()
            history.update(logits[:, None], valid[:, None, :, None].to(logits.dtype))
            if state is None:
                layers = shadow.layers[: self.last_layer + 1]
                for layer in layers:
                    layer.destein_gate_shadow = True
                self._pending = (layers, history)
        gate = torch.where(context, self.settings(score), torch.zeros_like(score))  # padding only: no steering
        return gate, score

    # ---- hooks -------------------------------------------------------------------------------------------
    def _named(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        if len(args) > len(self.forward_params):
            raise TypeError("gated steering: call the model with keyword arguments")
        return {**dict(zip(self.forward_params, args)), **kwargs}

    def _before(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        blocks = self.architecture.attention_blocks(module)
        self._pending = None
        for block in blocks:
            block.steer_gate = None
        if float(blocks[0].steer_alpha) == 0:
            return  # nothing to gate: the base model exactly, at no extra cost
        named = self._named(args, kwargs)
        cache = next((named[k] for k in _CACHE_ARGS if named.get(k) is not None), None)
        use_cache = named.get("use_cache")
        if use_cache is None:
            use_cache = getattr(module.config, "use_cache", False)
        inputs = {k: named[k] for k in _INPUTS if named.get(k) is not None}
        gate, _ = self.gate(inputs, cache, caching=cache is not None or bool(use_cache))
        for block in blocks:
            block.steer_gate = gate

    def _after(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        for block in self.architecture.attention_blocks(module):
            block.steer_gate = None
        pending, self._pending = self._pending, None
        if pending is None:
            return
        cache = next((getattr(output, k, None) for k in _CACHE_ARGS if getattr(output, k, None) is not None), None)
        if cache is not None and gate_state(cache) is None:
            if not isinstance(getattr(cache, "layers", None), list):
                raise GateStateError(f"gated steering keeps its state in the KV cache's layers; a "
                                     f"{type(cache).__name__} has none (use a DynamicCache)")
            cache.layers.extend(pending[0])
            cache.layers.append(pending[1])

    @torch.no_grad()
    def values(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Gate and score `[B, T]` at every position of whole sequences (no cache), from the unsteered model."""
        inputs: dict[str, Any] = {"input_ids": input_ids}
        if attention_mask is not None:
            inputs = self.architecture.padded_inputs(input_ids, attention_mask)
        return self.gate(inputs, None, caching=False)
