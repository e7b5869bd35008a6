"""What calibration costs on the embedded SmolLM2-135M-Instruct: ParaDetox pairs with the paper's cues, recorded and
probed as `destein fit --config configs/smollm2-135m.yaml` does, in one run.

    python -m benchmarks calibration_cost [--pairs 40] [--repeats 5] [--sizes 10 20 40 80 160] [--size-repeats 3]
                                          [--check-m M] [--threads N]

1. Recording throughput: the same `--pairs` pairs recorded by `Calibrator.record` in batches of 8 pairs (what `destein
   fit` and `calibrate()` do: one padded forward pass per side and batch) and one pair at a time (what the authors'
   code does: every text its own forward pass). A pair is four texts, as `destein fit` records them: both sides with
   their cues, and both without (the gate's probes are fit on those). The two modes are timed in turn within each
   repetition (the order alternates, after an untimed warm-up), so that load from elsewhere falls on both alike; the
   speed-up is the ratio within each repetition. Both modes' vectors are compared: batching (left padding) must not
   change them beyond float noise.
2. Probes: `Calibrator.finish` after each of those recordings, timed apart from the recording: the per-head logistic
   regressions (one set on the cued texts, whose accuracies weigh the heads, one on the uncued texts for the gate),
   then the vectors and head weights.
3. Growth: the whole calibration (recording in batches of 8, then the probes) for each of `--sizes` pairs (ParaDetox,
   seed 0, as `--data.pairs.m` samples them), `--size-repeats` times (sizes in turn), and the least-squares line
   `seconds = a + b * m` through every measurement, with its prediction for 1,000 and 10,000 pairs. `--check-m M`
   also measures one calibration on M pairs against that prediction.

Writes `docs/results/calibration_cost.md`. Model loading is not counted (`benchmarks/load_speed.py` measures it).
`--model` calibrates another model (a folder or a built-in name) the same way.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader

from benchmarks.results import DATA, Results, shown
from benchmarks.timing import in_turn, spread
from destein_pl import (
    Calibration,
    CalibrationOptions,
    PairsConfig,
    SteeredCausalLM,
    SteeringPair,
    calibrate,
    load_base_model,
    load_pairs,
)
from destein_pl.calibration.calibrate import Calibrator
from destein_pl.calibration.pairs import PairsDataset, collate_pairs

MODEL = "smollm2-135m"
PAIRS = DATA / "paradetox" / "paradetox.tsv"
BATCH_SIZE = 8
"""Pairs per step of `destein fit --config configs/smollm2-135m.yaml` (`data.pairs.batch_size`)."""
TEXTS_PER_PAIR = 4
"""Both sides with their cues, and both without (for the gate's probes)."""
OPTIONS = CalibrationOptions(alpha=1.3, head_weights="probe", last_k=8)
"""The module options of `configs/smollm2-135m.yaml`."""


@dataclass
class Run:
    """One timed calibration: recording, then `finish` (probes, vectors, head weights)."""

    record_s: float
    finish_s: float
    calibration: Calibration

    @property
    def total_s(self) -> float:
        return self.record_s + self.finish_s


def batches(pairs: Sequence[SteeringPair], config: PairsConfig, batch_size: int) -> list[dict[str, Any]]:
    """The batches `destein fit` feeds to `Calibrator.record` (its data module's loader), built before timing."""
    toxic_cue, nontoxic_cue = config.cue_pair or ("", "")
    loader = DataLoader(PairsDataset(list(pairs), toxic_cue, nontoxic_cue), batch_size=batch_size, shuffle=False,
                        collate_fn=collate_pairs)
    return list(loader)


def record(calibrator: Calibrator, batch: dict[str, Any]) -> None:
    """One step of `destein fit`: both sides of a batch, and both sides without cues when the pairs have cues."""
    plain = (batch["toxic_plain"], batch["nontoxic_plain"]) if "toxic_plain" in batch else None
    calibrator.record(batch["toxic"], batch["nontoxic"], batch["index"], plain)


def timed_calibration(steered: SteeredCausalLM, steps: list[dict[str, Any]]) -> Run:
    """Record every batch, then finish; the two timed apart. A new `Calibrator` zeroes the steering first, so each
    run records the base model's activations whatever the previous run set."""
    calibrator = Calibrator(steered, OPTIONS)
    start = time.perf_counter()
    for batch in steps:
        record(calibrator, batch)
    recorded = time.perf_counter()
    calibration = calibrator.finish()
    return Run(recorded - start, time.perf_counter() - recorded, calibration)


def compare(a: Calibration, b: Calibration) -> dict[str, float]:
    """Largest differences between two calibrations of the same pairs (float32 resolves 1.2e-7 relative)."""
    difference, largest = (a.vectors - b.vectors).abs().max().item(), a.vectors.abs().max().item()
    return {
        "vectors: max abs difference": difference,
        "vectors: largest abs value": largest,
        "vectors: max abs difference / largest abs value": difference / largest,
        "head weights (probe accuracy): max abs difference": (a.head_weights - b.head_weights).abs().max().item(),
        "probe coefficients: max abs difference": (a.probes.coef - b.probes.coef).abs().max().item(),
    }


def throughput(steered: SteeredCausalLM, pairs: list[SteeringPair], config: PairsConfig,
               repeats: int) -> tuple[dict[str, list[Run]], dict[str, float], float]:
    """Batched and one-at-a-time calibrations of the same pairs, interleaved; their differences; and the largest
    difference between `calibrate()` and the batched runs here (the timed loop must be what the library does)."""
    steps = {"batched (8 pairs per step)": batches(pairs, config, BATCH_SIZE),
             "one text per forward pass": batches(pairs, config, 1)}
    warm = Calibrator(steered, OPTIONS)

    def warm_up() -> None:  # the first step of each mode, untimed and discarded
        for batches_of_mode in steps.values():
            record(warm, batches_of_mode[0])

    timings = in_turn({name: partial(timed_calibration, steered, batches_of_mode)
                       for name, batches_of_mode in steps.items()}, repeats, warm_up)
    runs = {name: [t.value for t in mode] for name, mode in timings.items()}
    batched, single = (mode[0].calibration for mode in runs.values())
    reference = calibrate(steered, pairs, OPTIONS, batch_size=BATCH_SIZE, cues=config.cue_pair, progress=False)
    library = (reference.vectors - batched.vectors).abs().max().item()
    return runs, compare(batched, single), library


def throughput_table(runs: dict[str, list[Run]], num_pairs: int) -> str:
    """Recording rate per mode, and each mode's time relative to the batched one within the same repetition."""
    names = list(runs)
    base = runs[names[0]]
    header = (f"| recording ({num_pairs} pairs, {TEXTS_PER_PAIR * num_pairs} texts) | pairs/s median | spread "
              "(min - max) | texts/s median | seconds median (min - max) | time vs batched, median (min - max) |")
    lines = [header, "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in names:
        rates = [num_pairs / run.record_s for run in runs[name]]
        seconds = [run.record_s for run in runs[name]]
        ratios = [run.record_s / ref.record_s for run, ref in zip(runs[name], base)]
        lines.append(f"| {name} | {statistics.median(rates):.1f} | {min(rates):.1f} - {max(rates):.1f} | "
                     f"{TEXTS_PER_PAIR * statistics.median(rates):.1f} | {spread(seconds, 2)} | {spread(ratios, 2)} |")
    return "\n".join(lines)


def probes_table(runs: dict[str, list[Run]], steered: SteeredCausalLM, num_pairs: int) -> str:
    """`finish` times of every run (both recording modes give it the same amount of data)."""
    seconds = [run.finish_s for mode in runs.values() for run in mode]
    probes = 2 * steered.num_layers * steered.num_heads
    per_probe_ms = [1000 * s / probes for s in seconds]
    share = [run.finish_s / run.total_s for run in runs[next(iter(runs))]]
    return "\n".join([
        "| probes (`Calibrator.finish`) | value |", "| --- | ---: |",
        (f"| logistic regressions | {probes} = 2 sets (cued, uncued) x {steered.num_layers} layers x "
         f"{steered.num_heads} heads, each on {num_pairs} pairs (4:1 train/validation) |"),
        f"| seconds, median (min - max) over {len(seconds)} runs | {spread(seconds, 2)} |",
        f"| ms per probe, median (min - max) | {spread(per_probe_ms, 2)} |",
        f"| share of the batched calibration's time, median (min - max) | {spread(share, 2)} |",
    ])


def growth(steered: SteeredCausalLM, config: PairsConfig, sizes: list[int],
           repeats: int) -> dict[int, list[Run]]:
    """Batched calibrations on `m` pairs for every size, `repeats` times, the sizes in turn (no warm-up: the
    throughput measurement ran before)."""
    steps = {m: batches(load_pairs(PairsConfig(config.source, m=m, seed=config.seed)), config, BATCH_SIZE)
             for m in sizes}
    timings = in_turn({m: partial(timed_calibration, steered, steps[m]) for m in sizes}, repeats, warm_up=False)
    return {m: [t.value for t in mode] for m, mode in timings.items()}


def fit_line(runs: dict[int, list[Run]], part: str) -> tuple[float, float, float]:
    """Least squares `seconds = a + b * m` through every measurement of `part` (`record_s`, `finish_s`, `total_s`):
    a, b and R^2 (the share of the variance of the measurements that the line explains)."""
    m = np.array([size for size, mode in runs.items() for _ in mode], dtype=float)
    seconds = np.array([getattr(run, part) for mode in runs.values() for run in mode])
    b, a = np.polyfit(m, seconds, 1)
    residual = seconds - (a + b * m)
    variance = float(((seconds - seconds.mean()) ** 2).sum())
    r2 = 1 - float((residual**2).sum()) / variance if variance > 0 else float("nan")
    return float(a), float(b), r2


def growth_table(runs: dict[int, list[Run]]) -> str:
    """Time per size, split into recording and probes, and the fitted line's value at each size."""
    a, b, _ = fit_line(runs, "total_s")
    lines = ["| pairs m | recording s | probes s | total s median (min - max) | pairs/s (total) | line a + b m |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for m, mode in runs.items():
        total = [run.total_s for run in mode]
        lines.append(f"| {m} | {statistics.median(run.record_s for run in mode):.2f} | "
                     f"{statistics.median(run.finish_s for run in mode):.2f} | {spread(total, 2)} | "
                     f"{m / statistics.median(total):.1f} | {a + b * m:.2f} |")
    return "\n".join(lines)


def line_table(runs: dict[int, list[Run]], check: tuple[int, Run] | None) -> str:
    """The fitted lines (total and each part) and their predictions for 1,000 and 10,000 pairs."""
    lines = [("| least squares over all runs | a (s) | b (s per pair) | R^2 | predicted m=1,000 (s) | predicted "
              "m=10,000 (s) |"), "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for label, part in (("recording", "record_s"), ("probes", "finish_s"), ("**total**", "total_s")):
        a, b, r2 = fit_line(runs, part)
        lines.append(f"| {label} | {a:.3f} | {b:.4f} | {r2:.3f} | {a + b * 1000:.1f} | {a + b * 10000:.0f} |")
    if check is not None:
        m, run = check
        a, b, _ = fit_line(runs, "total_s")
        lines += ["", (f"Measured once on m={m} pairs: recording {run.record_s:.1f} s, probes {run.finish_s:.1f} s, "
                       f"total {run.total_s:.1f} s; the total line predicts {a + b * m:.1f} s.")]
    return "\n".join(lines)


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=MODEL, help=f"the model calibrated (default {MODEL})")
    parser.add_argument("--pairs-source", default=str(PAIRS), help="ParaDetox TSV (or a pairs JSONL)")
    parser.add_argument("--pairs", type=int, default=40, help="pairs of the throughput and probe measurements")
    parser.add_argument("--repeats", type=int, default=5, help="repetitions of the throughput measurement")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 20, 40, 80, 160], help="m of the growth fit")
    parser.add_argument("--size-repeats", type=int, default=3, help="repetitions of each size")
    parser.add_argument("--check-m", type=int, default=None, help="also measure one calibration on this many pairs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pair samples")


def run(args: argparse.Namespace, results: Results) -> None:
    model, tokenizer = load_base_model(args.model)
    steered = SteeredCausalLM(model, tokenizer)
    config = PairsConfig(args.pairs_source, m=args.pairs, seed=args.seed)
    runs, differences, library = throughput(steered, load_pairs(config), config, args.repeats)
    sizes = sorted(set(args.sizes))
    grown = growth(steered, config, sizes, args.size_repeats)
    check = None
    if args.check_m:
        pairs = load_pairs(PairsConfig(config.source, m=args.check_m, seed=args.seed))
        check = (args.check_m, timed_calibration(steered, batches(pairs, config, BATCH_SIZE)))

    described = f"`{MODEL}` (SmolLM2-135M-Instruct, " if args.model == MODEL else f"`{shown(Path(args.model))}` ("
    same = "\n".join(f"| {name} | {value:.3g} |" for name, value in differences.items())
    body = f"""
Model {described}{steered.dtype}, {steered.num_layers} layers x {steered.num_heads} heads x
{steered.head_dim}), ParaDetox pairs (seed {args.seed}) with the paper's cues, the options of
`configs/smollm2-135m.yaml` (last 8 tokens, probe head weights). Loading the model is not counted.

**Recording throughput**: the same {args.pairs} pairs, {args.repeats} repetitions, the two modes in turn. A pair is
{TEXTS_PER_PAIR} texts, as `destein fit` records them (both sides with their cues, and without them for the gate's
probes); "one text per forward pass" is the authors' way.

{throughput_table(runs, args.pairs)}

Batched against one text per forward pass, after the probes of each (same pairs):

| comparison | value |
| --- | ---: |
{same}

The timed loop against `calibrate()` on the same pairs (vectors, max abs difference): {library:.3g}.

**Probes**, timed apart from the recording:

{probes_table(runs, steered, args.pairs)}

**Growth with the number of pairs**, batched (8 pairs per step), recording then probes, {args.size_repeats}
repetitions per size (interleaved); medians:

{growth_table(grown)}

{line_table(grown, check)}
"""
    results.write("calibration_cost", "Calibration cost: recording throughput, probes, growth with m", body)
