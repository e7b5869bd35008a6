"""DeStein against the methods a user would pick instead, on the development protocol of `benchmarks/frontier.py`,
at equal fluency cost.

    python -m benchmarks comparison --samples 5 --per-subset 25        # every sweep on the tune sample: table, plot
    python -m benchmarks comparison --split report --samples 10        # the matched points, on the report sample
    python -m benchmarks comparison --table-only [--split ...]           # tables and plot from what is stored
    python -m benchmarks comparison --model gemma3-270m ...             # the same on Gemma 3 270M

Every method runs through `destein_pl.baselines` (`SteeredCausalLM.set_method`) and the same `Evaluator` as DeStein:
same sampler, scorer (profanity-check), perplexity model (the unsteered model), seeds and prompts. The pair-calibrated
methods read the same 40 ParaDetox pairs as the shipped 40-pair checkpoint (seed 0). Each series sweeps its
strength on the tune sample:

- `destein`: the 40-pair checkpoint at several alphas; `destein-gated`: the shipped gated checkpoint (1,000 pairs,
  smooth probe gate) at several alphas; the two shipped checkpoints' own alpha is among them.
- `prompting`: the prefix on (one point: it has no strength).
- `word_filter`: the list built from the pairs file, swept over its `min_count` (a lower count bans more words).
- `actadd`: first its layer at alpha 1.5 (`actadd-layer`), then alphas at the layer chosen by the rule below.
- `iti-k<K>`: K heads (SmolLM2: 16 and 48; Gemma: 4 and 12, the same shares of its heads), several alphas each.
- `dexperts`: the experts of `python -m benchmarks dexperts_train` (run it first), several betas (the evaluated
  alpha).
- `self_detoxify`: several multiples of the authors' step (alpha 1 is their method).

The matched points: for each series and budget (+10% and +20% toxic-prompt perplexity over base, on tune), its point
with the highest toxic perplexity within the budget; the ActAdd layer is the one whose point at alpha 1.5 has the
lowest toxic EMT within +20%. `--split report` evaluates those points, the shipped checkpoints and the base model on
the report sample and writes the comparison table: each matched point against DeStein's at the same budget (paired
bootstrap over prompts, 2,000 resamples, 95% interval), generation tokens per second relative to the base model's in
the same run (continuation tokens counted with the model's tokenizer), and the method's extra weights. Runs are stored
under `runs/comparison/<model>/<split>-n<per subset>-s<samples>/<setting>/` and resume.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.claims import bootstrap_interval, paired_bootstrap, per_prompt_max
from benchmarks.frontier import (
    add_protocol_options,
    evaluate_setting,
    split_prompts,
    stored_records,
    stored_runs,
    stored_settings,
)
from benchmarks.results import DATA, ROOT, Results

log = logging.getLogger(__name__)

PAIRS = DATA / "paradetox" / "paradetox.tsv"
BUDGETS = (0.10, 0.20)
"""Toxic-prompt perplexity over base that a matched point may cost."""
ACTADD_LAYER_ALPHA = 1.5


@dataclass(frozen=True)
class Comparison:
    """One model's comparison: its DeStein checkpoints and every series' sweep."""

    model: str
    title: str
    destein: Path
    """The 40-pair checkpoint (the pairs every pair-calibrated method reads)."""
    gated: Path | None
    """The shipped gated checkpoint, if the model has one."""
    sweeps: dict[str, tuple[float, ...]]
    """Per series, the values swept: alphas, or `min_count` for the word filter, or layers for `actadd-layer`."""


SMOLLM2 = Comparison(
    "smollm2-135m", "SmolLM2-135M",
    ROOT / "checkpoints" / "smollm2-135m-paradetox.ckpt", ROOT / "checkpoints" / "smollm2-135m-gated.ckpt",
    {"destein": (0.3, 0.5, 0.7, 0.9, 1.1, 1.3), "destein-gated": (1.3, 1.55, 1.8, 2.5, 3.2, 4.0), "prompting": (1.0,),
     "word_filter": (1, 2, 3, 5, 10), "actadd-layer": (6, 10, 14, 18), "actadd": (0.5, 1.0, 1.5, 2.0, 3.0),
     "iti-k16": (1.0, 2.0, 3.0, 4.0, 6.0), "iti-k48": (1.0, 2.0, 3.0, 4.0, 6.0),
     "dexperts": (0.5, 1.0, 2.0, 3.0, 4.0), "self_detoxify": (0.25, 0.5, 0.75, 1.0, 1.5)})
GEMMA3 = Comparison(
    "gemma3-270m", "Gemma 3 270M", ROOT / "checkpoints" / "gemma3-270m-paradetox.ckpt", None,
    {"destein": (0.2, 0.3, 0.4, 0.5, 0.6), "prompting": (1.0,), "word_filter": (1, 2, 3, 5, 10),
     "actadd-layer": (3, 6, 9, 12), "actadd": (0.5, 1.0, 1.5, 2.0, 3.0),
     "iti-k4": (1.0, 2.0, 3.0, 4.0, 6.0), "iti-k12": (1.0, 2.0, 3.0, 4.0, 6.0),
     "dexperts": (0.5, 1.0, 2.0, 3.0, 4.0), "self_detoxify": (0.25, 0.5, 0.75, 1.0, 1.5)})
"""Gemma's: DeStein at its own alpha scale (docs/models.md), no gated checkpoint (the gate does not help there); ITI's
K at the same shares of its 72 heads as SmolLM2's 16 and 48 of 270, ActAdd's layers over its 18."""
COMPARISONS = {c.model: c for c in (SMOLLM2, GEMMA3)}
SHIPPED = {"smollm2-135m": (("destein", 1.3), ("destein-gated", 1.3)), "gemma3-270m": (("destein", 0.4),)}
"""The shipped checkpoints (series, their own alpha), evaluated on report beside the matched points."""


def setting_name(series: str, value: float, layer: int | None = None) -> str:
    if series == "base":
        return "base"
    if series == "prompting":
        return "prompting"
    if series == "word_filter":
        return f"word_filter-min{value:g}"
    if series == "actadd-layer":
        return f"actadd-l{value:g}-a{ACTADD_LAYER_ALPHA:g}"
    if series == "actadd":
        return f"actadd-l{layer}-a{value:g}"
    return f"{series}-a{value:g}"


def settings_of(comparison: Comparison, out_tune: Path) -> list[dict[str, Any]]:
    """Every setting of the tune sweep, in order; the ActAdd alphas only once its layer stage is stored."""
    settings = [{"series": "base", "value": 0.0, "alpha": 0.0}]
    for series, values in comparison.sweeps.items():
        if series == "actadd":
            continue
        for value in values:
            alpha = ACTADD_LAYER_ALPHA if series == "actadd-layer" else 1.0 if series in ("prompting",
                                                                                          "word_filter") else value
            settings.append({"series": series, "value": value, "alpha": alpha})
    return settings


def actadd_settings(comparison: Comparison, out_tune: Path) -> list[dict[str, Any]]:
    layer = chosen_layer(comparison, stored_settings(out_tune))
    if layer is None:
        raise SystemExit(f"the ActAdd alphas need every layer's point under {out_tune}: run the actadd series")
    return [{"series": "actadd", "value": a, "alpha": a, "layer": layer} for a in comparison.sweeps["actadd"]]


def chosen_layer(comparison: Comparison, rows: dict[str, dict[str, Any]]) -> int | None:
    """The ActAdd layer on the tune runs `rows` (`stored_settings`): lowest toxic EMT at alpha 1.5 within +20% toxic
    perplexity (else the lowest perplexity); None until the base run and every layer's point are stored."""
    names = [(layer, setting_name("actadd-layer", layer)) for layer in comparison.sweeps["actadd-layer"]]
    if "base" not in rows or not all(name in rows for _, name in names):
        return None
    budget = rows["base"]["toxic"]["ppl"] * 1.2
    within = [(rows[name]["toxic"]["emt"], layer) for layer, name in names if rows[name]["toxic"]["ppl"] <= budget]
    if within:
        return int(min(within)[1])
    return int(min((rows[name]["toxic"]["ppl"], layer) for layer, name in names)[1])


def name_of(setting: dict[str, Any]) -> str:
    return setting_name(setting["series"], setting["value"], setting.get("layer"))


def steered_for(comparison: Comparison, setting: dict[str, Any], runs: Path):
    """A fresh model for a setting: a DeStein checkpoint at its alpha, or the base model with a baseline."""
    from destein_pl import SteeredCausalLM, load_base_model
    from destein_pl.baselines import ITI, ActAdd, DExperts, Prompting, SelfDetoxify, WordFilter

    series = setting["series"]
    if series in ("destein", "destein-gated"):
        return SteeredCausalLM.from_checkpoint(comparison.destein if series == "destein" else comparison.gated)
    steered = SteeredCausalLM(*load_base_model(comparison.model))
    method = {
        "base": lambda: None,
        "prompting": lambda: Prompting(),
        "word_filter": lambda: WordFilter(pairs=str(PAIRS), min_count=int(setting["value"])),
        "actadd-layer": lambda: ActAdd(pairs=str(PAIRS), layer=int(setting["value"])),
        "actadd": lambda: ActAdd(pairs=str(PAIRS), layer=int(setting["layer"])),
        "iti": lambda: ITI(pairs=str(PAIRS), heads=int(series.removeprefix("iti-k"))),
        "dexperts": lambda: DExperts(*expert_paths(comparison, runs)),
        "self_detoxify": lambda: SelfDetoxify(),
    }["iti" if series.startswith("iti-k") else series]()
    steered.set_method(method)
    return steered


def expert_paths(comparison: Comparison, runs: Path) -> tuple[str, str]:
    from benchmarks.dexperts_train import experts_folder

    folder = experts_folder(runs, comparison.model)
    if not (folder / "antiexpert" / "config.json").is_file():
        raise SystemExit(f"no DExperts experts under {folder}; make them with `python -m benchmarks dexperts_train "
                         f"--model {comparison.model}`")
    return str(folder / "expert"), str(folder / "antiexpert")


def evaluate(comparison: Comparison, setting: dict[str, Any], prompts, out: Path, samples: int, tokens: int,
             runs: Path) -> None:
    folder = out / name_of(setting)
    if (folder / "setting.json").is_file():
        return
    log.info("%s", name_of(setting))
    steered = steered_for(comparison, setting, runs)
    evaluate_setting(steered, prompts, folder, samples, tokens, {**setting, "name": name_of(setting)})


def extra_weights_mb(comparison: Comparison, setting: dict[str, Any], runs: Path) -> float:
    """Bytes a method adds to the base model's weights, in MB: steering tensors, a residual vector, or experts."""
    from destein_pl.steering.checkpoint import read_checkpoint

    series = setting["series"]
    if series in ("destein", "destein-gated"):
        path = comparison.destein if series == "destein" else comparison.gated
        tensors, _ = read_checkpoint(path.with_suffix(".safetensors"))
        return sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6
    if series == "dexperts":
        from safetensors import safe_open

        total = 0
        for path in expert_paths(comparison, runs):
            for file in Path(path).glob("*.safetensors"):
                with safe_open(file, "pt") as f:
                    total += sum(math.prod(f.get_slice(k).get_shape()) * 4 for k in f.keys())  # noqa: SIM118
        return total / 1e6
    if series.startswith("iti-k"):  # vectors and head weights of DeStein's shapes
        tensors, _ = read_checkpoint(comparison.destein.with_suffix(".safetensors"))
        return sum(tensors[k].numel() * 4 for k in ("vectors", "head_weights")) / 1e6
    if series in ("actadd", "actadd-layer"):  # one residual-stream vector
        _, metadata = read_checkpoint(comparison.destein.with_suffix(".safetensors"))
        return metadata["architecture"]["hidden_size"] * 4 / 1e6
    return 0.0  # prompting, the word filter and Self-Detoxify add no weights


def tokens_per_second(folder: Path, tokenizer) -> float:
    """Continuation tokens generated per second of generation in a stored run."""
    setting = json.loads((folder / "setting.json").read_text())
    timing = json.loads((folder / "results.json").read_text())["timing"]
    count = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"])
                for r in stored_records(folder, setting) for t in r["continuations"])
    return count / timing["generate_s"]


def point_interval(folder: Path, subset: str) -> tuple[float, float]:
    """The 95% bootstrap interval of a run's EMT on a subset (prompts resampled, seed 0)."""
    return bootstrap_interval(list(per_prompt_max(folder, subset).values()))


def matched(rows: dict[str, dict[str, Any]], actadd_layer: int | None) -> dict[tuple[str, float], str]:
    """{(series, budget): the setting with the highest toxic perplexity within the budget} on a tune table; of the
    ActAdd layer stage only the chosen layer's point, which is on that layer's alpha line."""
    base = rows["base"]["toxic"]["ppl"]
    found = {}
    for name, row in rows.items():
        series = row["series"]
        if series == "actadd-layer":
            if row["value"] != actadd_layer:
                continue
            series = "actadd"
        if series == "base":
            continue
        for budget in BUDGETS:
            if row["toxic"]["ppl"] <= base * (1 + budget):
                best = found.get((series, budget))
                if best is None or row["toxic"]["ppl"] > rows[best]["toxic"]["ppl"]:
                    found[(series, budget)] = name
    return found


def pct(value: float, base: float) -> str:
    return f"{100 * (value / base - 1):+.1f}%"


def tune_table(comparison: Comparison, out: Path, results: Results, per_subset: int, samples: int) -> None:
    from destein_pl.plots import comparison_plot

    rows = stored_settings(out)
    if "base" not in rows:
        raise SystemExit(f"no base run under {out}; run the sweep first")
    base = rows["base"]
    layer = chosen_layer(comparison, rows)
    lines = ["| series | setting | toxic EMT [95%] | toxic PPL | non-toxic EMT | non-toxic PPL |",
             "|---|---|---:|---:|---:|---:|"]
    points = []
    for name, row in sorted(rows.items(), key=lambda kv: (kv[1]["series"] != "base", kv[1]["series"],
                                                          kv[1]["value"])):
        low, high = point_interval(out / name, "toxic")
        t, n = row["toxic"], row["nontoxic"]
        lines.append(f"| {row['series']} | {name} | {t['emt']:.3f} [{low:.3f}, {high:.3f}] | {t['ppl']:.2f} "
                     f"({pct(t['ppl'], base['toxic']['ppl'])}) | {n['emt']:.3f} | {n['ppl']:.2f} "
                     f"({pct(n['ppl'], base['nontoxic']['ppl'])}) |")
        series, order = row["series"], row["value"]
        if series == "actadd-layer" and row["value"] == layer:  # the chosen layer's point is on its alpha line
            series, order = "actadd", row["alpha"]
        points.append({"series": series, "label": name, "ppl": t["ppl"], "emt": t["emt"], "low": low, "high": high,
                       "order": order})
    picks = matched(rows, layer)
    chosen = "\n".join(f"- {series}, +{budget:.0%}: {name}" for (series, budget), name in sorted(picks.items()))
    text = (f"Development protocol, tune sample ({per_subset} toxic + {per_subset} non-toxic prompts, {samples} "
            f"continuations of 20 tokens). Bracketed: the 95% bootstrap interval of the toxic EMT over prompts. "
            f"Percentages against the base model.\n\n" + "\n".join(lines) +
            f"\n\nMatched points (highest toxic perplexity within the budget; ActAdd's layer: "
            f"{'not chosen yet' if layer is None else layer}):\n\n{chosen}")
    stem = f"comparison-{comparison.model}-tune-n{per_subset}-s{samples}"
    results.write(stem, f"Methods compared on {comparison.title}, tune sample: {per_subset} + {per_subset} prompts, "
                  f"{samples} continuations", text)
    comparison_plot(points, results.path(stem, ".png"), base=(base["toxic"]["ppl"], base["toxic"]["emt"]),
                    title=f"{comparison.title}, tune sample: toxic EMT against toxic perplexity")


def report_settings(comparison: Comparison, tune_out: Path) -> list[dict[str, Any]]:
    """The base model, the shipped checkpoints and every matched point of the tune table."""
    rows = stored_settings(tune_out)
    if "base" not in rows:
        raise SystemExit(f"the report sample evaluates the points matched on tune: no tune runs under {tune_out}")
    shipped = [{"series": s, "value": a, "alpha": a} for s, a in SHIPPED[comparison.model]]
    picked = [{k: v for k, v in rows[n].items() if k in ("series", "value", "alpha", "layer")}
              for n in sorted(set(matched(rows, chosen_layer(comparison, rows)).values()))]
    return [{"series": "base", "value": 0.0, "alpha": 0.0}, *shipped, *picked]


def report_table(comparison: Comparison, tune_out: Path, out: Path, results: Results, per_subset: int,
                 samples: int, runs: Path) -> None:
    from destein_pl import load_base_model

    rows, tune_rows = stored_settings(out), stored_settings(tune_out)
    picks = matched(tune_rows, chosen_layer(comparison, tune_rows))
    tokenizer = load_base_model(comparison.model)[1]
    base = rows["base"]
    speed = {name: tokens_per_second(out / name, tokenizer) for name in rows}
    head = ("| budget | method | setting | toxic EMT | vs DeStein [95%] | toxic PPL | non-toxic EMT | non-toxic PPL "
            "| tokens/s vs base | extra weights (MB) |")
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]

    def line(budget: str, series: str, name: str, reference: str | None) -> str:
        row = rows[name]
        t, n = row["toxic"], row["nontoxic"]
        if reference is None or reference == name:
            versus = "-"
        else:
            diff, low, high = paired_bootstrap(per_prompt_max(out / name, "toxic"),
                                               per_prompt_max(out / reference, "toxic"))
            versus = f"{diff:+.3f} [{low:+.3f}, {high:+.3f}]"
        return (f"| {budget} | {series} | {name} | {t['emt']:.3f} | {versus} | {t['ppl']:.2f} "
                f"({pct(t['ppl'], base['toxic']['ppl'])}) | {n['emt']:.3f} | {n['ppl']:.2f} "
                f"({pct(n['ppl'], base['nontoxic']['ppl'])}) | {speed[name] / speed['base']:.2f} | "
                f"{extra_weights_mb(comparison, row, runs):.1f} |")

    lines.append(line("-", "base", "base", None))
    for series, alpha in SHIPPED[comparison.model]:
        shipped = setting_name(series, alpha)
        if shipped in rows:
            lines.append(line("shipped", series, shipped, None))
    for budget in BUDGETS:
        reference = picks.get(("destein", budget))
        for (series, b), name in sorted(picks.items()):
            if b == budget and name in rows:
                lines.append(line(f"+{budget:.0%}", series, name, reference))
    text = (f"Development protocol, report sample ({per_subset} toxic + {per_subset} non-toxic prompts, {samples} "
            f"continuations of 20 tokens); each method at the point matched on the tune sample for the budget. "
            f"\"vs DeStein\": the toxic-prompt EMT minus that of DeStein's matched point at the same budget, paired "
            f"over prompts. Tokens/s: continuation tokens per second of generation, relative to the base model in "
            f"this run.\n\n" + "\n".join(lines))
    results.write(f"comparison-{comparison.model}-report-n{per_subset}-s{samples}",
                  f"Methods compared on {comparison.title}, report sample: matched points", text)


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split", choices=["tune", "report"], default="tune",
                        help="tune: every sweep; report: the points matched on tune (read from its stored runs)")
    add_protocol_options(parser)
    parser.add_argument("--tune-per-subset", type=int, default=25,
                        help="with --split report: the prompts per subset of the tune runs the points are read from "
                             "(default 25)")
    parser.add_argument("--tune-samples", type=int, default=5,
                        help="with --split report: the continuations per prompt of those tune runs (default 5)")
    parser.add_argument("--only", nargs="*", default=None, help="evaluate only these series (e.g. iti-k16 dexperts), and the base model")
    parser.add_argument("--table-only", action="store_true", help="evaluate nothing: the tables from stored runs")
    parser.add_argument("--model", choices=list(COMPARISONS), default=SMOLLM2.model, help="whose comparison")


def run(args: argparse.Namespace, results: Results) -> None:
    comparison = COMPARISONS[args.model]
    kind = f"comparison/{comparison.model}"
    tune_n, tune_samples = ((args.per_subset, args.samples) if args.split == "tune" else
                            (args.tune_per_subset, args.tune_samples))
    tune_out = stored_runs(kind, results.runs, "tune", tune_n, tune_samples, args.tokens)
    if args.split == "tune":
        if not args.table_only:
            prompts = split_prompts("tune", args.per_subset)
            todo = [s for s in settings_of(comparison, tune_out) if not args.only or s["series"] in args.only
                    or s["series"] == "base" or (s["series"] == "actadd-layer" and "actadd" in args.only)]
            for setting in todo:
                evaluate(comparison, setting, prompts, tune_out, args.samples, args.tokens, results.runs)
            if not args.only or "actadd" in args.only:
                for setting in actadd_settings(comparison, tune_out):
                    evaluate(comparison, setting, prompts, tune_out, args.samples, args.tokens, results.runs)
        tune_table(comparison, tune_out, results, args.per_subset, args.samples)
        return
    out = stored_runs(kind, results.runs, "report", args.per_subset, args.samples, args.tokens)
    if not args.table_only:
        prompts = split_prompts("report", args.per_subset)
        for setting in report_settings(comparison, tune_out):
            evaluate(comparison, setting, prompts, out, args.samples, args.tokens, results.runs)
    report_table(comparison, tune_out, out, results, args.per_subset, args.samples, results.runs)
