"""Steering a causal LM: the architecture registry, the steering operators, the steered model, the probe gate,
activation recording, checkpoint files, base-model loading, folding and export."""

from destein_pl.steering.architectures import (
    ARCHITECTURES,
    Architecture,
    UnsupportedArchitectureError,
    architecture_for,
)
from destein_pl.steering.checkpoint import CheckpointError, CheckpointMismatchError, read_checkpoint, save_steering
from destein_pl.steering.export import ExportError
from destein_pl.steering.gating import GATE_MODES, GateSettings
from destein_pl.steering.loading import BUILTIN_MODELS, load_base_model
from destein_pl.steering.model import SteeredCausalLM
from destein_pl.steering.operators import OPERATORS, SteeringOperator
from destein_pl.steering.probes import Probes

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "BUILTIN_MODELS",
    "CheckpointError",
    "CheckpointMismatchError",
    "ExportError",
    "GATE_MODES",
    "GateSettings",
    "OPERATORS",
    "Probes",
    "SteeredCausalLM",
    "SteeringOperator",
    "UnsupportedArchitectureError",
    "architecture_for",
    "load_base_model",
    "read_checkpoint",
    "save_steering",
]
