"""`DeSteinModule`: the Lightning adapter. `fit` feeds steering pairs to a `Calibrator`, `test` feeds prompts to an
`Evaluator`; both do their work in plain Python (`destein_pl.calibration`, `destein_pl.evaluation`)."""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from destein_pl.baselines import Method
from destein_pl.calibration.calibrate import Calibration, CalibrationOptions, Calibrator
from destein_pl.calibration.vectors import HeadWeights
from destein_pl.evaluation.config import EvaluationConfig
from destein_pl.evaluation.evaluator import Evaluator
from destein_pl.evaluation.metrics import METRIC_NAMES
from destein_pl.evaluation.runs import SUBSETS
from destein_pl.lightning.strategies import DeSteinFSDPStrategy
from destein_pl.steering.checkpoint import METADATA_KEY, STEER_KEY_MARK
from destein_pl.steering.gating import GateSettings
from destein_pl.steering.loading import device_map_for, load_base_model
from destein_pl.steering.model import SteeredCausalLM
from destein_pl.steering.sharding import load_sharded, world_mesh

log = logging.getLogger(__name__)

# Calibration runs a frozen model in eval mode with no optimizer, on purpose: Lightning's warnings about that
# would only confuse.
for _pattern in (r".*module\(s\) in eval mode.*", r".*configure_optimizers. returned .None.*"):
    warnings.filterwarnings("ignore", _pattern)


class DeSteinModule(L.LightningModule):
    """DeStein as a LightningModule. `fit` over steering pairs calibrates (no gradients): it records each head's
    activations for both sides of every pair, then sets v = mean(non-toxic - toxic) and weights each head by a
    logistic-regression probe's validation accuracy. `test` over prompts evaluates the base and the steered
    model (expected maximum toxicity, toxicity probability, perplexity, Dist-n) and writes the results.

    Args:
        base_model: built-in name (`smollm2-135m`), `.gguf` file, model folder or hub id.
        dtype: `float32`, `bfloat16`, `float16`, or None for the stored dtype.
        alpha: steering strength (paper: 0.4 for GPT2-large).
        head_weights: `probe` (each head weighted by its probe accuracy) or `uniform` (all 1; paper ablation).
        top_k_heads: steer only the k heads with the highest probe accuracy (paper Table 11); None for all.
        last_k: activations are averaged over each text's last k tokens.
        val_fraction: share of pairs held out to measure probe accuracy (paper: 4:1 split, 0.2).
        probe_seed: seed of that split.
        fusion: the steering operator (`destein_pl.steering.operators`): `paper` (`h + alpha * w * v` before the
            output projection), `norm_preserving` (the same shift, then each head's output rescaled to its
            unsteered norm) or `published` (the authors' code: a normalized shift of the attention output after the
            projection). None: the checkpoint's when testing, `paper` when calibrating.
        gate: how the calibrated probes gate the steering (`GateSettings`: `mode` `none`, `hard` or `smooth`,
            `threshold`, `temperature`, `heads`, `window`, `layers`): each row's alpha is scaled by a gate in [0, 1] from the
            probes' mean toxic probability on the row's context (read from the unsteered model, updated at every
            generated token). None: the checkpoint's gate when testing, `none` when calibrating; when given, the
            whole setting replaces the checkpoint's.
        evaluation: how `test` generates and scores (RealToxicityPrompts protocol; see `EvaluationConfig`).
        method: `test` only: a baseline method evaluated in place of DeStein, at the evaluation's alphas (0 is the
            base model): a short name (`prompting`, `word_filter`, `actadd`, `iti`) or `class_path`/`init_args`
            (`destein_pl.baselines`; `--model.method.help NAME` lists its options). None: DeStein.
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
        fusion: str | None = None,
        gate: GateSettings | None = None,
        evaluation: EvaluationConfig = EvaluationConfig(),  # noqa: B008 (a dataclass, never mutated)
        method: Method | str | None = None,
    ) -> None:
        super().__init__()
        # Evaluation settings do not belong in a checkpoint; the gate's are in its metadata (as plain values).
        self.save_hyperparameters(ignore=["evaluation", "gate", "method"])
        if gate is not None and not gate.enabled and gate != GateSettings():
            changed = {k: v for k, v in asdict(gate).items() if v != getattr(GateSettings(), k)}
            raise ValueError(f"model.gate: {changed} given with mode 'none' (no gate); set model.gate.mode to hard or "
                             f"smooth, or leave the other gate options out")
        self.fusion, self.gate = fusion, gate
        """What `test` puts in place of the checkpoint's fusion and gate (None: keep the checkpoint's)."""
        self.options = CalibrationOptions(alpha, head_weights, top_k_heads, last_k, val_fraction, probe_seed,
                                          fusion or "paper", gate or GateSettings())
        self.evaluation = evaluation
        self.method = method
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold the steering buffers, not the frozen base weights
        # DDP refuses to wrap a module without a trainable parameter; this one is never used and never saved.
        self.ddp_anchor = nn.Parameter(torch.zeros(()))
        self.steered: SteeredCausalLM | None = None
        self.calibrator: Calibrator | None = None
        self.calibration: Calibration | None = None
        self.evaluator: Evaluator | None = None
        self.checkpoint_source = "checkpoint"
        """How errors name the checkpoint that `test` loads (the CLI sets its path)."""
        self.steering_loaded = False
        """Whether `test` runs a checkpoint's steering (set by `apply_steering`)."""
        self.alpha_override: float | None = None
        """The alpha `test` evaluates in place of the checkpoint's: `--model.alpha` given on the command line (the CLI
        sets it; the config's `model.alpha` is calibration's)."""

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, map_location: Any = None, hparams_file: Any = None,
                             strict: bool | None = None, weights_only: bool | None = None,
                             **kwargs: Any) -> DeSteinModule:
        """Lightning's loader, restricted to tensors and plain values (local or remote): a checkpoint never runs
        code. Prefer `SteeredCausalLM.from_checkpoint` for a ready-to-generate model."""
        if weights_only is False:
            raise ValueError("steering checkpoints hold tensors and plain values only; weights_only=False is refused")
        return super().load_from_checkpoint(checkpoint_path, map_location, hparams_file, strict, weights_only=True,
                                            **kwargs)

    def configure_model(self) -> None:
        """Load the base model once per process, straight onto this process's device in the requested dtype; under
        `destein_fsdp`, sharded over the processes."""
        if self.steered is not None:
            return
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, FSDPStrategy):
            raise ValueError("Lightning's `fsdp` strategy would gather the whole model at once; use "
                            "--trainer.strategy destein_fsdp (one FSDP2 unit per decoder layer)")
        base, dtype = self.hparams.base_model, self.hparams.dtype
        if isinstance(strategy, DeSteinFSDPStrategy):
            model, tokenizer = load_sharded(base, world_mesh(strategy.root_device), strategy.root_device, dtype,
                                            strategy.reshard_after_forward)
        else:
            device = strategy.root_device if strategy is not None else None
            model, tokenizer = load_base_model(base, dtype=dtype, device_map=device_map_for(device))
        self.steered = SteeredCausalLM(model, tokenizer, base_model=base)
        # Every process loaded the same frozen weights: DDP must not broadcast them (26 GB for a 13B model).
        self._ddp_params_and_buffers_to_ignore = [
            name for name, _ in (*self.named_parameters(), *self.named_buffers()) if name != "ddp_anchor"]

    def configure_optimizers(self) -> None:
        return None

    # ---- calibration -------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self.method is not None:
            raise ValueError("model.method is a baseline evaluated by `destein test`; `fit` calibrates DeStein only")
        if self.trainer.max_epochs != 1:
            raise ValueError(f"calibration is one pass over the pairs: set trainer.max_epochs=1 "
                             f"(got {self.trainer.max_epochs})")
        self.calibrator = Calibrator(self.steered, self.options)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        plain = (batch["toxic_plain"], batch["nontoxic_plain"]) if "toxic_plain" in batch else None
        self.calibrator.record(batch["toxic"], batch["nontoxic"], batch["index"], plain)

    def on_train_epoch_end(self) -> None:
        # Runs before the checkpoint is written, on every process, so every rank ends with the same steering.
        datamodule = getattr(self.trainer, "datamodule", None)
        pairs = datamodule.pairs_provenance() if hasattr(datamodule, "pairs_provenance") else None
        gather = self.all_gather if self.trainer.world_size > 1 else None
        self.calibration = calibration = self.calibrator.finish(
            gather, pairs=pairs, base_model={"name_or_path": self.hparams.base_model, "dtype": self.hparams.dtype})
        # Every process holds the same numbers: log them once.
        accuracy = calibration.probes.accuracy.mean().item()
        self.log("calibration/pairs", float(calibration.num_pairs), rank_zero_only=True)
        self.log("calibration/mean_probe_accuracy", accuracy, rank_zero_only=True)
        for layer, norm in enumerate(calibration.vectors.norm(dim=-1).mean(dim=-1).tolist()):
            self.log(f"calibration/vector_norm/layer_{layer:02d}", norm, rank_zero_only=True)
        log.info("calibrated on %d pairs: mean probe accuracy %.3f", calibration.num_pairs, accuracy)

    # ---- checkpoints -------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if STEER_KEY_MARK in k}
        if self.calibration is not None:
            checkpoint["state_dict"].update(self.calibration.lightning_arrays())
            checkpoint[METADATA_KEY] = self.calibration.metadata(self.steered)
        # The data module's arguments hold a local file path; the pairs' provenance is in the metadata instead.
        for key in ("datamodule_hyper_parameters", "datamodule_hparams_name"):
            checkpoint.pop(key, None)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.configure_model()
        recorded = (checkpoint.get(METADATA_KEY) or {}).get("base_model") or {}
        if recorded.get("name_or_path") not in (None, self.hparams.base_model):
            log.warning("%s was calibrated on %r; evaluating it on model.base_model %r (the architecture is checked)",
                        self.checkpoint_source, recorded["name_or_path"], self.hparams.base_model)
        # Check the checkpoint fits this model before Lightning loads its buffers (non-strictly).
        self.apply_steering(checkpoint["state_dict"], checkpoint.get(METADATA_KEY), self.checkpoint_source)

    def apply_steering(self, tensors: dict[str, Any], metadata: dict[str, Any] | None, source: str) -> None:
        """Load a checkpoint's steering into the model (`SteeredCausalLM.load_steering`), then put `fusion` and
        `gate`, where given, in place of the checkpoint's."""
        self.steered.load_steering(tensors, metadata, source)
        self.steered.configure(fusion=self.fusion, gate=self.gate)
        self.steering_loaded = True

    def export_steering(self, ckpt_path: Path) -> None:
        """Write `<stem>.safetensors`, `<stem>.json` and `<stem>-probes.png` beside a Lightning checkpoint."""
        self.calibration.save(ckpt_path.with_suffix(".safetensors"), self.steered)

    # ---- evaluation --------------------------------------------------------------------------------------
    def on_test_start(self) -> None:
        strategy = self.trainer.strategy
        shard = self.evaluation.shard_perplexity_model and self.trainer.world_size > 1
        mesh = world_mesh(strategy.root_device) if shard else None
        self.check_test_options()
        if self.method is not None:
            self.steered.set_method(self.method)
        self.evaluator = Evaluator(self.steered, self.evaluation, rank=self.global_rank,
                                   world_size=self.trainer.world_size, barrier=strategy.barrier, mesh=mesh)
        loaders = self.trainer.test_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        self.evaluator.start(loader.dataset.prompts)

    def changed_steering_options(self) -> list[str]:
        """The steering options given other than their defaults (`model.fusion`, `model.gate`), as the CLI names
        them."""
        changed = [f"model.fusion {self.fusion!r}"] if self.fusion not in (None, "paper") else []
        if self.gate is not None and self.gate != GateSettings():
            changed.append(f"model.gate (mode {self.gate.mode!r})")
        return changed

    def check_test_options(self) -> None:
        """Refuse what `test` could not act on: a fusion or gate with a baseline method or without a checkpoint's
        steering, an alpha given with alphas that leave it out, and a steered alpha over all-zero steering; then
        set the alpha given on the command line."""
        options = self.changed_steering_options()
        changed, one = " and ".join(options), len(options) == 1
        if options and self.method is not None:
            raise ValueError(f"{changed} {'shapes' if one else 'shape'} DeStein's steering, which model.method "
                             f"replaces; leave {'it' if one else 'them'} out")
        if options and not self.steering_loaded:
            raise ValueError(f"{changed} {'acts' if one else 'act'} on a steering checkpoint's steering, and none is "
                             f"loaded; give --ckpt_path CKPT, or leave {'it' if one else 'them'} out")
        alphas = self.evaluation.alphas
        if self.alpha_override is not None:
            if alphas is not None and self.alpha_override not in alphas:
                raise ValueError(f"model.alpha {self.alpha_override:g} is not among model.evaluation.alphas {alphas}; "
                                 f"give one of the two")
            if self.steering_loaded and self.alpha_override != self.steered.alpha:
                log.info("evaluating model.alpha %g in place of %s's alpha %g", self.alpha_override,
                         self.checkpoint_source, self.steered.alpha)
            self.steered.alpha = self.alpha_override
        evaluated = alphas if alphas is not None else [self.steered.alpha]
        steered = [a for a in evaluated if a]
        if steered and self.method is None and not self.steered.vectors.any():
            given = "model.evaluation.alphas" if alphas is not None else "model.alpha"
            why = f"{self.checkpoint_source} holds only zeros" if self.steering_loaded else "no --ckpt_path given"
            raise ValueError(f"{given}: alpha {steered[0]:g} would steer by all-zero steering vectors ({why}), so its "
                             f"continuations would be the base model's; give --ckpt_path CKPT or --model.method NAME, "
                             f"or evaluate alpha 0 only")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluator.add(batch["prompts"], batch["index"])

    def on_test_epoch_end(self) -> None:
        output = self.evaluator.finish()
        for run in output["runs"]:
            for subset in SUBSETS:
                for name in METRIC_NAMES:
                    value = run["metrics"][subset][name]
                    if value is not None:  # a subset without prompts has no value
                        self.log(f"alpha_{run['alpha']:g}/{subset}/{name}", value, rank_zero_only=True)
