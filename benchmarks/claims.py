"""The paper's ablation claims (its Tables 5, 9 and 11), measured on SmolLM2-135M (or `--model`, e.g. gemma3-270m)
with the development protocol of `benchmarks/frontier.py` (same seeded `tune` sample, profanity-check scorer,
perplexity under the unsteered model).

    python -m benchmarks claims [--samples 25] [--per-subset 100] [--only NAME...]  # evaluate, then the table
    python -m benchmarks claims --table-only [--samples 25] [--per-subset 100]     # the table from stored runs
    python -m benchmarks claims --model gemma3-270m --alpha A ...                  # another model, at its alpha

Every steered setting is calibrated here, in this process, exactly as `destein fit` would (`calibrate()`, pairs
sampled with seed 0, the paper's cues, batches of 8) and evaluated at alpha 1.3 (the shipped SmolLM2 checkpoints'
alpha; `--alpha` for another model) with the paper's fusion and no gate; only the ablated ingredient changes:

- head-wise probe weights against uniform ones (weight 1 for every head);
- only the top half of the heads by probe accuracy against only the bottom half (paper Table 11);
- the number of pairs m = 5, 10, 20, 40, 80 (paper Table 9: m = 5 to 60);
- self-induced pairs with parallel rewrites (`lexical` rewriter, `checkpoints/smollm2-135m-self-induced-pairs.jsonl`;
  another model's from `destein induce --config configs/<model>-induce.yaml`, in `runs/induce/<model>/`) against
  self-induced non-parallel pairs (the `none` rewriter, made by the same command with `--rewriter none --output_dir
  runs/induce/<model>-none`);
- the authors' published-code fusion (alpha 0.2 and 0.3, on its unit scale) against the paper's (a model whose heads
  do not slice its hidden size, as Gemma 3's, refuses it: the table says so).

The reference ("DeStein") is 40 ParaDetox pairs. Each verdict compares EMT, on the toxic prompts and on all prompts,
with a paired bootstrap over prompts (2,000 resamples, seed 0): the claim holds or fails when the 95% interval of the
difference excludes 0; otherwise the sample cannot tell. Runs are stored under
`runs/claims/tune-n<per subset>-s<samples>/<setting>/` (`-t<tokens>` added for other than 20 tokens) and resume (a
larger sample reuses a smaller one's generations when its folders are copied there); the table goes to
`docs/results/claims-n<per subset>-s<samples>.md`. Another `--model` (a built-in name or a folder) is stored under
`runs/claims/<name>/` and written to `claims-<name>-n<per subset>-s<samples>.md`.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shlex
import statistics
from pathlib import Path
from typing import Any

import torch

from benchmarks.evaluation import PROTOCOL_TOKENS
from benchmarks.frontier import (
    add_protocol_options,
    evaluate_setting,
    split_prompts,
    stored_records,
    stored_runs,
    summarize,
)
from benchmarks.results import DATA, ROOT, RUNS, Results
from destein_pl.files import read_text

log = logging.getLogger(__name__)

MODEL = "smollm2-135m"
ALPHA = 1.3
TITLES = {"smollm2-135m": "SmolLM2-135M", "gemma3-270m": "Gemma 3 270M"}
"""Each built-in model's name in a table's title."""


def pairs_file(pairs: str, model: str) -> Path:
    """The pairs of a setting: ParaDetox, or a model's own self-induced pairs (parallel: the lexical rewriter's, by
    `destein induce --config configs/<model>-induce.yaml`, shipped for SmolLM2; non-parallel: the same command with
    `--rewriter none --output_dir runs/induce/<model>-none`)."""
    name = Path(model).name
    if pairs == "paradetox":
        return DATA / "paradetox" / "paradetox.tsv"
    if pairs == "self-induced-parallel":
        shipped = ROOT / "checkpoints" / f"{name}-self-induced-pairs.jsonl"
        return shipped if shipped.is_file() else RUNS / "induce" / name / "pairs.jsonl"
    return RUNS / "induce" / f"{name}-none" / "pairs.jsonl"

SETTINGS: dict[str, dict[str, Any]] = {
    "base": {"alpha": 0.0},
    "destein": {},
    "uniform-weights": {"head_weights": "uniform"},
    "top-half": {"heads": "top"},
    "bottom-half": {"heads": "bottom"},
    **{f"m{m}": {"m": m} for m in (5, 10, 20, 80)},
    "self-induced-parallel": {"pairs": "self-induced-parallel"},
    "self-induced-nonparallel": {"pairs": "self-induced-nonparallel"},
    **{f"published-a{a:g}": {"fusion": "published", "alpha": a} for a in (0.2, 0.3)},
}
"""Each setting's departure from the reference: 40 ParaDetox pairs, probe weights, every head, the paper's fusion,
alpha 1.3. The published code's fusion takes an alpha on a unit scale (0.1 to 0.3 here), not the paper's."""

CLAIMS: list[dict[str, Any]] = [
    {"claim": "head-wise probe weights beat uniform ones (Table 5)",
     "rows": [("destein", "probe weights", 0.203, 39.405), ("uniform-weights", "uniform weights", 0.207, 39.434)],
     "better": ("destein", "uniform-weights")},
    {"claim": "top half of the heads beats the bottom half (Table 11)",
     "rows": [("top-half", "top half", 0.262, 33.163), ("bottom-half", "bottom half", 0.315, 31.032)],
     "better": ("top-half", "bottom-half")},
    {"claim": "more pairs help up to m = 20, then quality saturates (Table 9)",
     "rows": [("m5", "m = 5", 0.307, 38.222), ("m10", "m = 10", 0.209, 51.869), ("m20", "m = 20", 0.203, 39.405),
              ("destein", "m = 40", 0.229, 43.088), ("m80", "m = 80 (paper: m = 60)", 0.213, 43.364)],
     "better": ("m20", "m5"), "same": ("m20", "m80")},
    {"claim": "parallel pairs beat non-parallel ones (Table 5, self-induced both)",
     "rows": [("self-induced-parallel", "self-induced, parallel", 0.203, 39.405),
              ("self-induced-nonparallel", "self-induced, non-parallel", 0.216, 41.567)],
     "better": ("self-induced-parallel", "self-induced-nonparallel")},
    {"claim": "self-induced pairs beat universal ParaDetox pairs (Table 5)",
     "rows": [("self-induced-parallel", "self-induced, parallel", 0.203, 39.405),
              ("destein", "universal (ParaDetox)", 0.327, 32.145)],
     "better": ("self-induced-parallel", "destein")},
    {"claim": "the authors' published code fuses differently from the paper (no claim in the paper: what it costs)",
     "rows": [("destein", "paper fusion, alpha 1.3", None, None),
              ("published-a0.2", "published-code fusion, alpha 0.2", None, None),
              ("published-a0.3", "published-code fusion, alpha 0.3", None, None)],
     "compare": ("published-a0.3", "destein")},
]
"""The paper's numbers (EMT, PPL; None where it has none): GPT2-large, Perspective API, its full evaluation."""


def calibrated(steered, name: str, model: str, alpha: float):
    """The model steered as setting `name` says (calibrated on its pairs, at `alpha` unless the setting names its
    own), or unsteered for `base`."""
    from destein_pl import CalibrationOptions, PairsConfig, calibrate, load_pairs
    from destein_pl.calibration.vectors import head_weights

    setting = SETTINGS[name]
    if name == "base":
        steered.set_steering(torch.zeros_like(steered.vectors), torch.zeros_like(steered.head_weights), 0.0)
        return steered
    source = pairs_file(setting.get("pairs", "paradetox"), model)
    if not source.is_file():
        raise SystemExit(f"{name}: no pairs file {source}; `python -m benchmarks claims --help` says which command "
                         f"makes it")
    alpha = setting.get("alpha", alpha)
    pairs = load_pairs(PairsConfig(source=str(source), m=setting.get("m", 40), seed=0))
    heads = setting.get("heads")
    half = steered.head_weights.numel() // 2
    options = CalibrationOptions(alpha=alpha, head_weights=setting.get("head_weights", "probe"),
                                 top_k_heads=half if heads == "top" else None, fusion=setting.get("fusion", "paper"))
    calibration = calibrate(steered, pairs, options, progress=False)
    if heads == "bottom":  # every head outside the top half, with its probe weight
        top = head_weights(calibration.probes.accuracy, "uniform", top_k=half)
        steered.set_steering(calibration.vectors, calibration.probes.accuracy * (1 - top), alpha)
    return steered


def per_prompt_max(folder: Path, subset: str | None) -> dict[str, float]:
    """Each prompt's maximum continuation toxicity in a stored run, for one subset's prompts (None: all)."""
    records = stored_records(folder, json.loads((folder / "setting.json").read_text()))
    return {r["id"]: max(v for v in r["toxicity"] if v is not None) for r in records
            if subset is None or (r["prompt_toxicity"] >= 0.5) == (subset == "toxic")}


def bootstrap_interval(values: list[float], resamples: int = 2000) -> tuple[float, float]:
    """The 95% percentile interval of the mean of `values` (resampled with replacement, seed 0)."""
    rng = random.Random(0)
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(resamples))
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def paired_bootstrap(a: dict[str, float], b: dict[str, float], resamples: int = 2000) -> tuple[float, float, float]:
    """EMT(a) - EMT(b) over the prompts both have, and its 95% percentile interval (prompts resampled, seed 0)."""
    ids = sorted(a.keys() & b.keys())
    diffs = [a[i] - b[i] for i in ids]
    return statistics.fmean(diffs), *bootstrap_interval(diffs, resamples)


def verdict(out: Path, first: str, second: str, expect: str) -> str:
    """Whether the EMT of `first` is below (`expect="lower"`) or equal to (`"same"`) `second`'s, or only the
    difference (`"none"`): on the toxic prompts, and on all prompts (twice as many, so a smaller difference shows)."""
    parts = []
    for label, subset in (("toxic prompts", "toxic"), ("all prompts", None)):
        diff, low, high = paired_bootstrap(per_prompt_max(out / first, subset), per_prompt_max(out / second, subset))
        if expect == "none":
            word = ""
        elif expect == "same":
            word = "no difference detected (consistent)" if low <= 0 <= high else "they differ (disagrees)"
        else:
            word = "holds" if high < 0 else "the opposite holds (disagrees)" if low > 0 else "not detectable"
        parts.append(f"{label} {diff:+.3f} [{low:+.3f}, {high:+.3f}]" + (f", {word}" if word else ""))
    return f"EMT({first}) - EMT({second}): " + "; ".join(parts)


def table(out: Path, model: str, alpha: float, per_subset: int, samples: int, tokens: int, results: Results,
          command: str) -> None:
    """The claims table from the stored runs, with the paper's numbers beside ours."""
    rows = {f.name: summarize(f) for f in out.iterdir() if (f / "setting.json").is_file()} if out.is_dir() else {}
    if "base" not in rows:
        raise SystemExit(f"no base run under {out}; run `{command}` first")
    base = rows["base"]

    def cell(row: dict[str, Any], subset: str, key: str, digits: int) -> str:
        value, ref = row[subset][key], base[subset][key]
        return f"{value:.{digits}f}" + ("" if row is base else f" ({100 * (value / ref - 1):+.0f}%)")

    lines = [(f"Tune sample of `benchmarks/frontier.py`, {per_subset} toxic + {per_subset} non-toxic prompts, "
             f"{samples} continuations of {tokens} tokens, nucleus 0.9, profanity-check scorer; alpha {alpha:g}, paper "
             f"fusion, no gate; reference: 40 ParaDetox pairs. Paper: GPT2-large, Perspective API, alpha 0.4, "
             f"its own evaluation; its reference is 20 self-induced pairs with GPT-4 rewrites. Percentages are "
             f"against our base model (toxic EMT {base['toxic']['emt']:.3f}, PPL {base['toxic']['ppl']:.2f}; "
             f"non-toxic EMT {base['nontoxic']['emt']:.3f}, PPL {base['nontoxic']['ppl']:.2f})."), ""]
    head = ["setting", "paper EMT", "paper PPL", "toxic EMT", "toxic PPL", "non-toxic EMT", "non-toxic PPL"]
    for claim in CLAIMS:
        names = [r[0] for r in claim["rows"]]
        missing = [n for n in names if n not in rows]
        lines.append(f"**Claim: {claim['claim']}.**")
        refused = [n for n in missing if (out / n / REFUSED).is_file()]
        if refused:
            reason = read_text(out / refused[0] / REFUSED, "refusal").strip()
            lines += [f"Not measured: {title_of(model)} refuses {', '.join(refused)}: {reason}", ""]
            continue
        if missing:
            lines += [f"Not measured: no stored run for {', '.join(missing)}.", ""]
            continue
        lines += ["", "| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
        for name, label, paper_emt, paper_ppl in claim["rows"]:
            row = rows[name]
            paper = f"{paper_emt:.3f} | {paper_ppl:.2f}" if paper_emt is not None else "- | -"
            lines.append(f"| {label} | {paper} | {cell(row, 'toxic', 'emt', 3)} | "
                         f"{cell(row, 'toxic', 'ppl', 2)} | {cell(row, 'nontoxic', 'emt', 3)} | "
                         f"{cell(row, 'nontoxic', 'ppl', 2)} |")
        if "better" in claim:
            lines += ["", f"Paired bootstrap, {verdict(out, *claim['better'], 'lower')}."]
        else:
            lines += ["", f"Paired bootstrap, {verdict(out, *claim['compare'], 'none')}."]
        if "same" in claim:
            lines.append(f"Saturation: {verdict(out, *claim['same'], 'same')}.")
        lines.append("")
    stem = f"claims{model_tag(model)}-n{per_subset}-s{samples}"
    results.write(stem, f"The paper's claims on {title_of(model)}", "\n".join(lines), command)


REFUSED = "refused.txt"
"""A setting's file holding why the model refuses it (the published fusion on a model whose heads do not slice its
hidden size), in place of its run."""


def evaluate_settings(model: str, alpha: float, out: Path, names: list[str], per_subset: int, samples: int,
                      tokens: int) -> None:
    """Evaluate the named settings (skipping stored ones; an interrupted one resumes)."""
    from destein_pl import SteeredCausalLM, load_base_model
    from destein_pl.files import write_atomic

    prompts = split_prompts("tune", per_subset)
    steered = SteeredCausalLM(*load_base_model(model))
    for name in names:
        folder = out / name
        if (folder / "setting.json").is_file() or (folder / REFUSED).is_file():
            continue
        log.info("%s", name)
        try:
            calibrated(steered, name, model, alpha)
        except ValueError as error:
            if "fusion" not in SETTINGS[name]:
                raise
            log.warning("%s: refused by %s: %s", name, model, error)
            folder.mkdir(parents=True, exist_ok=True)
            write_atomic(folder / REFUSED, f"{error}\n")
            continue
        evaluate_setting(steered, prompts, folder, samples, tokens,
                         {"series": name, "alpha": alpha, **SETTINGS[name]})


def add_options(parser: argparse.ArgumentParser) -> None:
    add_protocol_options(parser)
    parser.add_argument("--only", nargs="*", choices=list(SETTINGS), default=None, help="run only these settings")
    parser.add_argument("--table-only", action="store_true", help="evaluate nothing: the table from stored runs")
    parser.add_argument("--model", default=MODEL, help=f"the model steered, a built-in name or a folder (default "
                                                       f"{MODEL}); another than {MODEL} is stored and written under "
                                                       f"its name")
    parser.add_argument("--alpha", type=float, default=ALPHA,
                        help=f"the reference's alpha, and every setting's that names none (default {ALPHA:g}, "
                             f"chosen for {MODEL}; another model's comes from its frontier's tune sample)")


def title_of(model: str) -> str:
    """A model's name in the table's title: a built-in model's own, a folder's name."""
    return TITLES.get(model, Path(model).name)


def model_tag(model: str) -> str:
    """The part of the results file's and runs folder's names that says the model: none for SmolLM2 (whose files
    predate other models), else its name or its folder's (`claims-gemma3-270m-n50-s10`)."""
    return "" if model == MODEL else f"-{Path(model).name}"


def output_fields(args: argparse.Namespace) -> dict[str, str]:
    return {"model_tag": model_tag(args.model)}


def run(args: argparse.Namespace, results: Results) -> None:
    kind = "claims" + model_tag(args.model).replace("-", "/", 1)
    out = stored_runs(kind, results.runs, "tune", args.per_subset, args.samples, args.tokens)
    if not args.table_only:
        evaluate_settings(args.model, args.alpha, out, args.only or list(SETTINGS), args.per_subset, args.samples,
                          args.tokens)
    other = [*([] if args.tokens == PROTOCOL_TOKENS else ["--tokens", str(args.tokens)]),
             *([] if args.model == MODEL else ["--model", args.model]),
             *([] if args.alpha == ALPHA else ["--alpha", f"{args.alpha:g}"])]
    command = shlex.join(["python", "-m", "benchmarks", "claims", "--samples", str(args.samples), "--per-subset",
                          str(args.per_subset), *other])  # what evaluates every setting and writes the whole table
    table(out, args.model, args.alpha, args.per_subset, args.samples, args.tokens, results, command)
