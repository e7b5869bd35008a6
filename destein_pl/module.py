"""`DeSteinModule`: calibration of a `SteeredCausalLM` as a Lightning `fit`."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from destein_pl.calibration import HeadWeights, head_weights, steering_vectors
from destein_pl.checkpoint import (
    FORMAT,
    METADATA_KEY,
    STEER_KEY_MARK,
    apply_checkpoint_state,
    architecture_signature,
    save_steering,
)
from destein_pl.loading import load_base_model
from destein_pl.plots import probe_heatmap
from destein_pl.probes import HeadProbes, fit_head_probes
from destein_pl.steering import SteeredCausalLM

log = logging.getLogger(__name__)

# Calibration runs a frozen model in eval mode with no optimizer, on purpose: Lightning's warnings about that
# would only confuse.
for _pattern in (r".*module\(s\) in eval mode.*", r".*configure_optimizers. returned .None.*"):
    warnings.filterwarnings("ignore", _pattern)

SIDES = ("toxic", "nontoxic")


class DeSteinModule(L.LightningModule):
    """DeStein as a LightningModule. `fit` over steering pairs calibrates (no gradients): it records each head's
    activations for both sides of every pair, then sets v = mean(non-toxic - toxic) and weights each head by a
    logistic-regression probe's validation accuracy.

    Args:
        base_model: built-in name (`smollm2-135m`), `.gguf` file, model folder or hub id.
        dtype: `float32`, `bfloat16`, `float16`, or None for the stored dtype.
        alpha: steering strength (paper: 0.4 for GPT2-large).
        head_weights: `probe` (each head weighted by its probe accuracy) or `uniform` (all 1; paper ablation).
        top_k_heads: steer only the k heads with the highest probe accuracy (paper Table 11); None for all.
        last_k: activations are averaged over each text's last k tokens.
        val_fraction: share of pairs held out to measure probe accuracy (paper: 4:1 split, 0.2).
        probe_seed: seed of that split.
    """

    def __init__(
        self,
        base_model: str = "smollm2-135m",
        dtype: str | None = None,
        alpha: float = 0.4,
        head_weights: HeadWeights = "probe",
        top_k_heads: int | None = None,
        last_k: int = 8,
        val_fraction: float = 0.2,
        probe_seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold the steering buffers, not the frozen base weights
        # DDP refuses to wrap a module without a trainable parameter; this one is never used and never saved.
        self.ddp_anchor = nn.Parameter(torch.zeros(()))
        self.steered: SteeredCausalLM | None = None
        self.probes: HeadProbes | None = None
        self.pairs_provenance: dict[str, Any] | None = None
        self._recorded: dict[str, list[Tensor]] = {side: [] for side in SIDES}
        self._indices: list[Tensor] = []

    def configure_model(self) -> None:
        if self.steered is None:
            model, tokenizer = load_base_model(self.hparams.base_model, dtype=self.hparams.dtype)
            model.requires_grad_(False)
            self.steered = SteeredCausalLM(model, tokenizer)

    def configure_optimizers(self) -> None:
        return None

    # ---- calibration -------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self.trainer.max_epochs != 1:
            raise ValueError(f"calibration is one pass over the pairs: set trainer.max_epochs=1 "
                             f"(got {self.trainer.max_epochs})")
        steered = self.steered
        steered.set_steering(
            torch.zeros(steered.num_layers, steered.num_heads, steered.head_dim),
            torch.zeros(steered.num_layers, steered.num_heads),
            alpha=0.0,
        )
        self._recorded = {side: [] for side in SIDES}
        self._indices = []

    def on_train_epoch_start(self) -> None:
        self.steered.eval()  # no dropout while recording activations

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        tokenizer = self.steered.tokenizer
        with torch.no_grad():
            for side in SIDES:
                encoded = tokenizer(batch[side], return_tensors="pt", padding=True).to(self.device)
                acts = self.steered.record_activations(
                    encoded["input_ids"], encoded["attention_mask"], last_k=self.hparams.last_k
                )
                self._recorded[side].append(acts)
        self._indices.append(batch["index"].to(self.device))

    def _gathered(self) -> tuple[Tensor, Tensor]:
        """Activations of every pair on every process, each pair once (a distributed sampler repeats some
        pairs to even out the processes), ordered by pair index."""
        index = torch.cat(self._indices)
        toxic, nontoxic = (torch.cat(self._recorded[side]) for side in SIDES)
        if self.trainer.world_size > 1:
            index, toxic, nontoxic = (self.all_gather(t).flatten(0, 1) for t in (index, toxic, nontoxic))
        order = torch.argsort(index, stable=True)
        index, toxic, nontoxic = index[order], toxic[order], nontoxic[order]
        first = torch.ones_like(index, dtype=torch.bool)
        first[1:] = index[1:] != index[:-1]
        return toxic[first].cpu(), nontoxic[first].cpu()

    def on_train_epoch_end(self) -> None:
        # Runs before ModelCheckpoint saves, on every process, so every rank ends with the same steering.
        toxic, nontoxic = self._gathered()
        hp = self.hparams
        vectors = steering_vectors(toxic, nontoxic)
        self.probes = fit_head_probes(toxic, nontoxic, hp.val_fraction, hp.probe_seed)
        weights = head_weights(self.probes.accuracy, hp.head_weights, hp.top_k_heads)
        self.steered.set_steering(vectors, weights, hp.alpha)
        datamodule = getattr(self.trainer, "datamodule", None)
        self.pairs_provenance = datamodule.provenance() if hasattr(datamodule, "provenance") else None
        self._recorded = {side: [] for side in SIDES}
        self._indices = []
        # Every process holds the same numbers: log them once.
        self.log("calibration/pairs", float(len(toxic)), rank_zero_only=True)
        self.log("calibration/mean_probe_accuracy", self.probes.accuracy.mean().item(), rank_zero_only=True)
        for layer, norm in enumerate(vectors.norm(dim=-1).mean(dim=-1).tolist()):
            self.log(f"calibration/vector_norm/layer_{layer:02d}", norm, rank_zero_only=True)
        log.info("calibrated on %d pairs: mean probe accuracy %.3f", len(toxic), self.probes.accuracy.mean())

    # ---- checkpoints -------------------------------------------------------------------------------------
    def steering_metadata(self) -> dict[str, Any]:
        hp = self.hparams
        return {
            "format": FORMAT,
            "base_model": {"name_or_path": hp.base_model, "dtype": hp.dtype},
            "architecture": architecture_signature(self.steered),
            "alpha": round(self.steered.alpha, 6),
            "options": {k: hp[k] for k in ("head_weights", "top_k_heads", "last_k", "val_fraction", "probe_seed")},
            "pairs": self.pairs_provenance,
            "mean_probe_accuracy": None if self.probes is None else round(self.probes.accuracy.mean().item(), 6),
        }

    def _probe_arrays(self) -> dict[str, Tensor]:
        if self.probes is None:
            return {}
        return {"probe_accuracy": self.probes.accuracy, "probe_coef": self.probes.coef,
                "probe_intercept": self.probes.intercept}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if STEER_KEY_MARK in k}
        checkpoint["state_dict"].update({f"probes.{k}": v for k, v in self._probe_arrays().items()})
        checkpoint[METADATA_KEY] = self.steering_metadata()
        # The data module's arguments hold a local file path; the pairs' provenance is in the metadata instead.
        for key in ("datamodule_hyper_parameters", "datamodule_hparams_name"):
            checkpoint.pop(key, None)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.configure_model()
        # Check the checkpoint fits this model before Lightning loads its buffers (non-strictly).
        apply_checkpoint_state(self.steered, checkpoint["state_dict"], checkpoint.get(METADATA_KEY), "checkpoint")

    def export_steering(self, ckpt_path: Path) -> None:
        """Write `<stem>.safetensors`, `<stem>.json` and `<stem>-probes.png` beside a Lightning checkpoint."""
        save_steering(ckpt_path.with_suffix(".safetensors"), self.steered, self.steering_metadata(),
                      self._probe_arrays())
        if self.probes is not None:
            probe_heatmap(self.probes.accuracy, ckpt_path.with_name(f"{ckpt_path.stem}-probes.png"),
                          title=f"{self.hparams.base_model}: probe accuracy per head")
