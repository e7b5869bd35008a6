"""Calibration in plain Python: steering pairs in, detoxification vectors and head weights out.

`Calibrator` is the two steps: `record` (one batch of pairs: each head's activations of both sides) and `finish`
(vectors, probes and head weights from everything recorded, optionally gathered from several processes first).
`calibrate()` runs them over a list of pairs in one process; the Lightning `fit` calls the same steps from its hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from destein_pl.calibration.pairs import NONTOXIC_CUE, TOXIC_CUE, PairsDataset, SteeringPair
from destein_pl.calibration.probes import fit_head_probes
from destein_pl.calibration.vectors import HeadWeights, head_weights, steering_vectors
from destein_pl.steering.checkpoint import FORMAT, PROBES_PREFIX, save_steering
from destein_pl.steering.gating import GateSettings
from destein_pl.steering.model import SteeredCausalLM
from destein_pl.steering.operators import operator_for
from destein_pl.steering.probes import GATE_PREFIX, HEAD_WEIGHT_PREFIX, Probes

SIDES = ("toxic", "nontoxic")
PLAIN_SIDES = ("toxic_plain", "nontoxic_plain")
"""The pairs without their cues: the gate's probes are fit on these, since the gate reads contexts without cues."""


@dataclass
class CalibrationOptions:
    """How pairs become steering.

    Args:
        alpha: steering strength stored with the result (paper: 0.4 for GPT2-large).
        head_weights: `probe` (each head weighted by its probe's validation accuracy) or `uniform` (all 1).
        top_k_heads: steer only the k heads with the best probes (paper Table 11); None for all.
        last_k: activations are averaged over each text's last k tokens.
        val_fraction: share of pairs held out to measure probe accuracy (paper: 4:1 split, 0.2).
        probe_seed: seed of that split.
        fusion: the steering operator at inference: `paper` (`h + alpha * w * v`, the default),
            `norm_preserving` or `published` (the authors' code); see `destein_pl.steering.operators`.
        gate: whether and how the calibrated probes gate the steering per row (default `none`: steer every
            context); see `destein_pl.steering.gating`.
    """

    alpha: float = 0.4
    head_weights: HeadWeights = "probe"
    top_k_heads: int | None = None
    last_k: int = 8
    val_fraction: float = 0.2
    probe_seed: int = 0
    fusion: str = "paper"
    gate: GateSettings = field(default_factory=GateSettings)

    def __post_init__(self) -> None:
        operator_for(self.fusion)
        if not isinstance(self.gate, GateSettings):
            raise TypeError(f"gate must be GateSettings, got {type(self.gate).__name__}")
        if self.gate.probes != "context":
            raise ValueError(f"gate probes {self.gate.probes!r} are fit on the model's continuations after calibration "
                             f"(`destein gate`); calibrate with the default gate probes, 'context'")
        if self.head_weights not in ("probe", "uniform"):
            raise ValueError(f"head_weights must be 'probe' or 'uniform', got {self.head_weights!r}")
        if self.last_k < 1:
            raise ValueError(f"last_k must be at least 1, got {self.last_k}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be strictly between 0 and 1, got {self.val_fraction}")
        if self.top_k_heads is not None and self.top_k_heads < 1:
            raise ValueError(f"top_k_heads must be at least 1 (or None for all heads), got {self.top_k_heads}")
        if not (self.alpha == self.alpha and abs(self.alpha) != float("inf")):
            raise ValueError(f"alpha must be a finite number, got {self.alpha}")

    def metadata(self) -> dict[str, Any]:
        keys = ("head_weights", "top_k_heads", "last_k", "val_fraction", "probe_seed", "fusion")
        return {**{k: getattr(self, k) for k in keys}, "gate": self.gate.metadata()}


@dataclass
class Calibration:
    """The result of calibrating on steering pairs."""

    vectors: Tensor
    """Detoxification vectors `[L, H, D]`: mean over pairs of (non-toxic - toxic) activations."""
    head_weights: Tensor
    """Per-head weights `[L, H]` (probe accuracy, or 1 for uniform weighting; 0 outside the top k heads)."""
    probes: Probes
    """Probes on the cued pairs: their accuracies weigh the heads (the paper's)."""
    options: CalibrationOptions
    num_pairs: int
    pairs: dict[str, Any] | None = None
    """Where the pairs came from (file name and sha256, or hub id; m; seed; cues), for the checkpoint."""
    base_model: dict[str, Any] = field(default_factory=dict)
    """`{"name_or_path", "dtype"}` of the calibrated model, so a checkpoint can rebuild it."""
    gate_probes: Probes | None = None
    """Probes on the same pairs without cues, which the gate uses; None: the pairs had no cues, so `probes`.
    Probes fit with cues learn the cue (validation accuracy near 1) and tell little about a context without one."""

    @property
    def probes_for_gate(self) -> Probes:
        return self.gate_probes or self.probes

    @property
    def alpha(self) -> float:
        return self.options.alpha

    def apply(self, steered: SteeredCausalLM, alpha: float | None = None) -> SteeredCausalLM:
        """Set this steering (with its fusion variant and gate) on a model (at `alpha`, default the calibrated one)
        and return the model."""
        steered.set_steering(self.vectors, self.head_weights, self.alpha if alpha is None else alpha)
        steered.configure(fusion=self.options.fusion, gate=self.options.gate, gate_probes=self.probes_for_gate)
        return steered

    def metadata(self, steered: SteeredCausalLM) -> dict[str, Any]:
        """What a checkpoint records beside the tensors."""
        return {
            "format": FORMAT,
            "base_model": self.base_model,
            "architecture": steered.signature(),
            "alpha": round(self.alpha, 6),
            "options": self.options.metadata(),
            "pairs": self.pairs,
            "mean_probe_accuracy": round(self.probes.accuracy.mean().item(), 6),
        }

    def probe_arrays(self, prefix: str = "") -> dict[str, Tensor]:
        """The head-weight probes (`probe_*`) and the gate's (`gate_probe_*`), each name after `prefix`."""
        arrays = {**self.probes.arrays(HEAD_WEIGHT_PREFIX), **self.probes_for_gate.arrays(GATE_PREFIX)}
        return {f"{prefix}{k}": v for k, v in arrays.items()}

    def lightning_arrays(self) -> dict[str, Tensor]:
        """The probes as a Lightning checkpoint's state dict holds them."""
        return self.probe_arrays(PROBES_PREFIX)

    def save(self, path: str | Path, steered: SteeredCausalLM, heatmap: bool = True) -> Path:
        """Write `<path>.safetensors` with `<path>.json`, and `<stem>-probes.png` (probe accuracy per head),
        for a model steered with this calibration; load it with `SteeredCausalLM.from_checkpoint`."""
        path = Path(path).with_suffix(".safetensors")
        save_steering(path, {**steered.steering_tensors(), **self.probe_arrays()}, self.metadata(steered))
        if heatmap:
            from destein_pl.plots import probe_heatmap

            probe_heatmap(self.probes.accuracy, path.with_name(f"{path.stem}-probes.png"),
                          title=f"{self.base_model.get('name_or_path')}: probe accuracy per head")
        return path


Gather = Callable[[Tensor], Tensor]
"""Collects a tensor from every process, `[world_size, *shape]` (e.g. `LightningModule.all_gather`)."""


class Calibrator:
    """Records activations of pairs batch by batch, then turns them into a `Calibration`.

    While recording, the model's steering is zero, so that activations are the base model's.
    """

    def __init__(self, steered: SteeredCausalLM, options: CalibrationOptions | None = None) -> None:
        self.steered = steered
        self.options = options or CalibrationOptions()
        self._recorded: dict[str, list[Tensor]] = {side: [] for side in SIDES + PLAIN_SIDES}
        self._indices: list[Tensor] = []
        steered.configure(fusion="paper", gate=GateSettings())
        steered.set_steering(torch.zeros(steered.num_layers, steered.num_heads, steered.head_dim),
                             torch.zeros(steered.num_layers, steered.num_heads), alpha=0.0)

    @torch.no_grad()
    def record(self, toxic: Sequence[str], nontoxic: Sequence[str], index: Tensor | Sequence[int],
               plain: tuple[Sequence[str], Sequence[str]] | None = None) -> None:
        """Record both sides of a batch of pairs; `index` numbers the pairs (repeats are counted once). `plain`: the
        same sides without their cues, for the gate's probes (None: the sides have no cues). Every batch of a
        calibration must give `plain`, or none."""
        steered, tokenizer = self.steered, self.steered.tokenizer
        if tokenizer is None:
            raise ValueError("calibration needs the SteeredCausalLM's tokenizer; build it with one")
        steered.eval()  # no dropout while recording activations
        device = steered.device
        texts_of = dict(zip(SIDES, (toxic, nontoxic)))
        if plain is not None:
            texts_of.update(zip(PLAIN_SIDES, plain))
        for side, texts in texts_of.items():
            encoded = tokenizer(list(texts), return_tensors="pt", padding=True).to(device)
            self._recorded[side].append(steered.record_activations(
                encoded["input_ids"], encoded["attention_mask"], last_k=self.options.last_k))
        self._indices.append(torch.as_tensor(index, device=device))

    def _collected(self, gather: Gather | None) -> dict[str, Tensor]:
        """Every recorded pair per side (from every process with `gather`), each pair once, ordered by index."""
        if not self._indices:
            raise ValueError("no pairs were recorded; calibration needs at least 2 pairs")
        index = torch.cat(self._indices)
        sides = {side: torch.cat(parts) for side, parts in self._recorded.items() if parts}
        if len(sides) not in (len(SIDES), len(SIDES + PLAIN_SIDES)) or any(
                len(t) != len(index) for t in sides.values()):
            raise ValueError("every recorded batch must give the plain (uncued) texts, or none")
        if gather is not None:
            index = gather(index).flatten(0, 1)
            sides = {side: gather(t).flatten(0, 1) for side, t in sides.items()}
        order = torch.argsort(index, stable=True)
        index = index[order]
        first = torch.ones_like(index, dtype=torch.bool)
        first[1:] = index[1:] != index[:-1]
        return {side: t[order][first].cpu() for side, t in sides.items()}

    def finish(self, gather: Gather | None = None, pairs: dict[str, Any] | None = None,
               base_model: dict[str, Any] | None = None) -> Calibration:
        """Vectors, probes and head weights from what was recorded, set on the model at the calibrated alpha.

        With `gather`, every process passes its share and gets the same result. `pairs` and `base_model` are
        provenance for the checkpoint (default base model: the model's own name, stored dtype).
        """
        sides = self._collected(gather)
        toxic, nontoxic = sides["toxic"], sides["nontoxic"]
        opts = self.options
        self._recorded, self._indices = {side: [] for side in SIDES + PLAIN_SIDES}, []
        probes = fit_head_probes(toxic, nontoxic, opts.val_fraction, opts.probe_seed)
        gate_probes = (fit_head_probes(sides["toxic_plain"], sides["nontoxic_plain"], opts.val_fraction,
                                       opts.probe_seed) if "toxic_plain" in sides else None)
        calibration = Calibration(
            vectors=steering_vectors(toxic, nontoxic),
            head_weights=head_weights(probes.accuracy, opts.head_weights, opts.top_k_heads),
            probes=probes, options=opts, num_pairs=len(toxic), pairs=pairs,
            base_model=base_model or {"name_or_path": self.steered.base_model, "dtype": None},
            gate_probes=gate_probes,
        )
        calibration.apply(self.steered)
        return calibration


def calibrate(
    steered: SteeredCausalLM,
    pairs: Sequence[SteeringPair],
    options: CalibrationOptions | None = None,
    batch_size: int = 8,
    cues: tuple[str, str] | None = (TOXIC_CUE, NONTOXIC_CUE),
    provenance: dict[str, Any] | None = None,
    progress: bool = True,
) -> Calibration:
    """Calibrate `steered` on steering pairs in this process, set the result on it, and return it.

    `cues` are prefixed to the (toxic, non-toxic) sides (the paper's; None for none); `batch_size` pairs run per
    forward pass. Gives the same steering as `destein fit` on the same pairs and batch size.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    toxic_cue, nontoxic_cue = cues or ("", "")
    dataset = PairsDataset(list(pairs), toxic_cue, nontoxic_cue)
    calibrator = Calibrator(steered, options)
    starts = range(0, len(dataset), batch_size)
    for start in tqdm(starts, desc="calibrating", unit="batch", disable=not progress):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        plain = ([i["toxic_plain"] for i in items], [i["nontoxic_plain"] for i in items]) if "toxic_plain" in items[0] else None
        calibrator.record([i["toxic"] for i in items], [i["nontoxic"] for i in items], [i["index"] for i in items],
                          plain)
    return calibrator.finish(pairs=provenance)
