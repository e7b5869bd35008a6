"""Exporting a steered model as files that stock engines serve, with no destein-pl at inference time.

`export` folds a steering checkpoint into the attention output projections' biases (`folding.fold`) and writes
- `format="hf"`: a standard model folder (safetensors, `config.json`, `generation_config.json`, tokenizer files)
  that `AutoModelForCausalLM.from_pretrained` loads as it is. The config sets the flag that makes the stock class
  create the bias (LLaMA `attention_bias`, OPT `enable_bias`); the other biases the flag creates are written as
  explicit zeros. A model type whose stock class has no slot for the bias is written as an exactly equivalent
  stock architecture (Mistral and Qwen2 as LLaMA, only without a sliding window in effect) or refused (MPT).
- `format="gguf"` (a GGUF base model only): a copy of the base GGUF with every original tensor and metadata value
  unchanged, plus one float32 `blk.N.attn_output.bias` per layer and `destein.*` metadata keys.
Both folders carry a model card (`README.md`) and `destein.json` (the steering's metadata). Everything is written
into a temporary sibling folder, checked, and renamed into place.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from gguf import MODEL_TENSOR, TENSOR_NAMES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from torch import Tensor
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from destein_pl.files import write_atomic
from destein_pl.steering.architectures import ARCHITECTURES, Architecture
from destein_pl.steering.checkpoint import read_checkpoint
from destein_pl.steering.folding import add_zero_biases, fold, folded_biases, has_steering
from destein_pl.steering.loading import BUILTIN_MODELS, DTYPES
from destein_pl.steering.model import SteeredCausalLM

log = logging.getLogger(__name__)

FORMATS = ("hf", "gguf")
METHOD = "DeStein (arXiv 2404.10464), head-wise activation steering folded into the attention output bias"
PAPER_URL = "https://arxiv.org/abs/2404.10464"
PROBE_TOKENS = 24
VERIFY_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
"""Largest |logit difference| between the reloaded folder and the folded model, relative to the largest |logit|."""


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


def export(
    ckpt_path: str,
    out: str,
    dtype: Literal["float32", "bfloat16", "float16"] | None = None,
    format: Literal["hf", "gguf"] = "hf",
    results: str | None = None,
    overwrite: bool = False,
    verify: bool = True,
) -> Path:
    """Fold a steering checkpoint into its base model and write files that stock engines load without destein-pl.

    Returns the folder written.

    Args:
        ckpt_path: steering checkpoint (.ckpt or .safetensors); its base model is loaded and folded.
        out: folder to write; it must not exist or be empty unless `overwrite` is true.
        dtype: dtype of the exported weights (`float32`, `bfloat16`, `float16`); default: the checkpoint's base
            dtype. Only for `format=hf`: a GGUF export keeps the base file's tensor types.
        format: `hf`, a Hugging Face model folder (safetensors, config, generation config, tokenizer) for
            transformers, vLLM, SGLang or TGI; `gguf`, a copy of the base model's GGUF file with the folded biases
            added, for llama.cpp (the checkpoint's base model must be a GGUF file or the built-in model).
        results: a `results.json` of `destein test` on this checkpoint, whose metrics go into the model card.
        overwrite: replace an existing non-empty `out`.
        verify: reload the written folder with stock transformers and check it loads every weight and reproduces
            the folded model's logits (format `hf`; a GGUF copy is always checked tensor by tensor).
    """
    ckpt, target, results_path = check_arguments(ckpt_path, out, dtype, format, results, overwrite)
    _, metadata = read_checkpoint(ckpt)
    if metadata is None or "base_model" not in metadata:
        raise ValueError(f"ckpt_path: {ckpt} is not a destein-pl steering checkpoint (no base model recorded)")
    run_results = read_results(results_path) if results_path else None
    with staged_folder(target, overwrite) as folder:
        if format == "gguf":
            report = export_gguf(ckpt, folder, metadata)
        else:
            report = export_hf(ckpt, folder, metadata, dtype, verify)
        report.results = run_results
        finish_folder(folder, report)
    log.info("exported %s to %s", ckpt, target)
    return target


def check_arguments(
    ckpt_path: str, out: str, dtype: str | None, format: str, results: str | None, overwrite: bool
) -> tuple[Path, Path, Path | None]:
    """The arguments as paths, or an error naming the argument that is wrong."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {format!r}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} or None; got {dtype!r}")
    if dtype is not None and format == "gguf":
        raise ValueError(f"dtype={dtype!r} applies to format='hf' only: a GGUF export keeps the base file's tensor "
                         "types (and writes the biases in float32)")
    ckpt = Path(ckpt_path)
    if not ckpt.is_file():
        raise FileNotFoundError(f"ckpt_path: no steering checkpoint file at {ckpt}")
    if ckpt.suffix not in (".ckpt", ".safetensors"):
        raise ValueError(f"ckpt_path: expected a .ckpt or .safetensors steering checkpoint, got {ckpt}")
    target = Path(out)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"out: {target} is a file; expected a folder to write")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"out: {target} exists and is not empty; pass overwrite=True to replace it")
    results_path = None if results is None else Path(results)
    if results_path is not None and not results_path.is_file():
        raise FileNotFoundError(f"results: no results file at {results_path}")
    return ckpt, target, results_path


def read_results(path: Path) -> dict[str, Any]:
    """A `results.json` of `destein test`: a whole run (`runs`, one per alpha) or one alpha's file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"results: {path} is not a JSON file ({err})") from err
    runs = data.get("runs", [data]) if isinstance(data, dict) else None
    if not runs or not all(isinstance(r, dict) and "alpha" in r and "metrics" in r for r in runs):
        raise ValueError(f"results: {path} is not a results.json of `destein test` (no runs with alpha and metrics)")
    return {"path": str(path), "base_model": data.get("base_model"), "scorer": data.get("scorer"), "runs": runs}


# -- Hugging Face folders ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HFTarget:
    """How a folded model of one model type is written as a stock Hugging Face folder."""

    model_type: str
    config: PretrainedConfig | None = None
    """A config of an equivalent stock class to write instead of the model's own; None: the model's own."""
    companions: tuple[str, ...] = ()
    """Linear modules (paths from a decoder layer) that the target's flag gives a bias: written as zeros."""
    dropped_config_keys: tuple[str, ...] = ()


def hf_target(config: PretrainedConfig, architecture: Architecture) -> HFTarget:
    """Where a folded model's bias can live in a stock class, or an `ExportError` saying why it cannot."""
    slot = architecture.bias_slot(config.model_type)
    if slot.stock:
        return HFTarget(config.model_type)
    family = f"{config.model_type} (family {architecture.family})"
    if slot.export_as is None:
        raise ExportError(f"cannot export a {family} model as a Hugging Face folder: {slot.note}, so a stock loader "
                          f"would drop the folded bias. Use the live steering (SteeredCausalLM) or fold() in memory.")
    if architecture.sliding_window_in_effect(config):
        raise ExportError(
            f"cannot export this {family} model as a Hugging Face folder: {slot.note}, and the equivalent stock "
            f"class ({slot.export_as}) has no sliding window, while this model attends to a window of "
            f"{config.sliding_window} tokens in a context of {architecture.context_length(config)}"
        )
    target_slot = architecture.bias_slot(slot.export_as)
    converted, dropped = converted_config(config, slot.export_as, target_slot.flag)
    return HFTarget(slot.export_as, converted, target_slot.companions, dropped)


def converted_config(config: PretrainedConfig, model_type: str, flag: str | None) -> tuple[PretrainedConfig, tuple]:
    """`config` as a config of `model_type`, with `flag` set: every key that config class knows is carried over;
    the keys it does not know are returned (they are the sliding-window keys checked out of effect)."""
    target_class = CONFIG_MAPPING[model_type]
    known = set(target_class().to_dict())
    source = config.to_dict()
    skip = {"model_type", "architectures", "transformers_version"}
    converted = target_class(**{k: v for k, v in source.items() if k in known and k not in skip})
    if flag is not None:
        setattr(converted, flag, True)
    converted.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]]
    return converted, tuple(sorted(set(source) - known - skip))


def export_hf(ckpt: Path, folder: Path, metadata: dict[str, Any], dtype: str | None, verify: bool) -> ExportReport:
    """Fold the checkpoint in place and write its Hugging Face files into `folder`."""
    steered = SteeredCausalLM.from_checkpoint(ckpt, dtype=dtype)
    architecture, config = steered.architecture, steered.config
    report = ExportReport(str(ckpt), metadata, round(steered.alpha, 6), "hf", architecture.family, config.model_type)
    report.folded = has_steering(steered)
    target = hf_target(config, architecture) if report.folded else HFTarget(config.model_type)
    tokenizer = steered.tokenizer
    folded = fold(steered, inplace=True)
    if target.config is not None:
        add_zero_biases(folded, architecture, target.companions)
        report.exported_as, report.dropped_config_keys = target.model_type, list(target.dropped_config_keys)
    report.dtype = str(folded.dtype).removeprefix("torch.")
    folded.save_pretrained(folder)
    if target.config is not None:
        target.config.dtype = folded.dtype
        target.config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if verify:
        report.max_abs_diff = verify_hf_folder(folder, folded)
    return report


def probe_input(config: PretrainedConfig, device: torch.device) -> Tensor:
    """A fixed batch of token ids that any vocabulary has, for comparing two models."""
    ids = (torch.arange(2 * PROBE_TOKENS) * 7919 + 3) % config.vocab_size
    return ids.reshape(2, PROBE_TOKENS).to(device)


@torch.no_grad()
def verify_hf_folder(folder: Path, folded: PreTrainedModel) -> float:
    """Reload `folder` with stock transformers; check every weight loads and the logits match `folded`'s.

    Returns the largest |logit difference|. A stock loader that has no slot for a saved weight drops it with a
    mere warning, so the loading report is checked, not only the logits.
    """
    loaded, info = AutoModelForCausalLM.from_pretrained(folder, dtype=folded.dtype, output_loading_info=True)
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise ExportError(f"the exported folder does not load exactly with stock transformers: {problems}")
    loaded.to(folded.device).eval()
    ids = probe_input(folded.config, folded.device)
    expected = folded(input_ids=ids).logits.float()
    actual = loaded(input_ids=ids).logits.float()
    diff = float((expected - actual).abs().max())
    limit = VERIFY_TOLERANCE.get(folded.dtype, 1e-2) * max(1.0, float(expected.abs().max()))
    if not diff <= limit:
        raise ExportError(f"the exported folder reloaded with stock transformers ({type(loaded).__name__}) gives "
                          f"other logits than the folded model: max abs diff {diff:.3g} > {limit:.3g}")
    return diff


# -- GGUF -------------------------------------------------------------------------------------------------------


def base_gguf_file(metadata: dict[str, Any]) -> Path:
    """The GGUF file of the checkpoint's base model, or an `ExportError` when the base is not one."""
    name = metadata["base_model"]["name_or_path"]
    if name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name].gguf_path()
    if str(name).endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"the checkpoint's base GGUF file is missing: {path}")
        return path
    raise ExportError(f"format='gguf' needs a GGUF base model; this checkpoint's base is {name!r} "
                      "(export format='hf' instead)")


def bias_tensor_name(layer: int) -> str:
    """The GGUF name of a layer's attention output bias (`blk.N.attn_output.bias`)."""
    return f"{TENSOR_NAMES[MODEL_TENSOR.ATTN_OUT].format(bid=layer)}.bias"


def gguf_metadata(report: ExportReport) -> dict[str, Any]:
    """The `destein.*` keys added to the GGUF: what steering the biases carry and where it came from."""
    pairs = report.metadata.get("pairs") or {}
    values: dict[str, Any] = {
        "destein.method": METHOD,
        "destein.alpha": float(report.alpha),
        "destein.source": Path(report.ckpt).name,
        "destein.base_model": str(report.metadata["base_model"]["name_or_path"]),
        "destein.folded_into": "blk.N.attn_output.bias" if report.folded else "nothing (zero steering)",
    }
    for key in ("source", "sha256", "m", "seed"):
        if pairs.get(key) is not None:
            values[f"destein.pairs.{key}"] = pairs[key]
    return values


def export_gguf(ckpt: Path, folder: Path, metadata: dict[str, Any]) -> ExportReport:
    """Copy the base GGUF into `folder` with the folded biases added, and check the copy tensor by tensor."""
    source = base_gguf_file(metadata)
    reader = GGUFReader(source)
    check_gguf_base(reader, source, metadata)
    steered = SteeredCausalLM.from_checkpoint(ckpt, dtype="float32")  # biases from the dequantized weights
    architecture = steered.architecture
    report = ExportReport(str(ckpt), metadata, round(steered.alpha, 6), "gguf", architecture.family,
                          steered.config.model_type, dtype="float32 biases; base tensors as stored")
    report.folded = has_steering(steered)
    folded = fold(steered, inplace=True)
    biases = folded_biases(folded, architecture) if report.folded else []
    added = {bias_tensor_name(i): b.numpy().astype(np.float32) for i, b in enumerate(biases)}
    target = folder / f"{source.stem}-destein.gguf"
    write_gguf_copy(reader, target, added, gguf_metadata(report))
    check_gguf_copy(source, target, added)
    report.gguf_added = sorted(added)
    return report


def check_gguf_base(reader: GGUFReader, source: Path, metadata: dict[str, Any]) -> None:
    """Refuse a GGUF whose llama.cpp architecture ignores an output bias, or that already has one."""
    arch_name = reader.get_field("general.architecture").contents()
    model_type = metadata["architecture"]["model_type"]
    family = next(a for a in ARCHITECTURES if model_type in a.model_types)
    slot = family.bias_slot(model_type)
    if slot.gguf_arch is None or slot.gguf_arch != arch_name:
        raise ExportError(f"cannot export a {model_type} model (family {family.family}, GGUF architecture "
                          f"{arch_name!r}) as GGUF: no llama.cpp architecture known here reads an optional "
                          "blk.N.attn_output.bias for it; export format='hf' instead")
    existing = [t.name for t in reader.tensors if t.name.endswith("attn_output.bias")]
    if existing:
        raise ExportError(f"{source} already has output biases ({existing[0]}, ...); folding into them would change "
                          "original tensors, which this export never does")


def write_gguf_copy(reader: GGUFReader, path: Path, added: dict[str, np.ndarray], metadata: dict[str, Any]) -> None:
    """Write the reader's file to `path` with every metadata value and tensor (raw bytes and types) unchanged,
    plus the `added` float32 tensors and `metadata` keys."""
    arch = reader.get_field("general.architecture").contents()
    writer = GGUFWriter(path, arch=arch, endianess=reader.endianess)
    alignment = reader.get_field("general.alignment")
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    for item in reader.fields.values():
        if item.name == "general.architecture" or item.name.startswith("GGUF."):
            continue  # the writer adds the first; the others are the reader's view of the header
        if item.name in metadata:
            raise ExportError(f"the base GGUF already has a {item.name} key: is it an export already?")
        value_type = item.types[0]
        sub_type = item.types[-1] if value_type == GGUFValueType.ARRAY else None
        writer.add_key_value(item.name, item.contents(), value_type, sub_type=sub_type)
    for key, value in metadata.items():
        writer.add_key_value(key, value, gguf_value_type(value))
    for tensor in reader.tensors:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                               tensor.tensor_type)
    for name, array in added.items():
        writer.add_tensor_info(name, array.shape, array.dtype, array.nbytes, GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    for array in added.values():
        writer.write_tensor_data(array)
    writer.close()


def gguf_value_type(value: Any) -> GGUFValueType:
    """The GGUF type of a metadata value written by this module."""
    if isinstance(value, bool):
        return GGUFValueType.BOOL
    if isinstance(value, int):
        return GGUFValueType.UINT32 if 0 <= value < 2**32 else GGUFValueType.INT64
    if isinstance(value, float):
        return GGUFValueType.FLOAT32
    return GGUFValueType.STRING


def check_gguf_copy(original: Path, exported: Path, added: dict[str, np.ndarray]) -> None:
    """Read both files back: every original tensor byte-identical (type, shape, bytes), every original metadata
    value equal, and exactly the `added` tensors more, with their values."""
    before, after = GGUFReader(original), GGUFReader(exported)
    new_tensors = {t.name: t for t in after.tensors}
    for tensor in before.tensors:
        copy = new_tensors.pop(tensor.name, None)
        if copy is None or copy.tensor_type != tensor.tensor_type or list(copy.shape) != list(tensor.shape) \
                or np.asarray(copy.data).tobytes() != np.asarray(tensor.data).tobytes():
            raise ExportError(f"GGUF copy check failed: tensor {tensor.name} differs from the original")
    if set(new_tensors) != set(added):
        raise ExportError(f"GGUF copy check failed: added tensors {sorted(new_tensors)}, expected {sorted(added)}")
    for name, array in added.items():
        tensor = new_tensors[name]
        if tensor.tensor_type != GGMLQuantizationType.F32 or not np.array_equal(np.asarray(tensor.data), array):
            raise ExportError(f"GGUF copy check failed: {name} does not hold the folded bias")
    for item in before.fields.values():
        if item.name.startswith("GGUF."):
            continue
        copy = after.get_field(item.name)
        if copy is None or copy.types != item.types or copy.contents() != item.contents():
            raise ExportError(f"GGUF copy check failed: metadata {item.name} differs from the original")


# -- folders and the model card ---------------------------------------------------------------------------------


@contextmanager
def staged_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling of `out` to write into, renamed onto `out` when the block succeeds (an existing `out`
    is replaced only with `overwrite`), removed when it fails."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            if any(out.iterdir()) and not overwrite:
                raise FileExistsError(f"out: {out} was filled while exporting; not replacing it")
            old = out.parent / f".{out.name}.old-{tag}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def finish_folder(folder: Path, report: ExportReport) -> None:
    """Add the model card and `destein.json` to an exported folder."""
    report.files = sorted({p.name for p in folder.iterdir()} | {"README.md", "destein.json"})
    write_atomic(folder / "README.md", model_card(report))
    write_atomic(folder / "destein.json", json.dumps(steering_record(report), indent=2, sort_keys=True) + "\n")


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
    }


def describe_base(name: str) -> str:
    """The base model for the card; a built-in one with the file and package it comes from."""
    if name in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[name]
        return (f"`{name}`: {builtin.gguf_file} from the `{builtin.distribution}` package "
                f"(version {builtin.version()}), dequantized to float32 for folding")
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
    "folded bias is `b + W d`, computed in float64 and rounded once. Logits equal the live steered model's up to "
    "float rounding."
)
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
    lines = [FOLD_TEXT]
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
