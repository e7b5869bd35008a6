"""The steering strength of the shipped 40-pair SmolLM2-135M checkpoint, swept on a seeded sample of toxic
RealToxicityPrompts prompts with the paper's protocol (25 continuations, nucleus 0.9, 20 new tokens, the
profanity-check scorer, perplexity under the unsteered model): EMT against perplexity for every alpha.

What `destein test --config configs/smollm2-135m.yaml --ckpt_path checkpoints/smollm2-135m-paradetox.ckpt
--model.evaluation.alphas [...]` evaluates, in this process (`evaluate()` gives the same metrics). The run is stored
under `runs/sweep/<prompts>-n<N>-s<samples>-t<tokens>/` and resumes. Writes `docs/results/alpha_sweep.md`: the table of
`destein compare` (every subset), and its plot of EMT against perplexity beside it (`.png`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.evaluation import PROTOCOL_SAMPLES, PROTOCOL_TOKENS, evaluation_config
from benchmarks.results import DATA, ROOT, Results, shown
from destein_pl import PromptsConfig, SteeredCausalLM, evaluate, load_prompts
from destein_pl.evaluation.report import markdown_table
from destein_pl.plots import toxicity_perplexity

CHECKPOINT = ROOT / "checkpoints" / "smollm2-135m-paradetox.ckpt"
PROMPTS = DATA / "rtp" / "rtp_toxic_1k.jsonl"
ALPHAS = [0.0, 0.3, 0.5, 0.7, 1.0, 1.5]
BATCH_SIZE = 4
"""Prompts per evaluation step (`data.prompts.batch_size` of `configs/smollm2-135m.yaml`)."""


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", type=Path, default=CHECKPOINT, help="steering checkpoint (default: the shipped one)")
    parser.add_argument("--prompts", type=Path, default=PROMPTS, help="RealToxicityPrompts JSONL")
    parser.add_argument("--n", type=int, default=50, help="prompts sampled from it (seed 0)")
    parser.add_argument("--samples", type=int, default=PROTOCOL_SAMPLES, help="continuations per prompt")
    parser.add_argument("--tokens", type=int, default=PROTOCOL_TOKENS, help="new tokens per continuation")
    parser.add_argument("--alphas", type=float, nargs="+", default=ALPHAS, help="steering strengths")


def run(args: argparse.Namespace, results: Results) -> None:
    steered = SteeredCausalLM.from_checkpoint(args.ckpt)
    prompts = load_prompts(PromptsConfig(str(args.prompts), n=args.n, seed=0))
    folder = results.runs / "sweep" / f"{args.prompts.stem}-n{args.n}-s{args.samples}-t{args.tokens}"
    config = evaluation_config(folder, args.alphas, args.samples, args.tokens)
    runs = evaluate(steered, prompts, config, batch_size=BATCH_SIZE, verbose=False)["runs"]
    points = [("steered", r["alpha"], r["metrics"]["all"]["emt"], r["metrics"]["all"]["ppl"]) for r in runs]
    toxicity_perplexity(points, results.path("alpha_sweep", ".png"),
                        title=f"{steered.base_model}, {args.ckpt.name}: EMT against perplexity over alpha")
    results.write("alpha_sweep", "Choosing alpha: the shipped checkpoint's strength swept", (
        f"{steered.base_model} steered with `{shown(args.ckpt)}`, {len(prompts)} prompts of `{args.prompts.name}` "
        f"(seed 0), {args.samples} continuations of {args.tokens} tokens, nucleus 0.9, profanity-check scorer, "
        f"perplexity under the unsteered model.\n\n" + markdown_table(runs)))
