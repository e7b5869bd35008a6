"""Small self-contained steering checkpoints: only the steering tensors plus what is needed to rebuild the model.

Two files carry the same content:
- the Lightning checkpoint (`.ckpt`) written by `fit`, whose state dict holds only the steering buffers (and the
  probes under `probes.`);
- `.safetensors` (tensors, with the metadata as JSON in its header) plus a `.json` copy of the metadata, for use
  without Lightning.
Reading never unpickles arbitrary objects (`torch.load(weights_only=True)` or safetensors) and refuses non-finite
tensors; `SteeredCausalLM.load_steering` checks that the checkpoint was made for the model's architecture.

The fusion operator and the gate settings are metadata (`options.fusion`, `options.gate`); the gate's probes are the
`gate_probe_*` tensors (fit on the pairs without their cues; `probes.gate_probe_*` in a `.ckpt`) or, for a gate
reading continuation probes, `continuation_probe_*` (from `destein gate`); the head-weight probes are `probe_*`. A
gate needs its probes: a checkpoint that names a gate without them, or holds only some of their three tensors, is
refused.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from destein_pl.files import atomic_path, jsonable, read_text, write_atomic
from destein_pl.steering.gating import GateSettings
from destein_pl.steering.operators import operator_for
from destein_pl.steering.probes import GATE_PROBE_PREFIXES, Probes

FORMAT = "destein-pl/1"
METADATA_KEY = "destein"
STEER_KEY_MARK = ".steer_"
LIGHTNING_PREFIX = "steered."
"""Where a Lightning state dict holds the steered model's buffers."""
PROBES_PREFIX = "probes."
"""Where a Lightning state dict holds the probes."""


class CheckpointMismatchError(ValueError):
    """A steering checkpoint made for another model architecture."""


class CheckpointError(ValueError):
    """A file that is not a readable destein-pl steering checkpoint; the message names the file."""


def check_signature(metadata: dict[str, Any], actual: dict[str, Any], source: str | Path) -> None:
    """Refuse a checkpoint whose recorded architecture differs from `actual` (`SteeredCausalLM.signature()`)."""
    expected = metadata.get("architecture")
    if not isinstance(expected, dict):
        raise CheckpointError(f"{source}: the metadata records no architecture")
    diffs = [f"{k}: checkpoint {expected.get(k)!r}, model {v!r}" for k, v in actual.items() if expected.get(k) != v]
    if diffs:
        raise CheckpointMismatchError(f"{source} was made for another model ({'; '.join(diffs)})")


MAX_MAGNITUDE = 1e6
"""No calibrated vector, probe coefficient or intercept comes near this (activations and logistic-regression
weights are of order 1 to 100); a value beyond it is a damaged or forged file."""
UNIT_INTERVAL = ("head_weights", "probe_accuracy", "gate_probe_accuracy", ".steer_head_weights")
"""Tensors (or name endings) that hold probe accuracies or weights derived from them, in [0, 1]."""


def check_values(tensors: dict[str, Tensor], source: str | Path) -> None:
    """Refuse NaN or infinite values (they would make every continuation empty, even at alpha 0), values beyond
    `MAX_MAGNITUDE`, and accuracies or head weights outside [0, 1], naming the tensors."""
    floats = {k: v for k, v in tensors.items() if v.is_floating_point()}
    bad = [k for k, v in floats.items() if not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{source}: tensors {bad[:3]} contain NaN or infinite values; recalibrate")
    huge = [k for k, v in floats.items() if v.numel() and float(v.abs().max()) > MAX_MAGNITUDE]
    if huge:
        raise CheckpointError(f"{source}: tensors {huge[:3]} hold values beyond {MAX_MAGNITUDE:g} in magnitude, which "
                              f"no calibration produces; the file is damaged: recalibrate")
    outside = [k for k, v in floats.items() if k.endswith(UNIT_INTERVAL) and v.numel()
               and not (float(v.min()) >= 0 and float(v.max()) <= 1)]
    if outside:
        raise CheckpointError(f"{source}: tensors {outside[:3]} must hold accuracies or head weights in [0, 1]; "
                              f"the file is damaged: recalibrate")


def save_steering(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, Any]) -> None:
    """Write `path` (.safetensors) and its `.json` metadata: the stacked steering (`vectors`, `head_weights`,
    `alpha`) and the probes."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    text = json.dumps(jsonable(metadata), indent=2, sort_keys=True, allow_nan=False)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: text})
    write_atomic(path.with_suffix(".json"), text + "\n")


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
        # torch's wording: "Unsupported global: GLOBAL x.y" (up to 2.12), "unsupported GLOBAL x.y whose ..." (2.13)
        found = re.search(r"unsupported global:? (?:GLOBAL )?(\S+)", str(err), re.IGNORECASE)
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
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
        if METADATA_KEY in header:
            return tensors, parse_metadata(header[METADATA_KEY], f"{path} (its header's {METADATA_KEY!r} metadata)")
        sidecar = path.with_suffix(".json")
        if not sidecar.is_file():
            raise CheckpointError(f"{path} carries no steering metadata and {sidecar} does not exist")
        return tensors, parse_metadata(read_text(sidecar, "steering metadata file"), sidecar)
    if path.suffix == ".ckpt":
        checkpoint = load_checkpoint_file(path)
        return dict(checkpoint.get("state_dict", {})), checkpoint.get(METADATA_KEY)
    raise CheckpointError(f"unknown checkpoint type {path.suffix!r} for {path}: expected .ckpt or .safetensors")


def parse_metadata(text: str, source: str | Path) -> Any:
    """Steering metadata from its JSON text, with an error naming where it was read when it is not JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{source}: the steering metadata is not valid JSON ({err.msg} at line {err.lineno}, "
                              f"column {err.colno}); expected the JSON object `destein fit` writes") from None


def check_format(metadata: dict[str, Any] | None, source: str | Path) -> dict[str, Any]:
    """`metadata` if it is a destein-pl steering checkpoint's, else an error naming the file."""
    found = metadata.get("format") if isinstance(metadata, dict) else None
    if found != FORMAT:
        raise CheckpointError(f"{source}: not a destein-pl steering checkpoint (format {found!r}, expected {FORMAT!r})")
    return metadata


def steering_options(tensors: dict[str, Tensor], metadata: dict[str, Any], source: str | Path
                     ) -> tuple[str, GateSettings, dict[str, Probes | None]]:
    """The checkpoint's fusion operator name, gate settings and gate probe sets by `GateSettings.probes` value
    (`paper`, `none` and None where it names or holds none)."""
    options = metadata.get("options") or {}
    try:
        fusion = options.get("fusion", "paper")
        operator_for(fusion)
        gate = GateSettings.from_metadata(options.get("gate"))
        plain = {k.removeprefix(PROBES_PREFIX): v for k, v in tensors.items()}
        probes = {name: Probes.from_arrays(plain, prefix) for name, prefix in GATE_PROBE_PREFIXES.items()}
        if gate.enabled and probes[gate.probes] is None:
            which = "the gate's" if gate.probes == "context" else f"the {gate.probes}"
            raise ValueError(f"gate {gate.mode!r} needs {which} probes ({GATE_PROBE_PREFIXES[gate.probes]}*), and the "
                             f"checkpoint has none")
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{source}: {err}") from err
    return fusion, gate, probes
