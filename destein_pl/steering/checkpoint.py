"""Small self-contained steering checkpoints: only the steering tensors plus what is needed to rebuild the model.

Two files carry the same content:
- the Lightning checkpoint (`.ckpt`) written by `fit`, whose state dict holds only the steering buffers;
- `.safetensors` (tensors, with the metadata as JSON in its header) plus a `.json` copy of the metadata, for use
  without Lightning.
Loading never unpickles arbitrary objects (`torch.load(weights_only=True)` or safetensors), checks that the
checkpoint was made for the model's architecture, and refuses non-finite tensors.

The fusion variant and the gate settings are metadata (`options.fusion`, `options.gate`); the gate's probes are the
`gate_probe_*` tensors (fit on the pairs without their cues; `probes.gate_probe_*` in a `.ckpt`), or, in checkpoints
made before those existed, the head-weight probes `probe_*`. Checkpoints written before those
options existed load as `fusion: paper`, `gate: none`: exactly the steering they had.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from destein_pl.files import atomic_path, write_atomic
from destein_pl.steering.gating import GateProbes, GateSettings
from destein_pl.steering.loading import load_base_model

if TYPE_CHECKING:
    from destein_pl.steering.model import SteeredCausalLM

FORMAT = "destein-pl/1"
METADATA_KEY = "destein"
STEER_KEY_MARK = ".steer_"
LEGACY_NAMES = {"probe_weights": "head_weights"}
"""Tensor and buffer names of earlier checkpoints, read as their current names."""


class CheckpointMismatchError(ValueError):
    """A steering checkpoint made for another model architecture."""


class CheckpointError(ValueError):
    """A file that is not a readable destein-pl steering checkpoint; the message names the file."""


def architecture_signature(steered: SteeredCausalLM) -> dict[str, Any]:
    """What a steering checkpoint must match: family, model type and the shape of the steering site."""
    return {
        "family": steered.architecture.family,
        "model_type": steered.config.model_type,
        "num_layers": steered.num_layers,
        "num_heads": steered.num_heads,
        "head_dim": steered.head_dim,
        "hidden_size": steered.config.hidden_size,
    }


def check_signature(metadata: dict[str, Any], steered: SteeredCausalLM, source: str | Path) -> None:
    expected, actual = metadata["architecture"], architecture_signature(steered)
    diffs = [f"{k}: checkpoint {expected.get(k)!r}, model {v!r}" for k, v in actual.items() if expected.get(k) != v]
    if diffs:
        raise CheckpointMismatchError(f"{source} was made for another model ({'; '.join(diffs)})")


def check_finite(tensors: dict[str, Tensor], source: str | Path) -> None:
    """Refuse NaN or infinite values: they would make every continuation empty, even at alpha 0."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{source}: tensors {bad[:3]} contain NaN or infinite values; recalibrate")


def save_steering(
    path: str | Path, steered: SteeredCausalLM, metadata: dict[str, Any], extra: dict[str, Tensor] | None = None
) -> None:
    """Write `path` (.safetensors) and its `.json` metadata: vectors, head weights, alpha, and `extra` arrays."""
    path = Path(path)
    tensors = {
        "vectors": steered.vectors.contiguous(),
        "head_weights": steered.head_weights.contiguous(),
        "alpha": torch.tensor(steered.alpha),
        **{k: v.detach().cpu().contiguous() for k, v in (extra or {}).items()},
    }
    text = json.dumps(metadata, indent=2, sort_keys=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: text})
    write_atomic(path.with_suffix(".json"), text + "\n")


def _renamed(key: str) -> str:
    for old, new in LEGACY_NAMES.items():
        if key == old or key.endswith(f"steer_{old}"):
            return key[: len(key) - len(old)] + new
    return key


def load_checkpoint_file(path: str | os.PathLike) -> dict[str, Any]:
    """The content of a Lightning `.ckpt`, loading tensors and plain containers only (never arbitrary objects),
    with an error naming the file when it is not a checkpoint."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; expected a steering checkpoint file (.ckpt or .safetensors)")
    if not path.is_file():
        raise FileNotFoundError(f"steering checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found is None:
            raise CheckpointError(f"{path}: not a readable checkpoint (not a torch file)") from None
        raise CheckpointError(f"{path}: refused to load: the checkpoint holds an object ({found.group(1)}) other "
                              f"than tensors and plain values, and unpickling it could run code") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, IndexError, KeyError) as err:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: not a Lightning checkpoint (a {type(checkpoint).__name__}, not a dict)")
    return checkpoint


def read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """Tensors and metadata of a `.ckpt` or `.safetensors` steering checkpoint, without unpickling objects."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; expected a steering checkpoint file (.ckpt or .safetensors)")
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"steering checkpoint not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {_renamed(k): f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
        if METADATA_KEY in header:
            return tensors, json.loads(header[METADATA_KEY])
        sidecar = path.with_suffix(".json")
        if not sidecar.is_file():
            raise CheckpointError(f"{path} carries no steering metadata and {sidecar} does not exist")
        return tensors, json.loads(sidecar.read_text(encoding="utf-8"))
    if path.suffix == ".ckpt":
        checkpoint = load_checkpoint_file(path)
        state = {_renamed(k): v for k, v in checkpoint.get("state_dict", {}).items()}
        return state, checkpoint.get(METADATA_KEY)
    raise CheckpointError(f"unknown checkpoint type {path.suffix!r} for {path}: expected .ckpt or .safetensors")


def apply_checkpoint_state(
    steered: SteeredCausalLM, tensors: dict[str, Tensor], metadata: dict[str, Any] | None, source: str | Path
) -> None:
    """Set a model's steering from checkpoint tensors after checking they were made for this model.

    `tensors` is either the stacked export (`vectors`, `head_weights`, `alpha`) or a Lightning state dict whose
    per-block buffers sit under the LightningModule's `steered.` attribute.
    """
    if metadata is None or metadata.get("format") != FORMAT:
        found = None if metadata is None else metadata.get("format")
        raise CheckpointError(f"{source}: not a destein-pl steering checkpoint (format {found!r}, expected {FORMAT!r})")
    check_signature(metadata, steered, source)
    tensors = {_renamed(k): v for k, v in tensors.items()}
    check_finite(tensors, source)
    apply_steering_options(steered, tensors, metadata, source)
    if "vectors" in tensors:
        steered.set_steering(tensors["vectors"], tensors["head_weights"], float(tensors["alpha"]))
        return
    prefix = "steered."
    state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix) and STEER_KEY_MARK in k}
    result = steered.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if STEER_KEY_MARK in k]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{source}: steering state does not fit the model (missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]})"
        )


def apply_steering_options(
    steered: SteeredCausalLM, tensors: dict[str, Tensor], metadata: dict[str, Any], source: str | Path
) -> None:
    """Set the checkpoint's fusion variant, probes and gate on a model (`paper`, `none` where it names none)."""
    options = metadata.get("options") or {}
    try:
        probes = GateProbes.from_tensors(tensors)
        gate = GateSettings.from_metadata(options.get("gate"))
        if gate.enabled and probes is None:
            raise ValueError(f"gate {gate.mode!r} needs the probes, and the checkpoint has none")
        steered.set_gate(None)
        steered.gate_probes = None
        steered.fusion = options.get("fusion", "paper")
        steered.set_gate(gate, probes)
    except ValueError as err:
        raise CheckpointError(f"{source}: {err}") from err


def load_steered(
    cls: type[SteeredCausalLM],
    path: str | Path,
    alpha: float | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: str | dict | None = None,
    fusion: str | None = None,
    gate: GateSettings | dict | str | None = None,
) -> SteeredCausalLM:
    """Load the base model named in a steering checkpoint, steer it with the checkpoint, and return it."""
    tensors, metadata = read_checkpoint(path)
    if metadata is None or "base_model" not in metadata:
        raise CheckpointError(f"{path}: not a destein-pl steering checkpoint (no base model recorded)")
    base = metadata["base_model"]
    model, tokenizer = load_base_model(base["name_or_path"], dtype=dtype or base.get("dtype"), device_map=device_map)
    steered = cls(model, tokenizer, base_model=base["name_or_path"])
    apply_checkpoint_state(steered, tensors, metadata, path)
    if alpha is not None:
        steered.alpha = alpha
    if fusion is not None:
        steered.fusion = fusion
    if gate is not None:
        steered.set_gate(gate)
    return steered
