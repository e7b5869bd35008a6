"""`destein gate`: fit continuation probes for a steering checkpoint (`destein_pl.calibration.continuation_probes`)
and write a copy of the checkpoint whose gate reads them."""

from __future__ import annotations

import hashlib
import logging
import statistics
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from destein_pl.calibration.continuation_probes import (
    ContinuationProbeOptions,
    ContinuationProbes,
    best_threshold,
    fit_continuation_probes,
)
from destein_pl.calibration.pairs import PairsConfig, load_pairs
from destein_pl.evaluation.prompts import Prompt, read_prompts, sample_prompts, usable_prompts
from destein_pl.files import atomic_path
from destein_pl.steering.checkpoint import (
    METADATA_KEY,
    PROBES_PREFIX,
    load_checkpoint_file,
    read_checkpoint,
    save_steering,
)
from destein_pl.steering.gating import GateSettings
from destein_pl.steering.model import SteeredCausalLM
from destein_pl.steering.probes import CONTINUATION_PREFIX

log = logging.getLogger(__name__)

TEMPERATURE_SPREAD = 3.0
"""The smooth gate's temperature, unless given, is the validation scores' standard deviation divided by this."""


def gate(
    ckpt_path: str,
    out: str,
    prompts: list[str],
    exclude: list[str] | None = None,
    pairs: PairsConfig | None = None,
    n: int | None = None,
    seed: int = 0,
    output_dir: str = "runs/gate",
    options: ContinuationProbeOptions = ContinuationProbeOptions(),  # noqa: B008 (a dataclass, never mutated)
    gate: GateSettings | None = None,
    threshold: float | None = None,
    temperature: float | None = None,
    alpha: float | None = None,
    overwrite: bool = False,
) -> Path:
    """Fit a forward-looking gate: probes that predict from a context whether the model's own continuation will be
    toxic, learned from the model's sampled continuations of `prompts`; write a copy of the checkpoint that holds
    them and gates its steering by them.

    Returns the checkpoint written.

    Args:
        ckpt_path: steering checkpoint (.ckpt or .safetensors); its steering, probes and base model are kept.
        out: the checkpoint to write (.ckpt: also its .safetensors and .json beside it; .safetensors: also its
            .json); not the input, and not an existing file unless `overwrite`.
        prompts: prompt files (as `test` reads them: RealToxicityPrompts or plain JSONL, or text), pooled.
        exclude: prompt files whose prompts (by id or text) are left out: the prompts the gate will be tuned or
            evaluated on.
        pairs: a pairs file (as `fit` reads it) whose sentences, both sides without cues, are added as prompts.
        n: use a seeded sample of this many of the pooled prompts (None: all).
        seed: seed of that sample.
        output_dir: where the labelling continuations are written as they are made (a rerun resumes).
        options: how continuations are drawn and scored and the probes fit (`ContinuationProbeOptions`).
        gate: the gate written into the checkpoint (its `probes` is set to `continuation`, its `threshold` and
            `temperature` by the options below); None: a smooth gate with the default settings.
        threshold: the gate's threshold; None: the one that best separates the validation prompts with a toxic
            continuation from those without (balanced accuracy).
        temperature: the smooth gate's temperature; None: a third of the standard deviation of the validation
            prompts' scores. Continuation probes' scores spread far less than the context probes' (whose default
            0.05 is about a third of their spread on the development protocol's tune prompts).
        alpha: the steering strength written (None: the checkpoint's).
        overwrite: replace an existing `out`.
    """
    source, target = check_paths(ckpt_path, out, overwrite)
    for name in ("threshold", "temperature"):
        if gate is not None and getattr(gate, name) != getattr(GateSettings(), name):
            raise ValueError(f"gate.{name} is set by --{name} (or from the validation prompts when it is left out); "
                             f"give --{name} instead")
    chosen = gate_prompts(prompts, exclude or [], pairs, n, seed)
    write_continuation_gate(source, target, chosen, output_dir, options, gate, threshold, temperature, alpha)
    return target


def write_continuation_gate(source: Path, target: Path, prompts: Sequence[Prompt], output_dir: str | Path,
                            options: ContinuationProbeOptions, gate: GateSettings | None = None,
                            threshold: float | None = None, temperature: float | None = None,
                            alpha: float | None = None) -> ContinuationProbes:
    """Fit continuation probes on `prompts` for the checkpoint `source` and write `target` (paths checked by
    `check_paths`) with `gate` at `alpha` (None: the checkpoint's), its threshold and temperature given or from the
    validation prompts: what `destein gate` does once it has its prompts. Returns the fitted probes."""
    steered = SteeredCausalLM.from_checkpoint(source)
    fitted = fit_continuation_probes(steered, prompts, output_dir, options)
    if alpha is not None:
        steered.alpha = alpha
    settings = replace(gate or GateSettings("smooth"), probes="continuation")
    scores, toxic = validation_scores(fitted, prompts, settings)
    if threshold is None:
        threshold = round(best_threshold(scores, toxic), 4)
    if temperature is None:
        temperature = max(round(statistics.pstdev(scores) / TEMPERATURE_SPREAD, 4), 1e-4)
    settings = replace(settings, threshold=threshold, temperature=temperature)
    fitted.provenance["validation_auroc"] = round(auroc(scores, toxic), 6)
    write_checkpoint(source, target, steered, fitted, settings)
    log.info("continuation probes fit on %d prompts (%.1f%% of continuations toxic); gate score AUROC on the %d "
             "validation prompts %.3f, threshold %g, temperature %g; written to %s", len(prompts),
             100 * fitted.provenance["toxic_share"], len(fitted.validation), fitted.provenance["validation_auroc"],
             threshold, temperature, target)
    return fitted


def check_paths(ckpt_path: str, out: str, overwrite: bool) -> tuple[Path, Path]:
    """The input checkpoint and the output path, refusing an output that is the input (or a file beside it that the
    input is made of), of a kind the input cannot give, or that exists without `overwrite`."""
    source, target = Path(ckpt_path), Path(out)
    if not source.is_file():
        raise FileNotFoundError(f"ckpt_path: steering checkpoint not found: {source}")
    if target.suffix not in (".ckpt", ".safetensors"):
        raise ValueError(f"out: {target} must end in .ckpt or .safetensors")
    if target.suffix == ".ckpt" and source.suffix != ".ckpt":
        raise ValueError(f"out: {target} is a Lightning checkpoint, which only a .ckpt input gives; write a "
                         f".safetensors")
    written = [target.with_suffix(s) for s in ((".ckpt", ".safetensors", ".json") if target.suffix == ".ckpt"
                                              else (".safetensors", ".json"))]
    inputs = {source.resolve(), source.with_suffix(".safetensors").resolve(), source.with_suffix(".json").resolve()}
    clash = [p for p in written if p.resolve() in inputs]
    if clash:
        raise ValueError(f"out: writing {target} would replace {clash[0]}, which belongs to the input checkpoint; "
                         f"choose another name")
    existing = [p for p in written if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"out: {existing[0]} exists; choose another name or give --overwrite true")
    if any(p.is_dir() for p in existing):
        raise IsADirectoryError(f"out: {next(p for p in existing if p.is_dir())} is a folder")
    return source, target


def pair_prompts(config: PairsConfig) -> list[Prompt]:
    """Both sides of the pairs a config selects, without cues, each once, as prompts with ids from their text."""
    texts = dict.fromkeys(t for pair in load_pairs(config) for t in (pair.toxic, pair.nontoxic))
    return [Prompt(f"pairs:{hashlib.sha256(t.encode()).hexdigest()[:16]}", t) for t in texts]


def gate_prompts(files: Sequence[str], exclude: Sequence[str], pairs: PairsConfig | None, n: int | None,
                 seed: int) -> list[Prompt]:
    """The pooled prompts of `files` (and of `pairs`), less those of `exclude` (by id or text), sampled to `n`."""
    if not files and pairs is None:
        raise ValueError("prompts: give at least one prompts file (or --pairs.source)")
    pooled = [p for f in files for p in read_prompts(f)] + (pair_prompts(pairs) if pairs is not None else [])
    left_out = [p for f in exclude for p in read_prompts(f)]
    ids, texts = {p.id for p in left_out}, {p.text for p in left_out}
    kept, _ = usable_prompts([p for p in pooled if p.id not in ids and p.text not in texts])
    log.info("%d prompts pooled, %d left out by --exclude, %d used", len(pooled), len(pooled) - len(kept),
             n or len(kept))
    return sample_prompts(kept, n, seed)


def validation_scores(fitted: ContinuationProbes, prompts: Sequence[Prompt], settings: GateSettings
                      ) -> tuple[list[float], list[bool]]:
    """The gate's score at each validation prompt's last token, and whether any of its continuations reached
    `toxic_at`."""
    index = {p.id: i for i, p in enumerate(prompts)}
    rows = [index[i] for i in fitted.validation]
    scores = fitted.gate_scores(fitted.features[rows], settings.heads, settings.layers).tolist()
    toxic_at = fitted.provenance["toxic_at"]
    return scores, [any(s >= toxic_at for s in fitted.scores[i]) for i in fitted.validation]


def auroc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(positive, scores))


def write_checkpoint(source: Path, target: Path, steered: SteeredCausalLM, fitted: ContinuationProbes,
                     settings: GateSettings) -> None:
    """A copy of `source` with the continuation probes added and `settings` as its gate: `.safetensors` and `.json`,
    and for a `.ckpt` target the Lightning checkpoint too, each written atomically."""
    tensors, metadata = read_checkpoint(source)
    options = {**(metadata.get("options") or {}), "gate": settings.metadata()}
    metadata = {**metadata, "alpha": round(steered.alpha, 6), "options": options,
                "continuation_probes": fitted.provenance}
    probes = {k.removeprefix(PROBES_PREFIX): v for k, v in tensors.items() if "probe_" in k}
    probes.update(fitted.probes.arrays(CONTINUATION_PREFIX))
    save_steering(target.with_suffix(".safetensors"), {**steered.steering_tensors(), **probes}, metadata)
    if target.suffix == ".ckpt":
        checkpoint: dict[str, Any] = load_checkpoint_file(source)
        state = {k: torch.full_like(v, steered.alpha) if k.endswith(".steer_alpha") else v
                 for k, v in checkpoint["state_dict"].items()}
        checkpoint["state_dict"] = {**state, **{f"{PROBES_PREFIX}{k}": v for k, v in probes.items()}}
        checkpoint[METADATA_KEY] = metadata
        with atomic_path(target) as tmp:
            torch.save(checkpoint, tmp)
