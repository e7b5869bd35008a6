"""What an export produced (`ExportReport`), how it fails (`ExportError`), and the model card and `destein.json`
that describe it to whoever serves the folder."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from destein_pl.steering.loading import BUILTIN_MODELS

if TYPE_CHECKING:
    from destein_pl.steering.model import SteeredCausalLM

METHOD = "DeStein (arXiv 2404.10464), head-wise activation steering folded into the attention output bias"
PAPER_URL = "https://arxiv.org/abs/2404.10464"


class ExportError(ValueError):
    """A model that cannot be exported in the requested format; the message names the family and why."""


@dataclass
class ExportReport:
    """What was exported, for the model card and `destein.json`."""

    ckpt: str
    metadata: dict[str, Any]
    alpha: float
    format: str
    family: str
    model_type: str
    files: list[str] = field(default_factory=list)
    exported_as: str | None = None
    """Model type of the exported config when it differs from the base model's."""
    dropped_config_keys: list[str] = field(default_factory=list)
    dtype: str | None = None
    folded: bool = True
    """False when the steering is all zero: the export is the base model itself."""
    max_abs_diff: float | None = None
    """Reloaded folder against the folded model, on a probe input."""
    gguf_added: list[str] = field(default_factory=list)
    results: dict[str, Any] | None = None



def results_of(steered: SteeredCausalLM, results: dict[str, Any] | None) -> dict[str, Any] | None:
    """`results` if their steering digest is the loaded checkpoint's (`SteeredCausalLM.steering_digest`), else an
    `ExportError`: a model card must not show another checkpoint's numbers."""
    if results is None:
        return None
    digest, recorded = steered.steering_digest(), results["steering"]["digest"]
    if recorded != digest:
        raise ExportError(f"results: {results['path']} was made with other steering (digest {recorded[:12]}...) than "
                          f"this checkpoint's ({digest[:12]}...); pass the results.json of `destein test` on this "
                          f"checkpoint")
    return results


def steering_record(report: ExportReport) -> dict[str, Any]:
    """The machine-readable twin of the card."""
    return {
        "method": METHOD,
        "checkpoint": Path(report.ckpt).name,
        "alpha": report.alpha,
        "format": report.format,
        "family": report.family,
        "model_type": report.model_type,
        "exported_as": report.exported_as,
        "folded": report.folded,
        "verify_max_abs_diff": report.max_abs_diff,
        "gguf_added_tensors": len(report.gguf_added),
        "steering": report.metadata,
        "files": report.files,
    }


def describe_base(name: str) -> str:
    """The base model for the card; a built-in one with the file and package it comes from."""
    if name in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[name]
        return (f"`{name}`: {builtin.gguf_file} from the `{builtin.distribution}` package "
                f"(version {builtin.version()}), dequantized to float32 for folding; its weights come under "
                f"{builtin.terms}")
    return f"`{name}`"


def describe_pairs(metadata: dict[str, Any]) -> str:
    """The pairs' provenance for the card: file or hub id, hash, number and seed."""
    pairs = metadata.get("pairs") or {}
    if not pairs:
        return "not recorded in the checkpoint"
    parts = [f"`{pairs.get('source')}`"]
    if pairs.get("sha256"):
        parts.append(f"sha256 `{pairs['sha256']}`")
    parts.append(f"m = {pairs.get('m')} pairs, sampled with seed {pairs.get('seed')}")
    if pairs.get("cues"):
        parts.append("with the paper's toxic / non-toxic cues")
    return ", ".join(parts)


def results_table(results: dict[str, Any], alpha: float) -> list[str]:
    """The evaluation as markdown lines: one row per (alpha, subset), the exported alpha in bold."""
    names = [("emt", "EMT"), ("tp", "TP"), ("ppl", "PPL"), ("dist1", "Dist-1"), ("dist2", "Dist-2"),
             ("dist3", "Dist-3")]
    lines = ["| alpha | subset | prompts | " + " | ".join(t for _, t in names) + " |",
             "| ---: | --- | ---: |" + " ---: |" * len(names)]
    for run in results["runs"]:
        for subset, values in run["metrics"].items():
            count = (run.get("counts") or {}).get("prompts", {}).get(subset)
            if count == 0:
                continue
            cells = ["n/a" if values.get(k) is None else f"{values[k]:.3f}" for k, _ in names]
            exported = math.isclose(run["alpha"], alpha, rel_tol=1e-6, abs_tol=1e-9)
            label = f"**{run['alpha']:g}**" if exported else f"{run['alpha']:g}"
            lines.append(f"| {label} | {subset} | {count if count is not None else ''} | " + " | ".join(cells) + " |")
    return lines


def model_card(report: ExportReport) -> str:
    """The `README.md` of an exported folder: what the model is, how it was made, how to run it."""
    metadata = report.metadata
    options = metadata.get("options") or {}
    tags = "\n".join(f"  - {t}" for t in ("destein", "detoxification", "activation-steering", report.format))
    front = f"---\nlibrary_name: {'transformers' if report.format == 'hf' else 'gguf'}\ntags:\n{tags}\n---\n"
    kind = "Hugging Face" if report.format == "hf" else "GGUF"
    top_k = options.get("top_k_heads")
    heads = "every head" if top_k is None else f"the {top_k} heads with the best probes"
    intro = (f"A detoxified {report.model_type} model: the steering of [DeStein]({PAPER_URL}) (arXiv 2404.10464), "
             "head-wise activation steering, folded into the bias of every attention output projection. It needs "
             "no destein-pl code to run and costs what the base model costs per token.")
    lines = [
        front, f"# {Path(report.ckpt).stem} ({kind} export)", "", intro, "",
        "| | |", "| --- | --- |",
        f"| base model | {describe_base(str(metadata['base_model']['name_or_path']))} |",
        f"| steering pairs | {describe_pairs(metadata)} |",
        f"| alpha | {report.alpha:g} |",
        f"| head weights | {options.get('head_weights', 'probe')}, {heads} |",
        f"| checkpoint | `{Path(report.ckpt).name}` |",
        f"| method | {METHOD} |",
        f"| weights | {report.dtype} |",
        "", "## How it was folded", "", *fold_description(report),
        "", "## Use", "", *usage(report),
    ]
    if report.results is not None:
        scorer = json.dumps(report.results.get("scorer"))
        lines += ["", "## Evaluation", "",
                  f"`destein test` ({report.results['path']}; scorer `{scorer}`), the exported alpha in bold:", "",
                  *results_table(report.results, report.alpha)]
    return "\n".join(lines) + "\n"


FOLD_TEXT = (
    "At every layer the steering adds a constant `d = alpha * w * v` (per head: the head's weight times its "
    "detoxification vector) to the input of the output projection, so `W (h + d) + b = W h + (b + W d)`: the "
    "folded bias is `b + W d`, computed in float64 and rounded once."
)
EXACTNESS = {
    "hf": "With the same weights (this folder's dtype), logits equal the live steered model's up to float rounding.",
    "gguf": ("The biases are exact (float32), but the other tensors keep the base file's quantization: llama.cpp's "
             "logits differ from the live steered model's (which runs on dequantized float32 weights) by the "
             "quantization error, as the base model's do, so greedy text can differ from live steering's; with "
             "float32 base tensors they agree up to float rounding."),
}
"""What the folded file reproduces exactly, per export format."""
GGUF_TEXT = (
    "llama.cpp reads the optional `blk.N.attn_output.bias` of its `llama` architecture, so it runs this file as it "
    "is: `llama-cli -m {name} -p \"...\"`.\n\n"
    "Stock transformers (`from_pretrained(folder, gguf_file=...)`) ignores the bias silently: it builds the model "
    "from the GGUF metadata without `attention_bias` and skips tensors the model has no slot for, which gives the "
    "base model. Pass `attention_bias=True` to make it read the bias (the q/k/v biases, absent from the file, are "
    "then initialized to zero)."
)
HF_TEXT = (
    "```python\n"
    "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
    "model = AutoModelForCausalLM.from_pretrained(FOLDER)\n"
    "tokenizer = AutoTokenizer.from_pretrained(FOLDER)\n"
    "```\n\n"
    "vLLM: `vllm serve FOLDER` (the config's bias flag makes it create and load the output bias; the other biases "
    "that flag creates are stored as explicit zeros)."
)


def fold_description(report: ExportReport) -> list[str]:
    """The card's account of what folding did to this model."""
    if not report.folded:
        return ["The steering is all zero (alpha 0), so this is the base model unchanged: no bias was added."]
    lines = [f"{FOLD_TEXT} {EXACTNESS[report.format]}"]
    if report.exported_as:
        dropped = ", ".join(report.dropped_config_keys) or "none"
        lines.append(f"\nThe stock {report.model_type} class has no bias slot on that projection, so the model is "
                     f"written as the exactly equivalent `{report.exported_as}` architecture (no sliding window is "
                     f"in effect; config keys not carried over: {dropped}).")
    if report.format == "hf" and report.max_abs_diff is not None:
        lines.append(f"\nChecked at export: stock transformers reloads every weight of this folder, and its logits "
                     f"match the folded model's (max abs difference {report.max_abs_diff:.2g} on a probe input).")
    if report.format == "gguf":
        lines.append(f"\nThe GGUF is the base file with every tensor and metadata value unchanged, plus "
                     f"{len(report.gguf_added)} float32 tensors `blk.N.attn_output.bias` and `destein.*` metadata "
                     "keys (checked by reading the file back).")
    return lines


def usage(report: ExportReport) -> list[str]:
    """The card's instructions to load and serve the folder."""
    if report.format == "gguf":
        return [GGUF_TEXT.format(name=next((f for f in report.files if f.endswith(".gguf")), "MODEL.gguf"))]
    return [HF_TEXT]
