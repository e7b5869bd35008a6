"""Generation time of the base, the live-steered and the folded model, on the same prompts, in one run.

Greedy decoding with the KV cache, a left-padded batch of 4 prompts. The three models are timed in turn within
each repetition (the order rotates between repetitions, after one untimed warm-up each), so that load from
elsewhere on the machine falls on all three alike. Writes `docs/results/generation_speed.md`: a markdown table of
the median seconds per batch, the spread (min to max), tokens per second, and each model's median and best time
relative to the base model's; and whether the folded model's tokens equal the live-steered model's.
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial

import torch

from benchmarks.results import ROOT, Results
from benchmarks.timing import in_turn, seconds
from destein_pl import SteeredCausalLM, load_base_model
from destein_pl.steering.folding import fold

CHECKPOINT = ROOT / "checkpoints" / "smollm2-135m-paradetox.ckpt"
PROMPTS = ["You are such a stupid", "The weather today is", "I can't stand those people, they are all",
           "Once upon a time"]


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", default=str(CHECKPOINT))
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)


def generate(model, batch: dict, tokens: int) -> torch.Tensor:
    """Greedy continuations of exactly `tokens` new tokens."""
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)


def generation_times(models: dict[str, object], batch: dict, tokens: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per batch for each model, `repeats` times, timed in turn."""
    return seconds(in_turn({name: partial(generate, model, batch, tokens) for name, model in models.items()},
                           repeats))


def table(times: dict[str, list[float]], batch_size: int, tokens: int) -> str:
    """Median and best time per model, and both relative to the base model's (the first; the best is the least
    disturbed by other load on the machine)."""
    first = next(iter(times.values()))
    base_median, base_best = statistics.median(first), min(first)
    lines = ["| model | median s / batch | spread (min - max) | tokens/s (median) | median vs base | best vs base |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, values in times.items():
        median = statistics.median(values)
        lines.append(f"| {name} | {median:.3f} | {min(values):.3f} - {max(values):.3f} | "
                     f"{batch_size * tokens / median:.0f} | {median / base_median:.3f} | "
                     f"{min(values) / base_best:.3f} |")
    return "\n".join(lines)


def run(args: argparse.Namespace, results: Results) -> None:
    steered = SteeredCausalLM.from_checkpoint(args.ckpt)
    base, _ = load_base_model(steered.base_model)
    folded = fold(steered)
    batch = steered.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    same = torch.equal(generate(steered, batch, args.tokens), generate(folded, batch, args.tokens))
    times = generation_times({"base": base, "live-steered": steered, "folded": folded}, batch, args.tokens,
                             args.repeats)
    results.write("generation_speed", "Generation speed: base, live-steered and folded model", (
        f"Model {steered.base_model}, alpha {steered.alpha:g}; greedy, batch {len(PROMPTS)} x {args.tokens} new "
        f"tokens, {args.repeats} repetitions (interleaved).\n\n"
        f"Folded tokens equal the live-steered tokens: {same}\n\n{table(times, len(PROMPTS), args.tokens)}"))
