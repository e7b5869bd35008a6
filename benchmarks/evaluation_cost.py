"""What an evaluation costs, on the embedded SmolLM2-135M steered with the shipped checkpoint
(`checkpoints/smollm2-135m-paradetox.ckpt`), with the protocol's sampling: nucleus 0.9, 20 new tokens, 25
continuations per prompt. Three parts; name some to run only those (none named: all three):

    python -m benchmarks evaluation_cost [sampler] [split] [growth] [--threads N] [--repeats 3]

1. `sampler`: the evaluation sampler (`PromptSampler`, all prompts in one batch) against Hugging Face
   `generate(num_return_sequences=25)` called per prompt (nucleus only: generate's default top-k of 50 is turned
   off), on the same `--sampler-prompts` prompts, both timed in turn within each repetition (the order
   alternating, after one untimed warm-up each): tokens/s of each, and their ratio per repetition.
2. `split`: where an evaluation's time goes. `evaluate` on `--split-prompts` prompts, for the base model
   (alpha 0) and for the checkpoint's alpha, both in each repetition; the timing each run records in its
   `results.json` (generation, perplexity, scoring, the rest) and its share outside generation.
3. `growth`: how the time grows with the prompts. `evaluate` at the checkpoint's alpha (`--growth-alphas`) on the
   first 25, 50 and 100 prompts (`--sizes`), `--growth-samples` continuations each (default 5; the protocol's 25
   with `--growth-samples 25`); `seconds = a + b * prompts` fitted by least squares to every measurement, and the
   time it predicts for 100,000 prompts, at the measured continuations and scaled to 25.

Prompts: one seeded shuffle of `rtp_toxic_1k.jsonl` and `rtp_nontoxic_1k.jsonl` together (from the shared data
folder); every part takes the first prompts of it. Each evaluation writes into a fresh temporary folder (nothing
resumes). Writes the parts it ran to `docs/results/evaluation_cost.md` (a run of fewer parts replaces the file with
those only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import statistics
import tempfile
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from benchmarks.evaluation import PROTOCOL_SAMPLES, evaluation_config, sampling
from benchmarks.results import DATA, ROOT, Results, shown
from benchmarks.timing import in_turn, spread, timed
from destein_pl import Prompt, SteeredCausalLM, evaluate
from destein_pl.evaluation.prompts import read_rtp_jsonl, usable_prompts
from destein_pl.evaluation.sampling import PromptSampler, end_token_ids

log = logging.getLogger(__name__)

CHECKPOINT = ROOT / "checkpoints" / "smollm2-135m-paradetox.ckpt"
PROMPT_FILES = ("rtp_toxic_1k.jsonl", "rtp_nontoxic_1k.jsonl")
TARGET_PROMPTS = 100_000
PARTS = ("sampler", "split", "growth")
COMPONENTS = ("generate_s", "perplexity_s", "score_s")
"""The parts of `results.json`'s timing that grow with the continuations per prompt."""


def mixed_prompts(seed: int = 0) -> list[Prompt]:
    """Every prompt of the toxic and non-toxic RealToxicityPrompts files together, in one seeded shuffle."""
    prompts, _ = usable_prompts([p for name in PROMPT_FILES for p in read_rtp_jsonl(DATA / "rtp" / name)])
    random.Random(seed).shuffle(prompts)
    return prompts


def first(prompts: list[Prompt], n: int) -> list[Prompt]:
    """The first n prompts; an error when there are fewer."""
    if n > len(prompts):
        raise SystemExit(f"asked for {n} prompts; the two files hold {len(prompts)}")
    return prompts[:n]


def cell(values: list[float], digits: int = 2) -> str:
    """One measurement as it is; several as `median (min - max)`."""
    return f"{values[0]:.{digits}f}" if len(values) == 1 else spread(values, digits)


# 1. the sampler against generate -------------------------------------------------------------------------------

@torch.no_grad()
def sampler_rates(steered: SteeredCausalLM, prompts: Sequence[Prompt], samples: int, tokens: int, repeats: int
                  ) -> dict[str, list[float]]:
    """Tokens/s of the evaluation sampler and of `generate(num_return_sequences=samples)` per prompt, each
    `repeats` times, in turn within each repetition. Both sample from the same distribution (nucleus 0.9,
    temperature 1, no top-k) and count the tokens up to, not including, the first end token."""
    sampler = PromptSampler(steered, sampling(samples, tokens))
    sampler.fix_width(prompts)
    tokenizer = steered.tokenizer
    eos = set(end_token_ids(steered.generation_config, tokenizer))

    def ours() -> int:
        made = sampler(prompts)
        return sum(len(row) for rows in made.tokens for row in rows)

    def hf() -> int:
        count = 0
        for prompt in prompts:
            ids = tokenizer(prompt.text, return_tensors="pt").to(steered.device)
            out = steered.generate(**ids, do_sample=True, top_p=0.9, top_k=0, max_new_tokens=tokens,
                                   num_return_sequences=samples, pad_token_id=tokenizer.pad_token_id)
            for row in out[:, ids["input_ids"].shape[1]:].tolist():
                count += next((i for i, t in enumerate(row) if t in eos), len(row))
        return count

    runs = in_turn({"evaluation sampler (all prompts in one batch)": ours,
                    f"generate(num_return_sequences={samples}), per prompt": hf}, repeats)
    return {name: [t.value / t.seconds for t in timings] for name, timings in runs.items()}


def sampler_speed(steered: SteeredCausalLM, prompts: Sequence[Prompt], samples: int, tokens: int, repeats: int
                  ) -> list[str]:
    """`sampler_rates` as markdown lines: tokens/s of each, median (min - max), and the ratio per repetition."""
    rates = sampler_rates(steered, prompts, samples, tokens, repeats)
    ours, hf = rates.values()
    lines = [f"| generator | tokens/s, median (min - max) of {repeats} |", "|---|---:|"]
    lines += [f"| {name} | {spread(values, 0)} |" for name, values in rates.items()]
    lines.append(f"\nratio sampler / generate (per repetition): {spread([a / b for a, b in zip(ours, hf)], 2)}")
    return lines


# 2 and 3. evaluate() and the timing it records ------------------------------------------------------------------

def timed_evaluation(steered: SteeredCausalLM, prompts: Sequence[Prompt], samples: int, tokens: int,
                     alphas: list[float], batch_size: int, **options: Any) -> dict[str, float]:
    """`evaluate` into a fresh temporary folder: the timing its `results.json` records, `other_s` (its total less
    generation, perplexity and scoring), and `call_s`, the wall time of the whole call (also loading the scorer
    and reading every prompt's width, which `total_s` leaves out). `options`: `EvaluationConfig` fields to set."""
    with tempfile.TemporaryDirectory(prefix="evaluation_cost-") as folder:
        config = dataclasses.replace(evaluation_config(folder, alphas, samples, tokens), **options)
        call = timed(lambda: evaluate(steered, prompts, config, batch_size=batch_size, progress=False,
                                      verbose=False)).seconds
        timing = json.loads((Path(folder) / "results.json").read_text())["timing"]
    measured = {k: float(timing[k]) for k in (*COMPONENTS, "total_s", "outside_generate_share")}
    measured["other_s"] = measured["total_s"] - sum(measured[k] for k in COMPONENTS)
    measured["call_s"] = call
    measured["rest_s"] = call - sum(measured[k] for k in COMPONENTS)
    return measured


def split(steered: SteeredCausalLM, prompts: Sequence[Prompt], samples: int, tokens: int, repeats: int,
          batch_size: int) -> dict[float, list[dict[str, float]]]:
    """Timings of `evaluate` for alpha 0 and the checkpoint's alpha, both in each repetition (order alternating),
    after one untimed warm-up evaluation on two prompts."""
    alphas = [0.0, round(steered.alpha, 6)]

    def one(alpha: float) -> dict[str, float]:
        log.info("split: alpha %g", alpha)
        return timed_evaluation(steered, prompts, samples, tokens, [alpha], batch_size)

    runs = in_turn({alpha: partial(one, alpha) for alpha in alphas}, repeats,
                   warm_up=lambda: timed_evaluation(steered, prompts[:2], 1, tokens, alphas, batch_size))
    return {alpha: [t.value for t in timings] for alpha, timings in runs.items()}


def split_table(runs: dict[float, list[dict[str, float]]]) -> str:
    """One row per alpha: each timing's median (min - max) over the repetitions."""
    columns = [("total_s", "total s"), ("generate_s", "generation s"), ("perplexity_s", "perplexity s"),
               ("score_s", "scoring s"), ("other_s", "other s"), ("outside_generate_share", "outside generation"),
               ("call_s", "`evaluate()` call s")]
    lines = ["| alpha | " + " | ".join(title for _, title in columns) + " |", "|---" + "|---:" * len(columns) + "|"]
    for alpha, measured in runs.items():
        cells = [cell([m[key] for m in measured], 3 if key == "outside_generate_share" else 2) for key, _ in columns]
        lines.append(f"| {alpha:g}{' (base)' if alpha == 0 else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def growth(steered: SteeredCausalLM, prompts: Sequence[Prompt], sizes: list[int], samples: int, tokens: int,
           alphas: list[float], repeats: int, batch_size: int) -> list[tuple[int, dict[str, float]]]:
    """(prompts, timing) of `evaluate` on the first `size` prompts for each size, `repeats` times (the order of
    the sizes rotating), after one untimed warm-up evaluation on two prompts."""
    def one(size: int) -> dict[str, float]:
        log.info("growth: %d prompts x %d continuations", size, samples)
        return timed_evaluation(steered, prompts[:size], samples, tokens, alphas, batch_size)

    runs = in_turn({size: partial(one, size) for size in sizes}, repeats,
                   warm_up=lambda: timed_evaluation(steered, prompts[:2], 1, tokens, alphas, batch_size))
    return [(size, t.value) for size, timings in runs.items() for t in timings]


def fit(points: list[tuple[int, dict[str, float]]], key: str) -> tuple[float, float]:
    """(a, b) of `seconds = a + b * prompts`, least squares over every measurement."""
    slope, intercept = statistics.linear_regression([n for n, _ in points], [m[key] for _, m in points])
    return intercept, slope


def growth_tables(points: list[tuple[int, dict[str, float]]], widths: dict[int, int], samples: int) -> str:
    """The measurements per size, the fitted lines and what they predict for `TARGET_PROMPTS` prompts."""
    names = {"generate_s": "generation", "perplexity_s": "perplexity", "score_s": "scoring",
             "rest_s": "the rest of the call"}
    columns = [("call_s", "`evaluate()` call s"), ("total_s", "recorded total s"),
               *((k, f"{names[k]} s") for k in (*COMPONENTS, "rest_s"))]
    lines = ["| prompts | padded width (tokens) | " + " | ".join(title for _, title in columns) + " |",
             "|---:|---:" + "|---:" * len(columns) + "|"]
    for size in sorted(widths):
        measured = [m for n, m in points if n == size]
        lines.append(f"| {size} | {widths[size]} | " + " | ".join(cell([m[k] for m in measured])
                                                                  for k, _ in columns) + " |")
    scale = PROTOCOL_SAMPLES / samples
    # the whole call as generation + perplexity + scoring + the rest: their fits add up, being linear in the times
    parts = [*COMPONENTS, "rest_s"]
    head = (f"| part of the `evaluate()` call | a (s) | b (ms per prompt) | predicted for {TARGET_PROMPTS:,} prompts, "
            f"{samples} continuations (h) | scaled to {PROTOCOL_SAMPLES} continuations (h) |")
    lines += ["", head, "|---|---:|---:|---:|---:|"]
    at_samples = at_protocol = 0.0
    for key in parts:
        a, b = fit(points, key)
        hours = (a + b * TARGET_PROMPTS) / 3600
        factor = scale if key in COMPONENTS else 1.0
        at_samples += hours
        at_protocol += hours * factor
        lines.append(f"| {names[key]} | {a:.2f} | {1000 * b:.1f} | {hours:.2f} | {hours * factor:.2f} |")
    a, b = fit(points, "call_s")
    lines.append(f"| **all** | {a:.2f} | {1000 * b:.1f} | **{at_samples:.2f}** | **{at_protocol:.2f}** |")
    worst = max(abs(m["call_s"] - (a + b * n)) / m["call_s"] for n, m in points)
    lines.append(f"\nLargest deviation of a measurement from the fitted line (whole call): {100 * worst:.1f}%.")
    return "\n".join(lines)


def width(steered: SteeredCausalLM, prompts: Sequence[Prompt]) -> int:
    """The width in tokens to which an evaluation of these prompts pads every prompt (its longest prompt's)."""
    return PromptSampler(steered, sampling(1, 1)).fix_width(prompts)


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("parts", nargs="*", metavar="PART",
                        help=f"parts to run, of {', '.join(PARTS)} (default: all three)")
    parser.add_argument("--ckpt", type=Path, default=CHECKPOINT, help="steering checkpoint (default: the shipped one)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts' shuffle")
    parser.add_argument("--samples", type=int, default=PROTOCOL_SAMPLES,
                        help="continuations per prompt in sampler and split (protocol: 25)")
    parser.add_argument("--tokens", type=int, default=20, help="new tokens per continuation (protocol: 20)")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of sampler and split")
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per evaluation step (`destein test`: 4)")
    parser.add_argument("--sampler-prompts", type=int, default=6, help="sampler: prompts timed")
    parser.add_argument("--split-prompts", type=int, default=12, help="split: prompts per evaluation")
    parser.add_argument("--sizes", type=int, nargs="+", default=[25, 50, 100], help="growth: prompts per evaluation")
    parser.add_argument("--growth-samples", type=int, default=5,
                        help="growth: continuations per prompt (protocol: 25; the prediction is also scaled to 25)")
    parser.add_argument("--growth-repeats", type=int, default=2, help="growth: repetitions of every size")
    parser.add_argument("--growth-alphas", type=float, nargs="+", default=None,
                        help="growth: alphas of each evaluation (default: the checkpoint's)")


def run(args: argparse.Namespace, results: Results) -> None:
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"no part named {', '.join(unknown)}; the parts are {', '.join(PARTS)}")
    if min(args.samples, args.tokens, args.repeats, args.batch_size, args.sampler_prompts, args.split_prompts,
           *args.sizes, args.growth_samples, args.growth_repeats) < 1:
        raise SystemExit("counts, sizes and repetitions must be at least 1")
    if len(set(args.sizes)) < 2:
        raise SystemExit("--sizes needs at least two different sizes to fit a line")
    parts = [p for p in PARTS if p in (args.parts or PARTS)]

    steered = SteeredCausalLM.from_checkpoint(args.ckpt)
    steered.model.set_attn_implementation("eager")  # as evaluation runs it (EvaluationConfig.attn_implementation)
    alpha = round(steered.alpha, 6)
    ckpt = shown(args.ckpt)
    pool = mixed_prompts(args.seed)
    files = " and ".join(f"`{name}`" for name in PROMPT_FILES)
    evaluation = (f"`evaluate` with {args.batch_size} prompts per step, the profanity-check scorer and perplexity "
                  f"under the unsteered model, into a fresh folder each time")
    setting = (f"{steered.base_model} steered with `{ckpt}` (alpha {alpha:g}), eager attention; nucleus 0.9, "
               f"{args.tokens} new tokens per continuation. Prompts: the first of one seeded shuffle (seed "
               f"{args.seed}) of {files} together.")
    sections = [setting]

    if "sampler" in parts:
        prompts = first(pool, args.sampler_prompts)
        log.info("sampler: %d prompts x %d continuations, %d repetitions", len(prompts), args.samples, args.repeats)
        lines = sampler_speed(steered, prompts, args.samples, args.tokens, args.repeats)
        sections.append(
            f"### The evaluation sampler against `generate`\n\n{len(prompts)} prompts x {args.samples} "
            f"continuations. Both timed in turn in each of {args.repeats} repetitions (the order alternating) "
            f"after a warm-up; tokens counted up to the first end token; `generate` samples from the same "
            f"distribution (nucleus only, its default top-k of 50 off).\n\n" + "\n".join(lines))

    if "split" in parts:
        prompts = first(pool, args.split_prompts)
        runs = split(steered, prompts, args.samples, args.tokens, args.repeats, args.batch_size)
        sections.append(
            f"### Where evaluation time goes\n\n{len(prompts)} prompts x {args.samples} continuations; "
            f"{evaluation}. One evaluation per alpha, both in each of {args.repeats} repetitions (the order "
            f"alternating) after a warm-up. Median (min - max) of the timing that `results.json` records: the "
            f"total (from the first prompt to the written results), generation, perplexity, scoring, the other "
            f"(writing, metrics), and the share of the total outside generation; and the wall time of the whole "
            f"call (which also loads the scorer). At alpha 0 the perplexity comes with the samples (the sampler's "
            f"own log-probabilities), with no forward pass.\n\n" + split_table(runs))

    if "growth" in parts:
        sizes = sorted(set(args.sizes))
        alphas = args.growth_alphas or [alpha]
        prompts = first(pool, sizes[-1])
        widths = {size: width(steered, prompts[:size]) for size in sizes}
        widest = width(steered, pool)
        points = growth(steered, prompts, sizes, args.growth_samples, args.tokens, alphas, args.growth_repeats,
                        args.batch_size)
        sections.append(
            f"### How evaluation time grows with the prompts\n\n{', '.join(map(str, sizes))} prompts x "
            f"{args.growth_samples} continuations at alpha {', '.join(f'{a:g}' for a in alphas)}; {evaluation}. "
            f"Each size evaluated {args.growth_repeats} time(s) (median (min - max) where more than once, the "
            f"order rotating) after a warm-up. `seconds = a + b * prompts` is fitted by least squares to every "
            f"measurement, for the whole `evaluate()` call and for each of its parts (the parts' lines add up to "
            f"the whole's).\n\n"
            f"Scaled to {PROTOCOL_SAMPLES} continuations: generation, perplexity and scoring times "
            f"{PROTOCOL_SAMPLES}/{args.growth_samples}, the rest as measured. An approximation (a batch of more rows "
            f"costs less per row, and a prompt is run once for all its samples) that `--growth-samples "
            f"{PROTOCOL_SAMPLES}` replaces by a measurement. Every prompt is padded to the run's longest: "
            f"{widest} tokens over all {len(pool):,} prompts of the two files, against the widths below, so a "
            f"larger run can cost more per prompt than these.\n\n"
            + growth_tables(points, widths, args.growth_samples))

    results.write("evaluation_cost", "Evaluation cost", "\n\n".join(sections))
