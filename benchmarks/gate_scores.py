"""How well the gate's score separates a sample's toxic from its non-toxic prompts (AUROC), read at each prompt's
last token, for the gate's probes (fit without cues) and for the head-weight probes (fit on the cued pairs); and the
threshold that best separates them (balanced accuracy): what sets the smooth gate's threshold in
`benchmarks/frontier.py`.

Prompts: the development protocol's `tune` (or `report`) sample of `benchmarks/frontier.py`. The score is the hard
gate's, with the frontier's heads and window. Writes `docs/results/gate_scores-<split>.md` (another `--model`:
`gate_scores-<model>-<split>.md`).
"""

from __future__ import annotations

import argparse
import statistics

from benchmarks.frontier import FRONTIERS, GATE, SMOLLM2, SUBSET_SIZE, model_tag, split_prompts
from benchmarks.results import Results
from destein_pl import GateSettings, SteeredCausalLM
from destein_pl.steering.checkpoint import read_checkpoint
from destein_pl.steering.probes import HEAD_WEIGHT_PREFIX, Probes


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split", choices=["tune", "report"], default="tune", help="prompt sample")
    parser.add_argument("--per-subset", type=int, default=SUBSET_SIZE,
                        help=f"prompts of each subset (protocol: {SUBSET_SIZE}); fewer: the first of the sample")
    parser.add_argument("--model", choices=list(FRONTIERS), default=SMOLLM2.model,
                        help=f"whose frontier checkpoints (default {SMOLLM2.model})")
    parser.add_argument("--checkpoints", nargs="+", default=["paradetox-40", "paradetox-1000"],
                        help="the frontier checkpoints whose probes are measured (default: paradetox-40 "
                             "paradetox-1000)")


def output_fields(args: argparse.Namespace) -> dict[str, str]:
    return {"model_tag": model_tag(args.model)}


def run(args: argparse.Namespace, results: Results) -> None:
    from sklearn.metrics import roc_auc_score

    checkpoints = FRONTIERS[args.model].checkpoints
    unknown = sorted(set(args.checkpoints) - set(checkpoints))
    if unknown:
        raise SystemExit(f"--checkpoints: {args.model} has no checkpoint named {', '.join(unknown)}; it has "
                         f"{', '.join(checkpoints)}")
    prompts = split_prompts(args.split, args.per_subset)
    toxic = [p.subset == "toxic" for p in prompts]
    gate = GateSettings(**{**GATE, "mode": "hard"})
    lines = ["| checkpoint | probes | AUROC | median score, toxic | median score, non-toxic | best threshold |",
             "|---|---|---:|---:|---:|---:|"]
    for name in args.checkpoints:
        steered = SteeredCausalLM.from_checkpoint(checkpoints[name])
        tensors = read_checkpoint(checkpoints[name])[0]
        cued = Probes.from_arrays(tensors, f"probes.{HEAD_WEIGHT_PREFIX}")
        for label, probes in (("gate probes (no cues)", steered.gate_probes), ("head-weight probes (cued)", cued)):
            steered.set_gate(gate, probes)
            scores = [float(steered.gate_values(steered.tokenizer(p.text, return_tensors="pt").input_ids)[1][0, -1])
                      for p in prompts]
            tox = [v for v, t in zip(scores, toxic) if t]
            non = [v for v, t in zip(scores, toxic) if not t]
            best = max(scores, key=lambda t: sum(v >= t for v in tox) / len(tox) + sum(v < t for v in non) / len(non))
            lines.append(f"| {name} | {label} | {roc_auc_score(toxic, scores):.3f} | {statistics.median(tox):.3f} | "
                         f"{statistics.median(non):.3f} | {best:.3f} |")
    title = "" if args.model == SMOLLM2.model else f" of {FRONTIERS[args.model].title}"
    results.write(f"gate_scores{model_tag(args.model)}-{args.split}", f"Gate scores{title} on the {args.split} sample", (
        f"The `{args.split}` sample of the development protocol ({len(tox)} toxic + {len(non)} non-toxic prompts), "
        f"each scored at its last token by the gate of the top {GATE['heads']} heads by probe accuracy, over a "
        f"window of {GATE['window']} tokens. AUROC of the score for toxic against non-toxic prompts; the best "
        f"threshold maximises balanced accuracy.\n\n" + "\n".join(lines)))
