"""Steering a causal LM: the architecture registry, the steered model, activation recording, checkpoint files and
base-model loading."""

from destein_pl.steering.architectures import (
    ARCHITECTURES,
    Architecture,
    UnsupportedArchitectureError,
    architecture_for,
)
from destein_pl.steering.checkpoint import CheckpointError, CheckpointMismatchError, read_checkpoint, save_steering
from destein_pl.steering.export import ExportError
from destein_pl.steering.fusion import FUSIONS
from destein_pl.steering.gating import GATE_MODES, GateProbes, GateSettings
from destein_pl.steering.loading import BUILTIN_MODELS, load_base_model
from destein_pl.steering.model import SteeredCausalLM

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "BUILTIN_MODELS",
    "CheckpointError",
    "CheckpointMismatchError",
    "ExportError",
    "FUSIONS",
    "GATE_MODES",
    "GateProbes",
    "GateSettings",
    "SteeredCausalLM",
    "UnsupportedArchitectureError",
    "architecture_for",
    "load_base_model",
    "read_checkpoint",
    "save_steering",
]
