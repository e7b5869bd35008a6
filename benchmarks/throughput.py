"""The evaluation throughput goals, each measured now and with the sampler as it was before the throughput work
(`evaluation_profile --sampler before`: the same tokens, more work), in one run:

1. the evaluation sampler against `generate(num_return_sequences)` on the same prompts and settings (tokens/s,
   both timed in turn; `evaluation_cost`'s measurement);
2. the share of a steered evaluation's time outside generation (`evaluate`, the timing `results.json` records);
3. gated against ungated generation: the evaluation sampler with the gated checkpoint (`--gated`), its gate on and
   off, on the same prompts (time per run, in turn);
4. one point of the development protocol end to end: `evaluate` of the shipped checkpoint at its alpha on
   `--point-per-subset` toxic and as many non-toxic prompts of the frontier's `tune` sample, `--point-samples`
   continuations each; and whether its metrics are the same both ways.

Then, the sampler as it is now, with the two options that change numerics and so are not defaults: the perplexity
model loaded separately in bfloat16 (`perplexity_model: <the base model>`, `perplexity_model_dtype: bfloat16`;
measurements 2 and 4, with its perplexities against the float32 ones of the same continuations) and the gate heads
taken from the first `--gate-layers` layers (`gate.layers`; measurement 3; `gate_depth` measures what it does to
the metrics).

The SmolLM2-135M checkpoints shipped, 20 new tokens, nucleus 0.9. Writes `docs/results/throughput.md`.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from contextlib import nullcontext
from pathlib import Path

from benchmarks.evaluation import evaluation_config, sampling
from benchmarks.evaluation_cost import CHECKPOINT, first, mixed_prompts, sampler_rates, timed_evaluation
from benchmarks.evaluation_profile import as_before
from benchmarks.frontier import split_prompts
from benchmarks.results import ROOT, Results, shown
from benchmarks.timing import in_turn, spread, timed
from destein_pl import SteeredCausalLM, evaluate
from destein_pl.evaluation.sampling import PromptSampler

GATED = ROOT / "checkpoints" / "smollm2-135m-gated.ckpt"
WAYS = ("before", "now")


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", type=Path, default=CHECKPOINT, help="the ungated checkpoint")
    parser.add_argument("--gated", type=Path, default=GATED, help="the gated checkpoint")
    parser.add_argument("--samples", type=int, default=25, help="continuations per prompt in measurements 1 to 3")
    parser.add_argument("--tokens", type=int, default=20, help="new tokens per continuation")
    parser.add_argument("--sampler-prompts", type=int, default=6, help="prompts of measurements 1 and 3")
    parser.add_argument("--split-prompts", type=int, default=12, help="prompts of measurement 2")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of measurements 1 to 3")
    parser.add_argument("--point-per-subset", type=int, default=100, help="toxic (and non-toxic) prompts of 4")
    parser.add_argument("--point-samples", type=int, default=10, help="continuations per prompt of 4")
    parser.add_argument("--gate-layers", type=int, default=10, help="the gate option's depth (`gate.layers`)")


def way(name: str):
    """The sampler as it is (`now`) or as it was (`before`)."""
    return as_before() if name == "before" else nullcontext()


def gate_ratio(steered: SteeredCausalLM, prompts, samples: int, tokens: int, repeats: int) -> list[float]:
    """Seconds of the gated sampler over the same sampler with the gate off, per repetition."""
    sampler = PromptSampler(steered, sampling(samples, tokens))
    sampler.fix_width(prompts)
    gate, probes = steered.gate, steered.gate_probes

    def gated():
        steered.set_gate(gate, probes)
        sampler(prompts, log_probs=False)

    def ungated():
        steered.set_gate(None)
        sampler(prompts, log_probs=False)

    runs = in_turn({"gated": gated, "ungated": ungated}, repeats)
    steered.set_gate(gate, probes)
    return [g.seconds / u.seconds for g, u in zip(runs["gated"], runs["ungated"])]


def protocol_point(steered: SteeredCausalLM, args: argparse.Namespace, **options):
    """`evaluate` of one protocol point, timed: its seconds and its metrics per alpha."""
    with tempfile.TemporaryDirectory(prefix="throughput-") as folder:
        config = dataclasses.replace(evaluation_config(folder, [steered.alpha], args.point_samples, args.tokens),
                                     **options)
        point = timed(lambda: evaluate(steered, split_prompts("tune", args.point_per_subset), config,
                                       batch_size=4, progress=False, verbose=False))
    return point.seconds, [r["metrics"] for r in point.value["runs"]]


def run(args: argparse.Namespace, results: Results) -> None:
    steered = SteeredCausalLM.from_checkpoint(args.ckpt)
    steered.model.set_attn_implementation("eager")
    gated = SteeredCausalLM.from_checkpoint(args.gated)
    gated.model.set_attn_implementation("eager")
    prompts = mixed_prompts()
    measured: dict[str, dict[str, list[float] | float | dict]] = {}
    for name in WAYS:
        with way(name):
            rates = list(sampler_rates(steered, first(prompts, args.sampler_prompts), args.samples, args.tokens,
                                       args.repeats).values())
            timed_evaluation(steered, first(prompts, 2), 1, args.tokens, [steered.alpha], 4)  # warm-up
            shares = [timed_evaluation(steered, first(prompts, args.split_prompts), args.samples, args.tokens,
                                       [steered.alpha], 4)["outside_generate_share"] for _ in range(args.repeats)]
            gates = gate_ratio(gated, first(prompts, args.sampler_prompts), args.samples, args.tokens, args.repeats)
            point_s, metrics = protocol_point(steered, args)
        measured[name] = {"sampler": [a / b for a, b in zip(*rates)], "share": shares, "gate": gates,
                          "point_s": point_s, "metrics": metrics}
    before, now = measured["before"], measured["now"]
    same = before["metrics"] == now["metrics"]
    judge = {"perplexity_model": steered.base_model, "perplexity_model_dtype": "bfloat16"}
    timed_evaluation(steered, first(prompts, 2), 1, args.tokens, [steered.alpha], 4, **judge)  # loads it once
    option_shares = [timed_evaluation(steered, first(prompts, args.split_prompts), args.samples, args.tokens,
                                      [steered.alpha], 4, **judge)["outside_generate_share"]
                     for _ in range(args.repeats)]
    gated.set_gate(dataclasses.replace(gated.gate, layers=args.gate_layers), gated.gate_probes)
    option_gates = gate_ratio(gated, first(prompts, args.sampler_prompts), args.samples, args.tokens, args.repeats)
    option_point_s, option_metrics = protocol_point(steered, args, **judge)
    emt_same = all(a[s]["emt"] == b[s]["emt"] for a, b in zip(now["metrics"], option_metrics) for s in a)
    ppl_change = ", ".join(f"{subset} {100 * (option_metrics[0][subset]['ppl'] / m['ppl'] - 1):+.2f}%"
                           for subset, m in now["metrics"][0].items())
    rows = [
        ("sampler tokens/s / `generate(num_return_sequences)` tokens/s", ">= 2", spread(before["sampler"], 2),
         spread(now["sampler"], 2), ""),
        ("time outside generation, steered evaluation (%)", "< 10", spread([100 * v for v in before["share"]], 1),
         spread([100 * v for v in now["share"]], 1), f"{spread([100 * v for v in option_shares], 1)} (judge)"),
        ("gated / ungated generation time", "<= 1.15", spread(before["gate"], 2), spread(now["gate"], 2),
         f"{spread(option_gates, 2)} (gate layers)"),
        (f"one protocol point ({2 * args.point_per_subset} prompts x {args.point_samples}), s", "before / now >= 2",
         f"{before['point_s']:.0f}", f"{now['point_s']:.0f} (before / now: {before['point_s'] / now['point_s']:.2f})",
         f"{option_point_s:.0f} (judge; before / this: {before['point_s'] / option_point_s:.2f})"),
    ]
    results.write("throughput", "Evaluation throughput: the goals, before and now", (
        f"`{shown(args.ckpt)}` (alpha {steered.alpha:g}) and `{shown(args.gated)}` on smollm2-135m, {args.tokens} "
        f"new tokens, nucleus 0.9, eager attention. Measurements 1 to 3: {args.sampler_prompts} prompts "
        f"(2: {args.split_prompts}) x {args.samples} continuations, median (min - max) of {args.repeats} "
        f"repetitions after a warm-up; measurement 4 once each way. *Before* is the sampler as it was before the "
        f"throughput work (a full sort of the vocabulary for every nucleus choice, every step's log-softmax "
        f"computed), patched in for this run; it draws the same tokens. The protocol point's metrics are "
        f"{'the same' if same else 'NOT the same'} both ways. *Now, with an option*: the sampler now with one option "
        f"that changes numerics: *judge*, the perplexity model loaded separately in bfloat16 "
        f"(`--model.evaluation.perplexity_model {steered.base_model} --model.evaluation.perplexity_model_dtype "
        f"bfloat16`), which leaves the continuations and their EMT {'the same' if emt_same else 'NOT the same'} and "
        f"changes the protocol point's perplexities by {ppl_change}; *gate layers*, the gate heads from the first "
        f"{args.gate_layers} layers (`--model.gate.layers {args.gate_layers}`; what it does to the metrics: "
        f"`gate_depth`).\n\n"
        "| measurement | goal | before | now | now, with an option |\n|---|---|---:|---:|---:|\n"
        + "\n".join(f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in rows)))
    if not same:
        raise SystemExit("throughput: the protocol point's metrics differ between the sampler before and now")
