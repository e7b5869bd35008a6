"""The `self` rewriter on the embedded SmolLM2-135M: the paper's instruction against few-shot ParaDetox demonstrations.

    python -m benchmarks self_rewriter [--n 30] [--seed 0] [--modes instruction,fewshot] [--examples 8]
        [--num-demonstrations 8] [--num-candidates 8] [--min-overlap 0.4] [--min-length-ratio 0.5]
        [--max-length-ratio 1.5] [--temperature 0.7] [--banned-word-weight 2.0]

(the few-shot options default to `SelfRewriter`'s; `--model` rewrites with another model, a folder or a built-in
name).

Rewrites `n` toxic ParaDetox sentences (a seeded sample of those the `profanity-check` scorer calls toxic, none of
them among the few-shot rewriter's drawn demonstrations) in each mode, and writes `docs/results/self_rewriter.md`: a
markdown table of how many rewrites came back (not None), their mean content-word overlap with the source (the
rewriter's own measure), how many still score toxic, the mean |per-token log-likelihood gap| between the two sides
under the model, how many would pass `induce`'s filters (non-toxic, gap <= `--max-gap`), and the seconds it took;
then example pairs.
"""

from __future__ import annotations

import argparse
import inspect
import random
import statistics
from functools import partial

from benchmarks.results import DATA, Results
from benchmarks.timing import timed
from destein_pl import SteeredCausalLM, load_base_model
from destein_pl.calibration.pairs import read_pairs, usable_pairs
from destein_pl.evaluation.scorers import build_scorer
from destein_pl.induce.pipeline import log_likelihoods
from destein_pl.induce.rewriters import LexicalRewriter, RewriteContext, SelfRewriter
from destein_pl.induce.rewriters.text import content_overlap

MODEL = "smollm2-135m"
PARADETOX = DATA / "paradetox" / "paradetox.tsv"


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=MODEL, help=f"the model that rewrites (default {MODEL})")
    parser.add_argument("--n", type=int, default=30, help="toxic sentences to rewrite")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sentences' sample")
    parser.add_argument("--data", default=str(PARADETOX), help="ParaDetox TSV: sentences and demonstrations")
    parser.add_argument("--modes", default="instruction,fewshot", help="comma-separated: instruction, fewshot")
    parser.add_argument("--examples", type=int, default=8, help="example pairs to print")
    parser.add_argument("--max-gap", type=float, default=1.0, help="induce's max_loglik_gap, for the pass count")
    defaults = {name: p.default for name, p in inspect.signature(SelfRewriter).parameters.items()}
    for name, kind in (("num_demonstrations", int), ("num_candidates", int), ("min_overlap", float),
                       ("min_length_ratio", float), ("max_length_ratio", float), ("temperature", float)):
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=defaults[name],
                            help=f"the rewriter's option (default {defaults[name]})")
    parser.add_argument("--banned-word-weight", type=float, default=defaults["banned_word_weight"],
                        help="<= 0: no word is forbidden")
    parser.add_argument("--batch-size", type=int, default=16)


def mean(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f}" if values else "-"


def run(args: argparse.Namespace, results: Results) -> None:
    fewshot = SelfRewriter(
        demonstrations=args.data, num_demonstrations=args.num_demonstrations, num_candidates=args.num_candidates,
        min_overlap=args.min_overlap, min_length_ratio=args.min_length_ratio, max_length_ratio=args.max_length_ratio,
        temperature=args.temperature, banned_word_weight=args.banned_word_weight if args.banned_word_weight > 0
        else None, batch_size=args.batch_size,
    )
    rewriters = {"instruction": SelfRewriter(batch_size=args.batch_size), "fewshot": fewshot}
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - set(rewriters)
    if unknown:
        raise SystemExit(f"unknown modes {sorted(unknown)}; accepted: {', '.join(rewriters)}")

    scorer = build_scorer("profanity-check")
    scorer.setup()
    fewshot.setup()
    drawn = {(p.toxic, p.nontoxic) for p in fewshot.pool}
    pairs, _ = usable_pairs(read_pairs(args.data))
    candidates = [p.toxic for p in pairs if (p.toxic, p.nontoxic) not in drawn]
    random.Random(args.seed).shuffle(candidates)
    texts: list[str] = []
    for start in range(0, len(candidates), 500):  # score in chunks until enough toxic sentences are found
        chunk = candidates[start : start + 500]
        texts += [t for t, s in zip(chunk, scorer.score(chunk)) if s is not None and s >= 0.5]
        if len(texts) >= args.n:
            break
    texts = texts[: args.n]

    lexical = LexicalRewriter()
    lexical.setup()
    model, tokenizer = load_base_model(args.model)
    steered = SteeredCausalLM(model, tokenizer)
    source_loglik = log_likelihoods(steered, texts)
    rows, outputs = [], {}
    for mode in modes:
        rewriting = timed(partial(rewriters[mode].rewrite, texts, RewriteContext(steered)))
        out, seconds = rewriting.value, rewriting.seconds
        outputs[mode] = out
        kept = [(i, r) for i, r in enumerate(out) if r is not None]
        scores = scorer.score([r for _, r in kept])
        logliks = log_likelihoods(steered, [r for _, r in kept])
        gaps = [abs(source_loglik[i] - ll) for (i, _), ll in zip(kept, logliks)
                if ll is not None and source_loglik[i] is not None]
        overlaps = [content_overlap(texts[i], r, lexical.is_toxic) for i, r in kept]
        toxic = sum(s is None or s >= 0.5 for s in scores)
        passing = sum(s is not None and s < 0.5 and ll is not None and source_loglik[i] is not None
                      and abs(source_loglik[i] - ll) <= args.max_gap
                      for (i, _), s, ll in zip(kept, scores, logliks))
        rows.append(f"| {mode} | {len(kept)}/{len(texts)} | {mean(overlaps)} | {toxic} | {mean(gaps)} | "
                    f"{passing} | {seconds:.0f} |")

    examples = []
    for i in range(min(args.examples, len(texts))):
        examples += [f"- toxic: {texts[i]}", *(f"  - {mode}: {outputs[mode][i]}" for mode in modes)]
    results.write("self_rewriter", "The `self` rewriter: the paper's instruction against few-shot demonstrations", (
        f"{len(texts)} toxic ParaDetox sentences (seed {args.seed}); few-shot options: "
        f"num_demonstrations={args.num_demonstrations}, num_candidates={args.num_candidates}, "
        f"min_overlap={args.min_overlap}, length ratio [{args.min_length_ratio}, {args.max_length_ratio}], "
        f"temperature={args.temperature}, banned_word_weight={args.banned_word_weight}\n\n"
        f"| mode | returned | mean overlap | still toxic | mean abs loglik gap | pass filters (gap <= "
        f"{args.max_gap}) | seconds |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n" + "\n".join(rows)
        + "\n\nExamples:\n\n" + "\n".join(examples)))
