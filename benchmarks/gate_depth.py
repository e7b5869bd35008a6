"""What a shallower gate costs and saves: the shipped gated checkpoint with its gate heads taken from the first
`layers` decoder layers only (`GateSettings.layers`) against its gate over all layers.

A gate's shadow pass runs the unsteered model up to its deepest gate head's layer, so a gate whose heads sit deep
costs about one more forward per step. For each depth (the other gate settings as the checkpoint stores them, its
threshold included, which was chosen for the gate over all layers):

(A checkpoint without a gate gets the frontier's smooth gate.)

- the deepest layer the shadow pass runs, and the gate heads' mean probe accuracy (held-out pairs);
- the AUROC of the gate's score at each prompt's last token, toxic against non-toxic prompts of the sample;
- gated against ungated generation time (the evaluation sampler, the gate on and off in turn, as `throughput`);
- the development protocol's metrics on the `tune` sample (`--per-subset` + as many prompts, `--samples`
  continuations), with the toxic-prompt EMT difference against the gate over all layers and its paired bootstrap
  interval over prompts.

Runs are stored under `runs/gate_depth/` and resume. Writes `docs/results/gate_depth.md`.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace
from pathlib import Path

from benchmarks.claims import paired_bootstrap, per_prompt_max
from benchmarks.evaluation_cost import first, mixed_prompts
from benchmarks.frontier import GATE, evaluate_setting, split_prompts, stored_runs, summarize
from benchmarks.results import Results, shown
from benchmarks.throughput import GATED, gate_ratio
from benchmarks.timing import spread
from destein_pl import GateSettings, SteeredCausalLM


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", type=Path, default=GATED, help="a gated checkpoint")
    parser.add_argument("--layers", type=int, nargs="+", default=[10, 6],
                        help="gate depths to compare with the gate over all layers")
    parser.add_argument("--per-subset", type=int, default=50, help="toxic (and non-toxic) prompts of the tune sample")
    parser.add_argument("--samples", type=int, default=10, help="continuations per prompt")
    parser.add_argument("--tokens", type=int, default=20, help="new tokens per continuation")
    parser.add_argument("--timing-prompts", type=int, default=6, help="prompts of the generation timing")
    parser.add_argument("--timing-samples", type=int, default=25, help="continuations per prompt of the timing")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of the generation timing")


def run(args: argparse.Namespace, results: Results) -> None:
    from sklearn.metrics import roc_auc_score

    steered = SteeredCausalLM.from_checkpoint(args.ckpt)
    steered.model.set_attn_implementation("eager")
    gate = steered.gate if steered.gate.enabled else GateSettings(**GATE)
    probes = steered.gate_probes
    if probes is None:
        raise SystemExit(f"gate_depth: {args.ckpt} has no gate probes")
    prompts = split_prompts("tune", args.per_subset)
    toxic = [p.subset == "toxic" for p in prompts]
    timing_prompts = first(mixed_prompts(), args.timing_prompts)
    out = stored_runs("gate_depth", results.runs, "tune", args.per_subset, args.samples, args.tokens)
    alpha = steered.alpha

    steered.alpha = 0.0
    evaluate_setting(steered, prompts, out / "base", args.samples, args.tokens, {"series": "base", "alpha": 0.0})
    steered.alpha = alpha
    rows = []
    for layers in (None, *args.layers):
        settings = replace(gate, layers=layers)
        steered.set_gate(settings, probes)
        heads = probes.top_heads(settings.heads, layers)
        name = "all" if layers is None else f"layers-{layers}"
        scores = [float(steered.gate_values(steered.tokenizer(p.text, return_tensors="pt").input_ids)[1][0, -1])
                  for p in prompts]
        ratio = gate_ratio(steered, timing_prompts, args.timing_samples, args.tokens, args.repeats)
        evaluate_setting(steered, prompts, out / name, args.samples, args.tokens,
                         {"series": name, "alpha": alpha, "gate": settings.metadata()})
        rows.append({"name": name, "layers": layers, "deepest": max(layer for layer, _ in heads),
                     "accuracy": statistics.fmean(float(probes.accuracy[la, h]) for la, h in heads),
                     "auroc": roc_auc_score(toxic, scores), "ratio": ratio, **summarize(out / name)})
    base = summarize(out / "base")

    def metric(row: dict, subset: str, key: str, digits: int) -> str:
        value, reference = row[subset][key], base[subset][key]
        return f"{value:.{digits}f} ({100 * (value / reference - 1):+.1f}%)"

    lines = ["| gate heads from | deepest layer run | mean head accuracy | AUROC | gated / ungated time | toxic EMT | "
             "toxic PPL | non-toxic EMT | non-toxic PPL | toxic EMT - all layers' [95%] |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    lines.append(f"| base (alpha 0) | | | | | {base['toxic']['emt']:.3f} | {base['toxic']['ppl']:.2f} | "
                 f"{base['nontoxic']['emt']:.3f} | {base['nontoxic']['ppl']:.2f} | |")
    reference = per_prompt_max(out / "all", "toxic")
    for row in rows:
        if row["layers"] is None:
            difference = ""
        else:
            diff, low, high = paired_bootstrap(per_prompt_max(out / row["name"], "toxic"), reference)
            difference = f"{diff:+.3f} [{low:+.3f}, {high:+.3f}]"
        label = "all layers" if row["layers"] is None else f"the first {row['layers']} layers"
        lines.append(f"| {label} | {row['deepest']} | {row['accuracy']:.3f} | {row['auroc']:.3f} | "
                     f"{spread(row['ratio'], 2)} | {metric(row, 'toxic', 'emt', 3)} | {metric(row, 'toxic', 'ppl', 2)} "
                     f"| {metric(row, 'nontoxic', 'emt', 3)} | {metric(row, 'nontoxic', 'ppl', 2)} | {difference} |")
    results.write("gate_depth", "Gate depth: a shallower gate against the gate over all layers", (
        f"`{shown(args.ckpt)}` on {steered.base_model} ({steered.num_layers} layers; alpha {alpha:g}, its gate: "
        f"{gate.mode}, threshold {gate.threshold:g}, {gate.heads} heads, window {gate.window}), with the gate heads "
        f"taken from the first `layers` layers (`--model.gate.layers`). Deepest layer run: the shadow pass's last "
        f"layer (counting from 0). Mean head accuracy: the gate heads' probes on held-out pairs. AUROC: the gate's "
        f"score at the last token, toxic against non-toxic prompts. Time: the evaluation sampler on "
        f"{args.timing_prompts} prompts x {args.timing_samples} continuations of {args.tokens} tokens, gate on "
        f"over gate off, median (min - max) of {args.repeats} repetitions. Metrics: the development protocol's "
        f"`tune` sample ({args.per_subset} toxic + {args.per_subset} non-toxic prompts, {args.samples} "
        f"continuations), percentages against the base model; the last column is a paired bootstrap over the toxic "
        f"prompts. The threshold was chosen for the gate over all layers and is kept.\n\n" + "\n".join(lines)))
