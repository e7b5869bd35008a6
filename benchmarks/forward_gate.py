"""The forward-looking gate: continuation probes fit for a frontier's steering checkpoint, and how well its score
predicts a toxic continuation on the tune sample, against the context gate's.

    python -m benchmarks forward_gate [--model smollm2-135m] [--samples 5] [--pairs 200] [--tune-samples 5]
    python -m benchmarks forward_gate --target share     # labels: the share of toxic continuations, not their mean
    python -m benchmarks forward_gate --alpha A --floor F --out checkpoints/NAME.ckpt   # a setting chosen on tune,
                                                                     # written from the same probes (labels stored)

1. **Fit** (`destein_pl.calibration.continuation_gate.write_continuation_gate`, what `destein gate` does): on prompts
   that neither sample of the development protocol uses, the 800 + 800 RealToxicityPrompts prompts after the tune and
   report samples in each seeded shuffle of `../shared/data/rtp/rtp_{toxic,nontoxic}_1k.jsonl`, and the sentences of
   `--pairs` ParaDetox pairs (a seeded sample, both sides without cues); `--samples` continuations each, from the
   unsteered model, stored under `runs/forward_gate/<model>/labels/` (resumed). The checkpoint is the frontier's
   steering checkpoint with the probes and a smooth gate reading them (its threshold the best on the validation
   prompts): `runs/checkpoints/<model>-forward-gated.ckpt` (or `--out`, at `--alpha` with the gate's `--floor`), made
   only when missing.
2. **Measure** on the tune sample (`benchmarks/frontier.py`): each gate's score at every prompt's last token, the
   context gate's (the frontier's `GATE`) and the forward gate's, against whether any of the base model's stored
   continuations of the prompt is toxic (>= 0.5), from the frontier's base run on tune with `--tune-samples`
   continuations (run it first: `python -m benchmarks frontier --samples 5 --only base`).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from benchmarks.frontier import (
    FRONTIERS,
    GATE,
    GEMMA3_GATE,
    RTP,
    SMOLLM2,
    SPLIT_SEED,
    SUBSET_SIZE,
    model_tag,
    split_prompts,
    stored_records,
    stored_runs,
)
from benchmarks.results import DATA, Results, shown

PARADETOX = DATA / "paradetox" / "paradetox.tsv"
PAIRS_SEED = 1
CONTEXT_GATES = {SMOLLM2.model: GATE, "gemma3-270m": GEMMA3_GATE}
"""The context gate each frontier's gated settings use."""


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=list(FRONTIERS), default=SMOLLM2.model,
                        help=f"whose frontier checkpoint (default {SMOLLM2.model})")
    parser.add_argument("--samples", type=int, default=5, help="continuations per fitting prompt (default 5)")
    parser.add_argument("--pairs", type=int, default=200,
                        help="ParaDetox pairs whose sentences are added as fitting prompts (default 200)")
    parser.add_argument("--rtp", type=int, default=2 * (1000 - 2 * SUBSET_SIZE),
                        help="RealToxicityPrompts fitting prompts, half toxic (default: all 1,600 of neither sample)")
    parser.add_argument("--per-subset", type=int, default=SUBSET_SIZE,
                        help=f"tune prompts per subset measured (default {SUBSET_SIZE})")
    parser.add_argument("--tune-samples", type=int, default=5,
                        help="continuations per prompt of the stored frontier base run on tune (default 5)")
    parser.add_argument("--tokens", type=int, default=20, help="new tokens per continuation (default 20)")
    parser.add_argument("--toxic-at", type=float, default=0.5,
                        help="a fitting continuation is toxic when its score reaches this (default 0.5)")
    parser.add_argument("--target", choices=["mean", "share"], default="mean",
                        help="each fitting prompt's label: its continuations' mean toxicity (default) or the share "
                             "reaching --toxic-at")
    parser.add_argument("--out", type=Path, default=None,
                        help="the checkpoint to write (default runs/checkpoints/<model>-forward-gated.ckpt)")
    parser.add_argument("--alpha", type=float, default=None, help="its alpha (default: the frontier checkpoint's)")
    parser.add_argument("--floor", type=float, default=0.0, help="its gate's floor (default 0)")


def output_fields(args: argparse.Namespace) -> dict[str, str]:
    return {"model_tag": model_tag(args.model), "target_tag": target_tag(args.target)}


def target_tag(target: str) -> str:
    return "" if target == "mean" else f"-{target}"


def fitting_prompts(rtp: int, pairs: int):
    """The prompts the continuation probes are fit on: RealToxicityPrompts prompts of neither sample (`rtp`, half
    from each file, in shuffled order after the two samples) and the sentences of `pairs` ParaDetox pairs."""
    from destein_pl.calibration.continuation_gate import pair_prompts
    from destein_pl.calibration.pairs import PairsConfig
    from destein_pl.evaluation.prompts import read_rtp_jsonl

    prompts = []
    for name in ("rtp_toxic_1k.jsonl", "rtp_nontoxic_1k.jsonl"):
        rows = read_rtp_jsonl(RTP / name)
        random.Random(SPLIT_SEED).shuffle(rows)  # the shuffle `split_prompts` takes its two samples from
        prompts += rows[2 * SUBSET_SIZE :][: rtp // 2]
    if pairs:
        prompts += pair_prompts(PairsConfig(str(PARADETOX), m=pairs, seed=PAIRS_SEED, cues=False))
    return prompts


def forward_checkpoint(runs: Path, model: str, target: str) -> Path:
    """Where the forward-gated checkpoint of a frontier goes."""
    return runs / "checkpoints" / f"{model}-forward-gated{target_tag(target)}.ckpt"


def fit(args: argparse.Namespace, runs: Path) -> tuple[Path, str]:
    """The forward-gated checkpoint (made when missing) and a line on what its probes were fit on."""
    from destein_pl import GateSettings
    from destein_pl.calibration.continuation_gate import check_paths, write_continuation_gate
    from destein_pl.calibration.continuation_probes import ContinuationProbeOptions
    from destein_pl.evaluation.sampling import SamplingSettings
    from destein_pl.steering.checkpoint import read_checkpoint

    frontier = FRONTIERS[args.model]
    source = frontier.checkpoints[frontier.steering]
    target = args.out or forward_checkpoint(runs, args.model, args.target)
    if not target.is_file():
        prompts = fitting_prompts(args.rtp, args.pairs)
        options = ContinuationProbeOptions(sampling=SamplingSettings(num_samples=args.samples,
                                                                     max_new_tokens=args.tokens),
                                           target=args.target, toxic_at=args.toxic_at)
        started = time.perf_counter()
        target.parent.mkdir(parents=True, exist_ok=True)
        write_continuation_gate(*check_paths(str(source), str(target), overwrite=False), prompts,
                                runs / "forward_gate" / args.model / "labels", options,
                                gate=GateSettings("smooth", floor=args.floor), alpha=args.alpha)
        seconds = f", {time.perf_counter() - started:.0f} s"
    else:
        seconds = " (stored)"
    meta = read_checkpoint(target)[1]
    fitted, gate = meta["continuation_probes"], meta["options"]["gate"]
    line = (f"Continuation probes of `{shown(target)}`{seconds}: {fitted['prompts']} prompts "
            f"({args.rtp} RealToxicityPrompts of neither sample, the sentences of {args.pairs} ParaDetox pairs), "
            f"{fitted['samples']} continuations each, {100 * fitted['toxic_share']:.1f}% of them toxic; each prompt's "
            f"label is its continuations' {fitted['target']} (`target: {fitted['target']}`). On the "
            f"{round(fitted['prompts'] * fitted['val_fraction'])} validation prompts the forward gate's score has "
            f"AUROC {fitted['validation_auroc']:.3f} for a toxic continuation; the gate takes their best threshold, "
            f"{gate['threshold']:g}, and a third of their scores' standard deviation as its temperature, "
            f"{gate['temperature']:g}.")
    return target, line


def _context_gate(model: str):
    from destein_pl import GateSettings

    return GateSettings(**CONTEXT_GATES[model])


def last_token_scores(steered, prompts) -> list[float]:
    """The gate's score at each prompt's last token, on the prompt as the sampler feeds it."""
    from destein_pl.evaluation.sampling import PromptSampler, SamplingSettings

    sampler = PromptSampler(steered, SamplingSettings())
    return [float(steered.gate_values(torch.tensor([sampler.prompt_ids(p)]))[1][0, -1]) for p in prompts]


def run(args: argparse.Namespace, results: Results) -> None:
    from sklearn.metrics import roc_auc_score

    from destein_pl import SteeredCausalLM

    frontier = FRONTIERS[args.model]
    checkpoint, fitted_line = fit(args, results.runs)
    kind = "frontier" + model_tag(frontier.model).replace("-", "/", 1)
    base_run = stored_runs(kind, results.runs, "tune", args.per_subset, args.tune_samples, args.tokens) / "base"
    if not (base_run / "setting.json").is_file():
        raise SystemExit(f"no stored base run on tune under {base_run}; run `python -m benchmarks frontier --samples "
                         f"{args.tune_samples} --per-subset {args.per_subset} --only base"
                         f"{'' if frontier is SMOLLM2 else ' --model ' + frontier.model}` first")
    prompts = split_prompts("tune", args.per_subset)
    records = {r["id"]: r for r in stored_records(base_run, {"alpha": 0.0})}
    continuation = [any(t is not None and t >= 0.5 for t in records[p.id]["toxicity"]) for p in prompts]
    toxic_prompt = [p.subset == "toxic" for p in prompts]
    context = SteeredCausalLM.from_checkpoint(frontier.checkpoints[frontier.steering], gate=_context_gate(args.model))
    gates = {"context gate (probes on the pairs without cues)": context,
             "forward gate (continuation probes)": SteeredCausalLM.from_checkpoint(checkpoint)}
    head = ("| gate | threshold | AUROC: a toxic continuation, all prompts | AUROC: a toxic continuation, toxic "
            "prompts | AUROC: a toxic continuation, non-toxic prompts | AUROC: a toxic prompt |")
    lines = [head, "|---|---:|---:|---:|---:|---:|"]
    def auroc(scores: list[float], rows: list[int]) -> str:
        y = [continuation[i] for i in rows]
        return f"{roc_auc_score(y, [scores[i] for i in rows]):.3f}" if 0 < sum(y) < len(y) else "n/a"

    every = list(range(len(prompts)))
    for label, steered in gates.items():
        scores = last_token_scores(steered, prompts)
        lines.append(f"| {label} | {steered.gate.threshold:g} | {auroc(scores, every)} | "
                     f"{auroc(scores, [i for i in every if toxic_prompt[i]])} | "
                     f"{auroc(scores, [i for i in every if not toxic_prompt[i]])} | "
                     f"{roc_auc_score(toxic_prompt, scores):.3f} |")
    share = sum(continuation) / len(continuation)
    results.write(f"forward_gate{model_tag(args.model)}{target_tag(args.target)}", f"The forward-looking gate of {frontier.title}", (
        f"{fitted_line}\n\nTune sample of the development protocol ({args.per_subset} toxic + {args.per_subset} "
        f"non-toxic prompts). Each gate's score at a prompt's last token (top {GATE['heads']} heads, window "
        f"{GATE['window']}) against whether any of the base model's {args.tune_samples} stored continuations of it "
        f"is toxic (profanity-check >= 0.5; {100 * share:.0f}% of the prompts), overall and within each subset, and "
        f"against the prompt's own subset.\n\n" + "\n".join(lines)))
