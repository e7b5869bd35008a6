"""The quality frontier of DeStein on SmolLM2-135M-Instruct: a fixed development protocol, and the steering variants
(fusion, probe gate, pairs) swept on it.

Development protocol: 100 toxic and 100 non-toxic RealToxicityPrompts prompts
(`../shared/data/rtp/rtp_{toxic,nontoxic}_1k.jsonl`), 25 continuations of 20 tokens, nucleus 0.9, the offline scorer
(`profanity-check`), perplexity under the unsteered model; per subset EMT, TP, mean and median perplexity,
Dist-1/2/3. Each file is shuffled once with a fixed seed: its first 100 prompts are the `tune` sample (settings are
chosen on it), the next 100 the `report` sample (the chosen settings are reported on it). The two never overlap.

    python -m benchmarks frontier [--samples 25]           # every setting of SWEEP on the tune sample, then the table
    python -m benchmarks frontier --split report --only base shipped NAME...  # the shipped checkpoint (settings
                                                           # chosen on tune) and others, on the report sample
    python -m benchmarks frontier --split tune --table-only   # table and plot from what is stored

Runs are stored under `runs/frontier/<split>-n<per subset>-s<samples>/<setting>/` (`-t<tokens>` added for
continuations of other than 20 tokens) and resume; the table goes to
`docs/results/frontier-<split>-n<per subset>-s<samples>.md` and the plot beside it (`.png`).
`python -m benchmarks gate_scores` measures the probe scores that set the gate's threshold.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks.evaluation import PROTOCOL_SAMPLES, PROTOCOL_TOKENS, evaluation_config
from benchmarks.results import DATA, ROOT, RUNS, Results

log = logging.getLogger(__name__)

RTP = DATA / "rtp"
SUBSET_SIZE = 100
SPLIT_SEED = 2024

GATE = {"mode": "smooth", "threshold": 0.28, "temperature": 0.05, "heads": 16, "window": 8}
"""Smooth gate: threshold and temperature from `gate_scores` on the tune prompts."""

GEMMA3_GATE = {**GATE, "threshold": 0.257}
"""Gemma's smooth gate: the threshold of its 40-pair gate probes (`gate_scores --model gemma3-270m`)."""

FLOOR = 0.25
"""The floor of the `-floor` series: at the gated alphas (1 to 2.5), a row the gate leaves closed is still steered
at 0.25 to 0.63, the strength of ungated settings that cost little perplexity on this sample."""
GATED_ALPHAS = (1.0, 1.3, 1.55, 1.8, 2.5)


@dataclass(frozen=True)
class Frontier:
    """One model's frontier: its steering checkpoints, the settings swept on the tune sample, and the shipped
    checkpoint (at its own defaults: what a user of it gets)."""

    model: str
    title: str
    checkpoints: dict[str, Path]
    sweep: list[dict[str, Any]]
    steering: str
    """The checkpoint of a setting that names none."""
    shipped: dict[str, Any]
    reference: str
    """The tune setting that the shipped checkpoint runs (the table's "vs shipped" column)."""


SMOLLM2 = Frontier(
    "smollm2-135m", "SmolLM2-135M",
    {"paradetox-1000": ROOT / "checkpoints" / "smollm2-135m-gated.ckpt",
     "shipped": ROOT / "checkpoints" / "smollm2-135m-forward-gated.ckpt",
     "paradetox-40": ROOT / "checkpoints" / "smollm2-135m-paradetox.ckpt",
     "self-induced-lexical": ROOT / "checkpoints" / "smollm2-135m-self-induced.ckpt",
     "self-induced-fewshot": RUNS / "checkpoints" / "smollm2-135m-self-fewshot.ckpt",
     "forward-1000": RUNS / "checkpoints" / "smollm2-135m-forward-gated.ckpt"},
    [*({"series": "paper", "alpha": a} for a in (0.5, 0.7, 0.9, 1.1, 1.3, 1.8)),
     *({"series": "smooth-paper", "alpha": a, "gate": GATE} for a in (*GATED_ALPHAS, 3.2)),
     *({"series": "smooth-floor", "alpha": a, "gate": GATE, "floor": FLOOR} for a in GATED_ALPHAS),
     *({"series": "forward", "alpha": a, "checkpoint": "forward-1000", "gate": "own"} for a in GATED_ALPHAS),
     *({"series": "forward-floor", "alpha": a, "checkpoint": "forward-1000", "gate": "own", "floor": FLOOR}
       for a in GATED_ALPHAS),
     *({"series": "hard-paper", "alpha": a, "gate": {**GATE, "mode": "hard"}} for a in (1.8,)),
     *({"series": "norm_preserving", "alpha": a, "fusion": "norm_preserving"} for a in (1.3, 2.0)),
     *({"series": "published", "alpha": a, "fusion": "published"} for a in (0.1, 0.3)),
     *({"series": f"pairs-{c}", "alpha": 1.3, "checkpoint": c}
       for c in ("paradetox-40", "self-induced-lexical", "self-induced-fewshot"))],
    "paradetox-1000", {"series": "shipped", "checkpoint": "shipped"}, "forward-floor-a1.8")
"""SmolLM2's series: the frontier's steering on 1,000 ParaDetox pairs (the gated checkpoint, whose steering
`destein fit --config configs/smollm2-135m.yaml --config configs/overlays/smollm2-135m-gated.yaml` makes again; the
shipped checkpoint is the setting the rule chose on the dense sweep, `forward-floor-a1.8`, written by `python -m
benchmarks forward_gate --alpha 1.8 --floor 0.25 --out checkpoints/smollm2-135m-forward-gated.ckpt`),
ungated (`paper`), gated by its context probes (`smooth-paper`) and by the continuation probes of `python -m
benchmarks forward_gate` (`forward`, at that checkpoint's own gate settings), the gates with and without the floor;
the pair comparisons on 40 (the paper's m). The few-shot self-induced one is made by `destein induce --config
configs/smollm2-135m-fewshot-induce.yaml`, then `destein fit --config configs/smollm2-135m.yaml --config
configs/overlays/smollm2-135m-self-fewshot.yaml`."""

GEMMA3_GATED_ALPHAS = (0.5, 0.6, 0.7, 0.8, 1.0)

GEMMA3 = Frontier(
    "gemma3-270m", "Gemma 3 270M",
    {"paradetox-40": ROOT / "checkpoints" / "gemma3-270m-paradetox.ckpt",
     "forward-40": RUNS / "checkpoints" / "gemma3-270m-forward-gated.ckpt"},
    [*({"series": "paper", "alpha": a} for a in (0.3, 0.4, 0.5, 0.6, 0.75, 1.3)),
     *({"series": "norm_preserving", "alpha": a, "fusion": "norm_preserving"} for a in (0.6,)),
     *({"series": "smooth-paper", "alpha": a, "gate": GEMMA3_GATE} for a in GEMMA3_GATED_ALPHAS),
     *({"series": "smooth-floor", "alpha": a, "gate": GEMMA3_GATE, "floor": FLOOR} for a in GEMMA3_GATED_ALPHAS),
     *({"series": "forward", "alpha": a, "checkpoint": "forward-40", "gate": "own"} for a in GEMMA3_GATED_ALPHAS),
     *({"series": "forward-floor", "alpha": a, "checkpoint": "forward-40", "gate": "own", "floor": FLOOR}
       for a in GEMMA3_GATED_ALPHAS)],
    "paradetox-40", {"series": "shipped", "checkpoint": "paradetox-40"}, "paper-a0.4")
"""Gemma's series on the 40-pair checkpoint of `destein fit --config configs/gemma3-270m.yaml`, at lower alphas than
SmolLM2's (`paper-a1.3` is SmolLM2's alpha; docs/models.md says why the scale differs), the smooth gate with that
checkpoint's gate probes (which does not help there: docs/models.md), and the forward gate of `python -m benchmarks
forward_gate --model gemma3-270m`, each gate with and without the floor. On the dense sweep the rule chooses
`smooth-floor-a0.7`, not detectably apart from the shipped alpha 0.4, which stays the reference."""

FRONTIERS = {f.model: f for f in (SMOLLM2, GEMMA3)}


def add_protocol_options(parser: argparse.ArgumentParser) -> None:
    """The development protocol's size options (`--samples`, `--per-subset`, `--tokens`), shared with `claims`."""
    parser.add_argument("--samples", type=int, default=PROTOCOL_SAMPLES,
                        help=f"continuations per prompt (protocol: {PROTOCOL_SAMPLES})")
    parser.add_argument("--per-subset", type=int, default=SUBSET_SIZE,
                        help=f"prompts of each subset (protocol: {SUBSET_SIZE}); fewer: the first of the sample")
    parser.add_argument("--tokens", type=int, default=PROTOCOL_TOKENS,
                        help=f"new tokens per continuation (protocol: {PROTOCOL_TOKENS})")


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split", choices=["tune", "report"], default="tune",
                        help="prompt sample: settings are chosen on tune, and reported on report (with --only)")
    add_protocol_options(parser)
    parser.add_argument("--only", nargs="*", default=None, help="run only these setting names (e.g. base paper-a1.3)")
    parser.add_argument("--table-only", action="store_true", help="evaluate nothing: the table from stored runs")
    parser.add_argument("--model", choices=list(FRONTIERS), default=SMOLLM2.model,
                        help=f"whose frontier: its checkpoints and sweep (default {SMOLLM2.model})")


def output_fields(args: argparse.Namespace) -> dict[str, str]:
    """`{model_tag}` of the results file's name: empty for SmolLM2 (whose files predate the option), else the
    model's name."""
    return {"model_tag": model_tag(args.model)}


def model_tag(model: str) -> str:
    return "" if model == SMOLLM2.model else f"-{model}"


def split_prompts(split: str, per_subset: int = SUBSET_SIZE):
    """The seeded `tune` or `report` sample: 100 toxic then 100 non-toxic prompts (the first `per_subset` of each)."""
    from destein_pl.evaluation.prompts import read_rtp_jsonl

    offset = {"tune": 0, "report": SUBSET_SIZE}[split]
    prompts = []
    for name in ("rtp_toxic_1k.jsonl", "rtp_nontoxic_1k.jsonl"):
        rows = read_rtp_jsonl(RTP / name)
        random.Random(SPLIT_SEED).shuffle(rows)
        prompts += rows[offset : offset + min(per_subset, SUBSET_SIZE)]
    return prompts


def setting_name(setting: dict[str, Any]) -> str:
    if setting["series"] in ("base", "shipped"):
        return setting["series"]
    return f"{setting['series']}-a{setting['alpha']:g}"


def settings_of(frontier: Frontier, split: str, only: list[str] | None) -> list[dict[str, Any]]:
    """The settings a split evaluates: the base model and the sweep (and, on report, the shipped checkpoint), or
    those of them named in `only` (which report needs: it evaluates the settings chosen on tune)."""
    settings = [{"series": "base", "alpha": 0.0, "checkpoint": "paradetox-40"}]
    settings += [frontier.shipped] * (split == "report") + frontier.sweep
    if split == "report" and not only:
        raise SystemExit("the report sample evaluates the settings chosen on the tune sample: name them with --only")
    if only:
        unknown = sorted(set(only) - {setting_name(s) for s in settings})
        if unknown:
            raise SystemExit(f"--only: no setting named {', '.join(unknown)}; the {split} sample knows "
                             f"{', '.join(setting_name(s) for s in settings)}")
        settings = [s for s in settings if setting_name(s) in only]
    return settings


class Runner:
    """Evaluates settings in one process, reusing the loaded model across settings of the same checkpoint."""

    def __init__(self, frontier: Frontier, split: str, samples: int, tokens: int, per_subset: int,
                 out: Path) -> None:
        self.frontier, self.split, self.samples, self.tokens, self.out = frontier, split, samples, tokens, out
        self.prompts = split_prompts(split, per_subset)
        self.models: dict[str, Any] = {}

    def model(self, checkpoint: str):
        """The loaded model of a checkpoint, and the gate it came with."""
        from destein_pl import SteeredCausalLM

        if checkpoint not in self.models:
            steered = SteeredCausalLM.from_checkpoint(self.frontier.checkpoints[checkpoint])
            self.models[checkpoint] = steered, steered.gate
        return self.models[checkpoint]

    def run(self, setting: dict[str, Any]) -> dict[str, Any] | None:
        """Evaluate a setting, unless it is stored whole already (its `setting.json` then keeps its own seconds)."""
        from destein_pl import GateSettings, SteeredCausalLM

        folder = self.out / setting_name(setting)
        if (folder / "setting.json").is_file():
            return None
        checkpoint = setting.get("checkpoint", self.frontier.steering)
        if setting is self.frontier.shipped:  # a model of its own, whose options nothing overrides
            steered = SteeredCausalLM.from_checkpoint(self.frontier.checkpoints[checkpoint])
            gate = asdict(steered.gate) if steered.gate is not None else None
            setting = {**setting, "alpha": steered.alpha, "fusion": steered.fusion, "gate": gate}
        else:
            steered, own = self.model(checkpoint)
            steered.fusion = setting.get("fusion", "paper")
            gate = setting.get("gate")
            gate = None if gate is None else own if gate == "own" else GateSettings(**gate)
            if "floor" in setting:
                gate = replace(gate, floor=setting["floor"])
            steered.gate = gate
            if setting.get("gate") == "own":  # what it ran with, for setting.json
                setting = {**setting, "gate": asdict(gate)}
        return evaluate_setting(steered, self.prompts, folder, self.samples, self.tokens,
                                {**setting, "split": self.split, "samples": self.samples,
                                 "per_subset": len(self.prompts) // 2})


def stored_runs(kind: str, runs: Path, split: str, per_subset: int, samples: int, tokens: int) -> Path:
    """Where the settings of a protocol are stored: `<runs>/<kind>/<split>-n<per subset>-s<samples>`, and
    `-t<tokens>` for continuations of other than the protocol's length."""
    length = "" if tokens == PROTOCOL_TOKENS else f"-t{tokens}"
    return runs / kind / f"{split}-n{per_subset}-s{samples}{length}"


BATCH_PROMPTS = 16
"""Prompts per generation batch. A continuation does not depend on its batch (the sampler's guarantee), so this sets
only the speed: 16 prompts generate about 1.45 times as fast as 4 on one core (SmolLM2, gated, 5 continuations).
Runs stored with other batches resume as they are."""


def evaluate_setting(steered, prompts, folder: Path, samples: int, tokens: int,
                     setting: dict[str, Any]) -> dict[str, Any]:
    """Evaluate `steered` at `setting["alpha"]` into `folder` (resuming what is stored there), then record the setting
    with the evaluation's seconds in `setting.json`, which `summarize` reads and which marks the setting done."""
    from destein_pl.evaluation.evaluator import evaluate
    from destein_pl.files import write_json

    config = evaluation_config(folder, [setting["alpha"]], samples, tokens)
    started = time.perf_counter()
    result = evaluate(steered, prompts, config, batch_size=BATCH_PROMPTS, verbose=False)
    write_json(folder / "setting.json", {**setting, "seconds": round(time.perf_counter() - started, 1)})
    return result


def stored_records(folder: Path, setting: dict[str, Any]) -> list[dict[str, Any]]:
    """The stored generation records of a setting's alpha, one per prompt (a rescored record replaces its first)."""
    from destein_pl.evaluation.runs import read_generations

    return list(read_generations(folder / f"alpha_{setting['alpha']:g}").values())


def summarize(folder: Path) -> dict[str, Any]:
    """A stored setting's metrics per subset, with the median perplexity from its generations."""
    setting = json.loads((folder / "setting.json").read_text())
    run = json.loads((folder / "results.json").read_text())["runs"][0]
    records = stored_records(folder, setting)
    row = {"name": folder.name, **setting}
    for subset in ("toxic", "nontoxic"):
        ppl = [p for r in records if (r["prompt_toxicity"] >= 0.5) == (subset == "toxic")
               for p in r["perplexity"] if p is not None]  # None: an empty continuation
        row[subset] = {**run["metrics"][subset], "median_ppl": statistics.median(ppl)}
    return row


def stored_settings(out: Path) -> dict[str, dict[str, Any]]:
    """Every setting stored under `out` (marked done by its `setting.json`), summarized, by folder name."""
    if not out.is_dir():
        return {}
    return {f.name: summarize(f) for f in sorted(out.iterdir()) if (f / "setting.json").is_file()}


def table(frontier: Frontier, split: str, samples: int, tokens: int, per_subset: int, out: Path,
          results: Results) -> None:
    """Markdown table and plot of every stored setting of a split, relative to its base run."""
    from destein_pl.plots import frontier_plot

    rows = list(stored_settings(out).values())
    base = next((r for r in rows if r["name"] == "base"), None)
    if base is None:
        raise SystemExit(f"no base run under {out}; run the sweep first")
    rows.sort(key=lambda r: (r["name"] != "base", r["series"], r["alpha"]))

    def cells(row: dict[str, Any], subset: str) -> list[str]:
        m, b = row[subset], base[subset]
        change = lambda k: "" if row is base else f" ({100 * (m[k] / b[k] - 1):+.1f}%)"  # noqa: E731
        dist = "/".join("n/a" if m[k] is None else f"{m[k]:.3f}" for k in ("dist1", "dist2", "dist3"))
        return [f"{m['emt']:.3f}{change('emt')}", f"{m['tp']:.3f}", f"{m['ppl']:.2f}{change('ppl')}",
                f"{m['median_ppl']:.2f}", dist]

    reference = "shipped" if split == "report" else frontier.reference
    reference = reference if any(r["name"] == reference for r in rows) else None
    versus = paired_differences(out, rows, reference)
    head = ["setting", "toxic EMT", "vs base [95%]", f"vs {reference or 'shipped'} [95%]", "TP", "PPL", "median PPL",
            "Dist-1/2/3", "non-toxic EMT", "TP", "PPL", "median PPL", "Dist-1/2/3"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for row in rows:
        toxic = cells(row, "toxic")
        lines.append("| " + " | ".join([row["name"], toxic[0], *versus[row["name"]], *toxic[1:],
                                        *cells(row, "nontoxic")]) + " |")
    given = {"split": split, "samples": samples, "per-subset": per_subset, "tokens": tokens}
    protocol = {"split": "tune", "samples": PROTOCOL_SAMPLES, "per-subset": SUBSET_SIZE, "tokens": PROTOCOL_TOKENS}
    options = "".join(f" --{k} {v}" for k, v in given.items() if v != protocol[k])
    options += f" --model {frontier.model}" if frontier is not SMOLLM2 else ""
    command = f"python -m benchmarks frontier{options} --only {' '.join(r['name'] for r in rows)}"
    text = (f"Development protocol, `{split}` sample ({per_subset} toxic + {per_subset} non-toxic prompts, "
            f"{samples} continuations of {tokens} tokens, nucleus 0.9, profanity-check scorer, perplexity under the "
            f"unsteered model). Percentages are against the base model on the same prompts. \"vs\": the toxic-prompt "
            f"EMT minus the base model's and minus {f'`{reference}`' if reference else 'the shipped setting'}'s, "
            f"paired over prompts, with its 95% bootstrap interval (2,000 resamples).\n\n" + "\n".join(lines))
    stem = f"frontier{model_tag(frontier.model)}-{split}-n{per_subset}-s{samples}"
    results.write(stem, f"Quality frontier of {frontier.title}, {split} sample: {per_subset} + {per_subset} prompts, {samples} "
                  f"continuations", text, command)
    for row in rows:
        row["intervals"] = {subset: emt_interval(out / row["name"], subset) for subset in ("toxic", "nontoxic")}
    frontier_plot(rows, results.path(stem, ".png"),
                  title=f"{frontier.title}, {split} sample, {samples} continuations per prompt (bars: 95% bootstrap)")


def emt_interval(folder: Path, subset: str) -> tuple[float, float]:
    """The 95% bootstrap interval of a stored run's EMT on a subset (prompts resampled, seed 0)."""
    from benchmarks.claims import bootstrap_interval, per_prompt_max

    return bootstrap_interval(list(per_prompt_max(folder, subset).values()))


def paired_differences(out: Path, rows: list[dict[str, Any]], reference: str | None) -> dict[str, list[str]]:
    """Per setting, its toxic-prompt EMT minus the base run's and minus `reference`'s, paired over prompts, with their
    95% bootstrap intervals, as table cells ("-" against itself or a missing reference)."""
    from benchmarks.claims import paired_bootstrap, per_prompt_max

    maxima = {r["name"]: per_prompt_max(out / r["name"], "toxic") for r in rows}

    def cell(name: str, other: str | None) -> str:
        if other is None or other == name:
            return "-"
        diff, low, high = paired_bootstrap(maxima[name], maxima[other])
        return f"{diff:+.3f} [{low:+.3f}, {high:+.3f}]"

    return {r["name"]: [cell(r["name"], "base"), cell(r["name"], reference)] for r in rows}


def run(args: argparse.Namespace, results: Results) -> None:
    frontier = FRONTIERS[args.model]
    kind = "frontier" + model_tag(frontier.model).replace("-", "/", 1)
    out = stored_runs(kind, results.runs, args.split, args.per_subset, args.samples, args.tokens)
    if not args.table_only:
        runner = Runner(frontier, args.split, args.samples, args.tokens, args.per_subset, out)
        for setting in settings_of(frontier, args.split, args.only):
            log.info("%s", setting_name(setting))
            runner.run(setting)
    table(frontier, args.split, args.samples, args.tokens, args.per_subset, out, results)
