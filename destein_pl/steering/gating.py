"""Probe-gated steering: steer a row only as much as the calibrated probes call its context toxic.

The paper steers every context, which costs fluency on clean prompts too. The calibrated probes are linear
classifiers (toxic vs non-toxic) over the very head activations being steered; here they decide, per sequence row
and per position, how much of alpha that row gets.

**The score.** The `heads` heads with the most accurate probes (ties: lower (layer, head) first; among the first
`layers` layers when that is set) are the gate heads.
At every position, each gate head's probe logit `coef . a + intercept` is taken on the head's activation `a` (its
slice of the output projection's input), and averaged over the last `window` positions of the row (padding
excluded). As the probes were fit on activations averaged over each text's last `last_k` tokens, and a linear
probe's logit of a mean is the mean of its logits, this is the probe applied to exactly the feature it was fit on
when `window == last_k` (default 8 for both). The score is the mean over gate heads of the sigmoid of those
logits: the probes' mean toxic probability for the context up to and including the position.

**The gate.** `hard`: 1 where score >= threshold, else 0; `smooth`: `sigmoid((score - threshold) / temperature)`;
with a `floor` f > 0, `f + (1 - f) * g`. All are monotone non-decreasing in the score and lie in [0, 1]. The gate multiplies alpha for that row and
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

**Which probes.** `probes: context` (default) reads the probes calibration fits on the pairs without their cues
(`Probes`: coefficients `[L, H, D]`, intercepts `[L, H]` and accuracies `[L, H]`; tensors `gate_probe_coef`,
`gate_probe_intercept`, `gate_probe_accuracy`, under `probes.` in a Lightning `.ckpt`): how toxic the context is.
`probes: continuation` reads the probes `destein gate` fits on the model's own continuations
(`continuation_probe_*`; `destein_pl.calibration.continuation_probes`): how likely what follows is toxic. The
settings are stored under `options.gate` in the metadata. No activation scaling is needed: `calibration.probes` fits its
logistic regressions on the raw (unstandardized) float activations, so coefficients and intercepts apply to raw
activations as they are (metadata `probe_scaling: none`; a checkpoint naming any other scaling is refused).

With `mode: none` (the default, and what checkpoints without gate settings load as) no hook is installed and the
model computes exactly what it computed before gating existed. Alpha 0 skips the shadow pass (nothing to gate).
Only a dynamic (growing) cache is supported for cached generation.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from destein_pl.steering.architectures import Architecture
from destein_pl.steering.attention import Scale
from destein_pl.steering.probes import Probes

GateMode = Literal["none", "hard", "smooth"]
GATE_MODES: tuple[str, ...] = ("none", "hard", "smooth")
GateProbes = Literal["context", "continuation"]
GATE_PROBES: tuple[str, ...] = ("context", "continuation")
"""Which probes the gate reads: `context` (fit at calibration on the pairs without cues: is the context toxic?) or
`continuation` (fit on the model's own sampled continuations: will what follows be toxic?
`destein_pl.calibration.continuation_probes`)."""
MAX_WINDOW = 4096
"""The longest gate window, in positions (the gate keeps `window - 1` positions of probe logits per row)."""
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
        layers: the gate heads come from the first `layers` decoder layers only (None: from all). The shadow pass
            runs up to the deepest gate head's layer, so a shallow gate costs less (and its probes are less
            accurate: `python -m benchmarks gate_depth` measures both).
        floor: the least share of alpha a row gets, in [0, 1): the gate is `floor + (1 - floor) * g`, so that a
            toxic continuation after a clean-looking context is still steered a little (0: none).
        probes: which probes score the context: `context` (the calibration's, fit on the pairs without cues: how
            toxic the context is) or `continuation` (fit on the model's own continuations by `destein gate`: how
            likely what follows is toxic).
    """

    mode: GateMode = "none"
    threshold: float = 0.5
    temperature: float = 0.05
    heads: int = 16
    window: int = 8
    layers: int | None = None
    floor: float = 0.0
    probes: GateProbes = "context"

    def __post_init__(self) -> None:
        if self.mode not in GATE_MODES:
            raise ValueError(f"gate must be one of {', '.join(GATE_MODES)}; got {self.mode!r}")
        if not (math.isfinite(self.threshold) and 0 <= self.threshold <= 1):
            raise ValueError(f"gate threshold must be in [0, 1] (a mean toxic probability), got {self.threshold}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"gate temperature must be a finite number > 0, got {self.temperature}")
        if int(self.heads) != self.heads or self.heads < 1:
            raise ValueError(f"gate heads must be an integer >= 1, got {self.heads}")
        if int(self.window) != self.window or not 1 <= self.window <= MAX_WINDOW:
            raise ValueError(f"gate window must be an integer from 1 to {MAX_WINDOW} (positions), got {self.window}")
        if self.layers is not None and (isinstance(self.layers, bool) or int(self.layers) != self.layers
                                        or self.layers < 1):
            raise ValueError(f"gate layers must be an integer >= 1 (the first decoder layers) or None (all), "
                             f"got {self.layers}")
        if not (math.isfinite(self.floor) and 0 <= self.floor < 1):
            raise ValueError(f"gate floor must be in [0, 1) (the least share of alpha a row gets), got {self.floor}")
        if self.probes not in GATE_PROBES:
            raise ValueError(f"gate probes must be one of {', '.join(GATE_PROBES)}; got {self.probes!r}")

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def metadata(self) -> dict[str, Any]:
        """The settings as checkpoint metadata and `results.json` record them; `layers`, `floor` and `probes` only
        when not their defaults, so that the steering digest of a gate without them is what it was before they
        existed."""
        later = {"layers": None, "floor": 0.0, "probes": "context"}
        settings = {k: v for k, v in asdict(self).items() if not (k in later and v == later[k])}
        return {**settings, "probe_scaling": PROBE_SCALING}

    @classmethod
    def from_metadata(cls, data: Any) -> GateSettings:
        """Settings from checkpoint metadata (`options.gate`, a mapping of these fields); missing: `none`."""
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ValueError(f"options.gate must be a mapping of {', '.join(f.name for f in fields(cls))}; got "
                             f"{type(data).__name__} {data!r}")
        scaling = data.get("probe_scaling", PROBE_SCALING)
        if scaling != PROBE_SCALING:
            raise ValueError(f"the gate's probes expect activation scaling {scaling!r}, which this version does not "
                             f"know (it applies probes to raw activations: {PROBE_SCALING!r})")
        known = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(data) - set(known) - {"probe_scaling"})
        if unknown:
            raise ValueError(f"options.gate has unknown keys {unknown}; known: {', '.join(known)}")
        for name in ("threshold", "temperature", "heads", "window", "layers", "floor"):
            value = data.get(name, 0)
            if name == "layers" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"options.gate.{name} must be a number, got {value!r}")
        for name, accepted in (("mode", GATE_MODES), ("probes", GATE_PROBES)):
            if not isinstance(data.get(name, accepted[0]), str):
                raise ValueError(f"options.gate.{name} must be one of {', '.join(accepted)}, got {data[name]!r}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def __call__(self, score: Tensor) -> Tensor:
        """The gate, in [`floor`, 1], for scores (mean toxic probabilities); monotone non-decreasing."""
        if self.mode == "hard":
            gate = (score >= self.threshold).to(score.dtype)
        elif self.mode == "smooth":
            gate = torch.sigmoid((score - self.threshold) / self.temperature)
        else:
            return torch.ones_like(score)
        return gate if self.floor == 0 else self.floor + (1 - self.floor) * gate


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
    """The gate of one wrapped model, a modifier of its steering: forward hooks on the causal LM run the shadow pass
    and hold the forward's gate (`[batch, seq]`), which every steered attention block reads through `scale()`. Holds
    references only to the model (and tensors), so a deep copy of the model carries a coherent copy of its gate."""

    def __init__(self, model: nn.Module, architecture: Architecture, settings: GateSettings, probes: Probes):
        if not settings.enabled:
            raise ValueError("ProbeGate needs a gate mode other than 'none'")
        base = model.base_model
        if base is model:
            raise ValueError(f"{type(model).__name__} exposes no base model to run the gate's shadow pass on")
        self.model, self.architecture, self.settings = model, architecture, settings
        if settings.layers is not None and settings.layers > probes.shape[0]:
            raise ValueError(f"gate layers is {settings.layers}, but the probes cover {probes.shape[0]} layers")
        heads = probes.top_heads(settings.heads, settings.layers)
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
        self._scale: Scale = True
        self._pending: tuple[list[Any], GateHistory] | None = None
        self._handles = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                         model.register_forward_hook(self._after, with_kwargs=True)]

    def remove(self) -> None:
        """Remove the hooks (the model is then ungated)."""
        for handle in self._handles:
            handle.remove()
        self._scale = True

    def scale(self) -> Scale:
        """The current forward's gate `[batch, seq]`; True (all of alpha) outside a gated forward, False (nothing)
        during the shadow pass."""
        return self._scale

    # ---- the shadow pass -----------------------------------------------------------------------------------
    def _tap(self, layer: int) -> Any:
        index, coef, intercept = self.taps[layer]

        def tap(module: nn.Module, args: tuple[Any, ...]) -> None:
            hidden = args[0]
            heads = hidden.float().unflatten(-1, (-1, coef.shape[-1]))[..., index.to(hidden.device), :]  # [B,T,k,D]
            self._logits.append((heads * coef.to(hidden.device)).sum(dim=-1) + intercept.to(hidden.device))

        return tap

    def _stop(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        raise _ShadowDone  # after the deepest gate layer has finished (and its own hooks, e.g. FSDP's, have run)

    @torch.no_grad()
    def _probe_logits(self, inputs: dict[str, Any], shadow: Any) -> Tensor:
        """Each gate head's probe logit at every position of this forward, `[B, T, K]`, from the base model."""
        projections = self.architecture.projections(self.model)
        self._logits, self._scale = [], False  # steering off: the taps read the unsteered activations
        handles = [projections[layer].register_forward_pre_hook(self._tap(layer)) for layer in self.taps]
        handles.append(self.architecture.layer_modules(self.model)[self.last_layer].register_forward_hook(self._stop))
        try:
            self.model.base_model(**inputs, **{self.cache_arg: shadow}, use_cache=shadow is not None)
        except _ShadowDone:
            pass
        finally:
            for handle in handles:
                handle.remove()
            self._scale = True
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
        if cache is not None and not isinstance(cache, DynamicCache):
            raise GateStateError(f"gated steering keeps its state in a dynamic KV cache; got a {type(cache).__name__} "
                                 f"(e.g. generate(cache_implementation='static')): use the default cache")
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
        self._pending, self._scale = None, True
        if float(self.architecture.attention_blocks(module)[0].steer_alpha) == 0:
            return  # nothing to gate: the base model exactly, at no extra cost
        named = self._named(args, kwargs)
        cache = next((named[k] for k in _CACHE_ARGS if named.get(k) is not None), None)
        use_cache = named.get("use_cache")
        if use_cache is None:
            use_cache = getattr(module.config, "use_cache", False)
        inputs = {k: named[k] for k in _INPUTS if named.get(k) is not None}
        self._scale, _ = self.gate(inputs, cache, caching=cache is not None or bool(use_cache))

    def _after(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        self._scale = True
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
