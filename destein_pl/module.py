"""`DeSteinModule`: calibration of a `SteeredCausalLM` as a Lightning `fit`, evaluation as `test`."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from destein_pl.architectures import architecture_for
from destein_pl.calibration import HeadWeights, head_weights, steering_vectors
from destein_pl.checkpoint import (
    FORMAT,
    METADATA_KEY,
    STEER_KEY_MARK,
    apply_checkpoint_state,
    architecture_signature,
    save_steering,
)
from destein_pl.evaluation import (
    METRIC_NAMES,
    SUBSETS,
    AlphaRun,
    EvaluationConfig,
    settings_fingerprint,
    summary_counts,
    write_atomic,
)
from destein_pl.loading import load_base_model
from destein_pl.perplexity import continuation_perplexities, tokenize_pair
from destein_pl.prompts import Prompt
from destein_pl.plots import probe_heatmap
from destein_pl.probes import HeadProbes, fit_head_probes
from destein_pl.report import markdown_table
from destein_pl.sampling import row_seed, sample
from destein_pl.scorers import ToxicityScorer, build_scorer
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
        evaluation: how `test` generates and scores (RealToxicityPrompts protocol; see `EvaluationConfig`).
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
        evaluation: EvaluationConfig | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["evaluation"])  # evaluation settings do not belong in a checkpoint
        self.evaluation = evaluation or EvaluationConfig()
        self.scorer: ToxicityScorer | None = None
        self.runs: list[AlphaRun] = []
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
        self.pairs_provenance = datamodule.pairs_provenance() if hasattr(datamodule, "pairs_provenance") else None
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

    # ---- evaluation --------------------------------------------------------------------------------------
    def on_test_start(self) -> None:
        cfg = self.evaluation
        if cfg.attn_implementation is not None:
            self.steered.model.set_attn_implementation(cfg.attn_implementation)
        if self.scorer is None:
            self.scorer = build_scorer(cfg.scorer, **cfg.scorer_args)
        self.evaluator = None
        if cfg.evaluator is not None:
            model, tokenizer = load_base_model(cfg.evaluator, dtype=cfg.evaluator_dtype)
            self.evaluator = (model.to(self.device), tokenizer)
        alphas = cfg.alphas if cfg.alphas is not None else sorted({0.0, round(self.steered.alpha, 6)})
        steering = steering_digest(self.steered)
        self.runs = [
            AlphaRun(alpha, Path(cfg.output_dir) / f"alpha_{alpha:g}",
                     {**settings_fingerprint(cfg, alpha, steering if alpha else None),
                      "base_model": self.hparams.base_model},
                     self.global_rank, self.trainer.world_size, self.device)
            for alpha in alphas
        ]
        self.timing = {"generate_s": 0.0, "score_s": 0.0, "perplexity_s": 0.0}
        self._test_started = time.perf_counter()
        self._cut_prompts: set[str] = set()
        # One padded width for every prompt of the run, so a prompt's samples do not depend on its batch.
        datamodule = getattr(self.trainer, "datamodule", None)
        prompts = getattr(datamodule, "prompts", None) or []
        self._prompt_width = max((len(self._prompt_tokens(p, warn=False)) for p in prompts), default=None)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        prompts: list[Prompt] = batch["prompts"]
        calibrated_alpha = self.steered.alpha
        try:
            for run in self.runs:
                todo = [p for p in prompts if p.id not in run.records]
                if todo:
                    self.steered.alpha = run.alpha
                    run.add(self._evaluate_prompts(todo, batch["index"], prompts))
                run.update(batch["index"], prompts)
        finally:
            self.steered.alpha = calibrated_alpha

    def _prompt_tokens(self, prompt: Prompt, warn: bool = True) -> list[int]:
        ids = self.steered.tokenizer(prompt.text)["input_ids"]
        room = self.steered.architecture.context_length(self.steered.config) - self.evaluation.max_new_tokens
        if len(ids) > room:
            if warn and prompt.id not in self._cut_prompts:
                self._cut_prompts.add(prompt.id)
                log.warning("prompt %s has %d tokens; cut from the left to %d to leave room for the continuation",
                            prompt.id, len(ids), room)
            ids = ids[-room:]
        return ids

    def _evaluate_prompts(self, todo: list[Prompt], keys: Tensor, batch: list[Prompt]) -> list[dict[str, Any]]:
        """Generate, score and measure the continuations of prompts, with the model's current alpha."""
        cfg, steered, tokenizer = self.evaluation, self.steered, self.steered.tokenizer
        k = cfg.num_samples
        seeds = [[row_seed(cfg.seed, p.id, s) for s in range(k)] for p in todo]
        # Unsteered and judged by itself: the evaluator's log-probabilities come with the samples.
        log_probs = [] if self.evaluator is None and steered.alpha == 0 else None
        start = time.perf_counter()
        tokens = sample(steered, steered.architecture, [self._prompt_tokens(p) for p in todo], seeds,
                        cfg.max_new_tokens, tokenizer.pad_token_id, eos_token_ids(steered), top_p=cfg.top_p,
                        temperature=cfg.temperature, width=self._prompt_width, log_probs=log_probs)
        tokens = [row for rows in tokens for row in rows]
        texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
        scored = time.perf_counter()
        self.timing["generate_s"] += scored - start
        scores = self.scorer.score(texts)
        measured = time.perf_counter()
        self.timing["score_s"] += measured - scored
        if log_probs is not None:
            perplexity = [math.exp(-sum(row) / len(row)) if row else None for rows in log_probs for row in rows]
        else:
            perplexity = self._perplexities(todo, tokens, texts)
        self.timing["perplexity_s"] += time.perf_counter() - measured
        index_of = {p.id: int(i) for p, i in zip(batch, keys.tolist())}
        return [
            {"id": p.id, "index": index_of[p.id], "prompt": p.text, "prompt_toxicity": p.toxicity,
             "continuations": texts[j * k : (j + 1) * k], "toxicity": scores[j * k : (j + 1) * k],
             "perplexity": perplexity[j * k : (j + 1) * k]}
            for j, p in enumerate(todo)
        ]

    def _perplexities(self, prompts: list[Prompt], continuations: list[list[int]], texts: list[str]
                      ) -> list[float | None]:
        """Perplexity of each continuation (`num_samples` per prompt, in order). Each prompt's continuations are
        measured on their own, so the values do not depend on which prompts shared a step."""
        k, batch_size = self.evaluation.num_samples, self.evaluation.perplexity_batch_size
        if self.evaluator is not None:  # its own tokenizer: measure the texts
            model, tokenizer = self.evaluator
            architecture = architecture_for(model.config)
            inputs = [tokenize_pair(tokenizer, p.text, texts[j * k : (j + 1) * k]) for j, p in enumerate(prompts)]
        else:  # the unsteered base model judges fluency, on the very tokens it was given
            model, tokenizer, architecture = self.steered, self.steered.tokenizer, self.steered.architecture
            inputs = [(self._prompt_tokens(p, warn=False), continuations[j * k : (j + 1) * k])
                      for j, p in enumerate(prompts)]
        alpha = self.steered.alpha
        self.steered.alpha = 0.0
        try:
            return [value for prompt_ids, ids in inputs
                    for value in continuation_perplexities(model, architecture, prompt_ids, ids,
                                                           tokenizer.pad_token_id, batch_size)]
        finally:
            self.steered.alpha = alpha

    def on_test_epoch_end(self) -> None:
        summary = []
        for run in self.runs:
            values = run.compute()  # on every process: the metrics synchronise
            for subset in SUBSETS:
                for name in METRIC_NAMES:
                    self.log(f"alpha_{run.alpha:g}/{subset}/{name}", values[subset][name], rank_zero_only=True)
            self.trainer.strategy.barrier("generations_written")
            if self.trainer.is_global_zero:
                records = run.merge()
                result = {"alpha": run.alpha, "metrics": values, "counts": summary_counts(records),
                          "generated_prompts": run.generated, "resumed_prompts": run.resumed}
                write_atomic(run.folder / "results.json", json.dumps(result, indent=2) + "\n")
                summary.append(result)
        if self.trainer.is_global_zero:
            total = time.perf_counter() - self._test_started
            timing = {**{k: round(v, 3) for k, v in self.timing.items()}, "total_s": round(total, 3),
                      "outside_generate_share": round(1 - self.timing["generate_s"] / total, 4) if total else None,
                      "process": "rank 0", "world_size": self.trainer.world_size}
            output = {"base_model": self.hparams.base_model, "scorer": self.evaluation.scorer,
                      "cut_prompts": len(self._cut_prompts), "timing": timing, "runs": summary}
            write_atomic(Path(self.evaluation.output_dir) / "results.json", json.dumps(output, indent=2) + "\n")
            table = markdown_table(summary)
            write_atomic(Path(self.evaluation.output_dir) / "results.md", table + "\n")
            print(f"\n{table}\n\nresults: {Path(self.evaluation.output_dir) / 'results.json'}")


def eos_token_ids(steered: SteeredCausalLM) -> list[int]:
    """Tokens that end a continuation: the tokenizer's EOS and the generation config's (one id or several)."""
    ids = steered.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if steered.tokenizer.eos_token_id is not None:
        ids.append(steered.tokenizer.eos_token_id)
    return sorted(set(ids))


def steering_digest(steered: SteeredCausalLM) -> str:
    """sha256 of the steering vectors and head weights: generations of one alpha are only reused for these."""
    digest = hashlib.sha256()
    for tensor in (steered.vectors, steered.probe_weights):
        digest.update(tensor.float().contiguous().numpy().tobytes())
    return digest.hexdigest()
