"""Small self-contained steering checkpoints: only the steering tensors plus what is needed to rebuild the model.

Two files carry the same content:
- the Lightning checkpoint (`.ckpt`) written by `fit`, whose state dict holds only the steering buffers;
- `.safetensors` (tensors, with the metadata as JSON in its header) plus a `.json` copy of the metadata, for use
  without Lightning.
Loading never unpickles arbitrary objects: `torch.load(weights_only=True)` or safetensors.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from destein_pl.loading import load_base_model
from destein_pl.steering import SteeredCausalLM

log = logging.getLogger(__name__)

FORMAT = "destein-pl/1"
METADATA_KEY = "destein"
STEER_KEY_MARK = ".steer_"


class CheckpointMismatchError(ValueError):
    """A steering checkpoint made for another model architecture."""


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


def _atomic_write(path: Path, write) -> None:
    """Write through `write(tmp_path)` into a temporary file beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates owner-only files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_steering(
    path: str | Path, steered: SteeredCausalLM, metadata: dict[str, Any], extra: dict[str, Tensor] | None = None
) -> None:
    """Write `path` (.safetensors) and its `.json` metadata: vectors, probe weights, alpha, and `extra` arrays."""
    path = Path(path)
    tensors = {
        "vectors": steered.vectors.contiguous(),
        "probe_weights": steered.probe_weights.contiguous(),
        "alpha": torch.tensor(steered.alpha),
        **{k: v.detach().cpu().contiguous() for k, v in (extra or {}).items()},
    }
    text = json.dumps(metadata, indent=2, sort_keys=True)
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={METADATA_KEY: text}))
    _atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(text + "\n"))


def read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """Tensors and metadata of a `.ckpt` or `.safetensors` steering checkpoint, without unpickling objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"steering checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if METADATA_KEY in header:
            return tensors, json.loads(header[METADATA_KEY])
        sidecar = path.with_suffix(".json")
        if not sidecar.is_file():
            raise ValueError(f"{path} carries no steering metadata and {sidecar} does not exist")
        return tensors, json.loads(sidecar.read_text())
    if path.suffix == ".ckpt":
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        return checkpoint.get("state_dict", {}), checkpoint.get(METADATA_KEY)
    raise ValueError(f"unknown checkpoint type {path.suffix!r} for {path}: expected .ckpt or .safetensors")


def apply_checkpoint_state(
    steered: SteeredCausalLM, tensors: dict[str, Tensor], metadata: dict[str, Any] | None, source: str | Path
) -> None:
    """Set a model's steering from checkpoint tensors after checking they were made for this model.

    `tensors` is either the stacked export (`vectors`, `probe_weights`, `alpha`) or a Lightning state dict whose
    per-block buffers sit under the LightningModule's `steered.` attribute.
    """
    if metadata is None or metadata.get("format") != FORMAT:
        found = None if metadata is None else metadata.get("format")
        raise ValueError(f"{source}: not a destein-pl steering checkpoint (format {found!r}, expected {FORMAT!r})")
    check_signature(metadata, steered, source)
    if "vectors" in tensors:
        steered.set_steering(tensors["vectors"], tensors["probe_weights"], float(tensors["alpha"]))
        return
    prefix = "steered."
    state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    result = steered.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if STEER_KEY_MARK in k]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{source}: steering state does not fit the model (missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]})"
        )


def from_checkpoint(
    path: str | Path,
    alpha: float | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: str | dict | None = None,
) -> SteeredCausalLM:
    """Load the base model named in a steering checkpoint, steer it with the checkpoint, and return it."""
    tensors, metadata = read_checkpoint(path)
    if metadata is None or "base_model" not in metadata:
        raise ValueError(f"{path}: not a destein-pl steering checkpoint (no base model recorded)")
    base = metadata["base_model"]
    model, tokenizer = load_base_model(base["name_or_path"], dtype=dtype or base.get("dtype"), device_map=device_map)
    steered = SteeredCausalLM(model, tokenizer)
    apply_checkpoint_state(steered, tensors, metadata, path)
    if alpha is not None:
        steered.alpha = alpha
    return steered


class SteeringCheckpoint(Callback):
    """Writes the calibrated steering once `fit` ends (before teardown, so every process takes part):
    `<dirpath>/<filename>.ckpt` (Lightning, written atomically), and beside it `<filename>.safetensors`,
    `<filename>.json` and the probe-accuracy heatmap `<filename>-probes.png`.

    Use it with `trainer.enable_checkpointing: false`: calibration makes no optimizer steps, which Lightning's
    ModelCheckpoint takes as nothing to save.
    """

    def __init__(self, dirpath: str = "checkpoints", filename: str = "steering") -> None:
        self.path = Path(dirpath) / f"{filename}.ckpt"

    def on_train_end(self, trainer, pl_module) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        trainer.save_checkpoint(tmp, weights_only=True)  # every process calls it; the main one writes
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
            pl_module.export_steering(self.path)
            log.info("steering checkpoint written to %s", self.path)
        trainer.strategy.barrier("steering_checkpoint")
