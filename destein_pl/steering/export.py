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
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from destein_pl.files import write_atomic
from destein_pl.steering.architectures import Architecture
from destein_pl.steering.checkpoint import check_format, read_checkpoint, steering_options
from destein_pl.steering.folding import add_zero_biases, check_foldable, fold, has_steering
from destein_pl.steering.gguf_export import export_gguf
from destein_pl.steering.loading import DTYPES
from destein_pl.steering.model import SteeredCausalLM
from destein_pl.steering.model_card import ExportError, ExportReport, model_card, results_of, steering_record

log = logging.getLogger(__name__)

FORMATS = ("hf", "gguf")
PROBE_TOKENS = 24
VERIFY_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
"""Largest |logit difference| between the reloaded folder and the folded model, relative to the largest |logit|."""


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
        results: a `results.json` of `destein test` on this checkpoint, whose metrics go into the model card (refused
            when its steering digest is not this checkpoint's).
        overwrite: replace an existing non-empty `out` that holds a previous export and nothing else (exactly the
            files its `destein.json` lists).
        verify: reload the written folder with stock transformers and check it loads every weight and reproduces
            the folded model's logits (format `hf`; a GGUF copy is always checked tensor by tensor).
    """
    ckpt, target, results_path = check_arguments(ckpt_path, out, dtype, format, results, overwrite)
    tensors, metadata = read_checkpoint(ckpt)
    if metadata is None or "base_model" not in metadata:
        raise ValueError(f"ckpt_path: {ckpt} is not a destein-pl steering checkpoint (no base model recorded)")
    fusion, gate, _ = steering_options(tensors, check_format(metadata, ckpt), ckpt)
    check_foldable(fusion, gate.mode)
    run_results = read_results(results_path) if results_path else None
    with staged_folder(target, overwrite) as folder:
        if format == "gguf":
            report = export_gguf(ckpt, folder, metadata, run_results)
        else:
            report = export_hf(ckpt, folder, metadata, dtype, verify, target.name, run_results)
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
    target = checked_out(Path(out), ckpt, overwrite)
    results_path = None if results is None else Path(results)
    if results_path is not None and not results_path.is_file():
        raise FileNotFoundError(f"results: no results file at {results_path}")
    return ckpt, target, results_path


EXPORT_MARK = "destein.json"
"""The file every export writes, listing every file of the export (`files`); a non-empty `out` is replaced only
when it holds exactly those files."""


def checked_out(out: Path, ckpt: Path, overwrite: bool) -> Path:
    """The folder to write (a link's target), or an error naming `out` when writing there could lose a file: the
    folder holding the checkpoint or above it, the working folder or above it, a folder holding anything but the
    files of a previous export (`check_previous_export`), a link to nothing, a file."""
    if out.is_symlink() and not out.exists():
        raise FileNotFoundError(f"out: {out} is a link to {os.readlink(out)}, which does not exist")
    target = out.resolve()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"out: {out} is a file; expected a folder to write")
    source, here = ckpt.resolve(), Path.cwd().resolve()
    if target in source.parents:
        raise ValueError(f"out: {out} holds the checkpoint being exported ({ckpt}); write the export elsewhere")
    if target == here or target in here.parents:
        raise ValueError(f"out: {out} is the working folder or one above it; write the export into a folder of its "
                         f"own")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise FileExistsError(f"out: {out} exists and is not empty; pass overwrite=True to replace it")
        check_previous_export(out, target)
    return target


def check_previous_export(out: Path, folder: Path) -> None:
    """Refuse to replace `folder` unless it holds exactly what a previous export wrote: the files its
    `destein.json` lists (`files`), and nothing else (no other file, no folder)."""
    never = "overwrite replaces only a previous export, never other files"
    mark = folder / EXPORT_MARK
    if not mark.is_file():
        raise FileExistsError(f"out: {out} holds files that are not a destein-pl export (no {EXPORT_MARK}); {never}")
    try:
        listed = json.loads(mark.read_text(encoding="utf-8")).get("files")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        listed = None
    if not (isinstance(listed, list) and all(isinstance(name, str) for name in listed)):
        raise FileExistsError(f"out: {out}/{EXPORT_MARK} lists no exported files (an unreadable or older export), so "
                              f"nothing shows the folder holds only an export; delete it yourself or write elsewhere")
    others = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir()
                    if p.name not in listed or p.is_dir())
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise FileExistsError(f"out: {out} holds files that the previous export did not write ({shown}); {never}")


def read_results(path: Path) -> dict[str, Any]:
    """A `results.json` of `destein test`: a whole run (`runs`, one per alpha) or one alpha's file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"results: {path} is not a JSON file ({err})") from err
    runs = data.get("runs", [data]) if isinstance(data, dict) else None
    if not runs or not all(isinstance(r, dict) and "alpha" in r and "metrics" in r for r in runs):
        raise ValueError(f"results: {path} is not a results.json of `destein test` (no runs with alpha and metrics)")
    for run in runs:
        subsets = run["metrics"]
        if not isinstance(subsets, dict) or not all(isinstance(m, dict) for m in subsets.values()):
            raise ValueError(f"results: {path}: metrics of alpha {run['alpha']!r} must map each subset to its metrics")
        for subset, metrics in subsets.items():
            bad = {k: v for k, v in metrics.items()
                   if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)))}
            if bad:
                raise ValueError(f"results: {path}: alpha {run['alpha']!r}, subset {subset!r}: metrics must be numbers "
                                 f"or null, got {bad}")
    steering = data.get("steering")
    if not isinstance(steering, dict) or not isinstance(steering.get("digest"), str):
        raise ValueError(f"results: {path} records no steering digest (`steering.digest`), so nothing shows it was "
                         f"made with this checkpoint; evaluate the checkpoint with `destein test` and pass that "
                         f"results.json")
    return {"path": str(path), "base_model": data.get("base_model"), "scorer": data.get("scorer"),
            "steering": steering, "runs": runs}


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


def export_hf(ckpt: Path, folder: Path, metadata: dict[str, Any], dtype: str | None, verify: bool, name: str,
              results: dict[str, Any] | None = None) -> ExportReport:
    """Fold the checkpoint in place and write its Hugging Face files into `folder`; `name` names the exported
    model in its config; `results` (`read_results`) go into the model card if they were made with this steering."""
    steered = SteeredCausalLM.from_checkpoint(ckpt, dtype=dtype)
    architecture, config = steered.architecture, steered.config
    report = ExportReport(str(ckpt), metadata, round(steered.alpha, 6), "hf", architecture.family, config.model_type,
                          results=results_of(steered, results))
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
    readable_by_transformers_4(folder, name, list(tokenizer.model_input_names) if tokenizer is not None else None)
    if verify:
        report.max_abs_diff = verify_hf_folder(folder, folded)
    return report


LEGACY_TOKENIZER_CLASS = {"TokenizersBackend": "PreTrainedTokenizerFast"}
"""transformers 5 names the fast tokenizer class `TokenizersBackend`; 4.x knows it as `PreTrainedTokenizerFast`
(5.x reads both names as the same class)."""


def readable_by_transformers_4(folder: Path, name: str, input_names: list[str] | None) -> None:
    """Make the folder load the same model in transformers 4.x, which serving stacks still pin: 4.x reads the rope
    base from a top-level `rope_theta` (5.x writes it only under `rope_parameters`, and 4.x then silently uses
    10000) and its scaling from `rope_scaling`, knows the fast tokenizer by its 4.x class name, and gives that
    class's outputs (`token_type_ids` too, which `model.generate(**tokenizer(text))` refuses) unless the config
    names them: `input_names`, what the live tokenizer gives. The config also names the exported model (`name`),
    not the base model."""
    path = folder / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        config.setdefault("rope_scaling", None if scaling.get("rope_type", "default") == "default" else scaling)
    for key in ("_name_or_path", "_model_name_or_path"):
        if key in config:
            config[key] = name
    write_atomic(path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    path = folder / "tokenizer_config.json"
    if path.is_file():
        tokenizer = json.loads(path.read_text(encoding="utf-8"))
        tokenizer["tokenizer_class"] = LEGACY_TOKENIZER_CLASS.get(tokenizer.get("tokenizer_class"),
                                                                  tokenizer.get("tokenizer_class"))
        if input_names is not None:
            tokenizer["model_input_names"] = input_names
        write_atomic(path, json.dumps(tokenizer, indent=2, sort_keys=True) + "\n")


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



# -- folders ----------------------------------------------------------------------------------------------------------


STAGING_MARKS = (".tmp-", ".old-")
"""A staging folder is `.<out name><mark><pid>-<random>`, beside `out`."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(out: Path) -> None:
    """Remove the staging folders beside `out` that an export killed mid-way left (their process is gone)."""
    if not out.parent.is_dir():
        return
    for mark in STAGING_MARKS:
        for path in out.parent.glob(f".{out.name}{mark}*"):
            pid = path.name[len(f".{out.name}{mark}"):].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                log.info("removing %s, left by an export that did not finish", path)
                shutil.rmtree(path)


@contextmanager
def staged_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling of `out` to write into, renamed onto `out` when the block succeeds (an existing `out`
    is replaced only with `overwrite`), removed when it fails. Staging folders of killed exports are removed first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            if any(out.iterdir()):
                if not overwrite:
                    raise FileExistsError(f"out: {out} was filled while exporting; not replacing it")
                check_previous_export(out, out)  # again: files may have been added while exporting
            old = out.parent / f".{out.name}.old-{tag}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def finish_folder(folder: Path, report: ExportReport) -> None:
    """Add the model card and `destein.json` to an exported folder."""
    report.files = sorted({p.name for p in folder.iterdir()} | {"README.md", EXPORT_MARK})
    write_atomic(folder / "README.md", model_card(report))
    write_atomic(folder / EXPORT_MARK, json.dumps(steering_record(report), indent=2, sort_keys=True) + "\n")
    readable(folder)


def readable(folder: Path) -> None:
    """Give the folder and its files the modes the umask allows (a server running as another user reads them):
    some writers create owner-only files."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


