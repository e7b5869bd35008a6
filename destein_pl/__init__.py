"""DeStein: detoxify causal language models by steering their attention heads at inference time."""

from destein_pl.architectures import ARCHITECTURES, Architecture, UnsupportedArchitectureError, architecture_for
from destein_pl.loading import BUILTIN_MODELS, load_base_model
from destein_pl.steering import SteeredCausalLM

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "BUILTIN_MODELS",
    "SteeredCausalLM",
    "UnsupportedArchitectureError",
    "architecture_for",
    "load_base_model",
]
