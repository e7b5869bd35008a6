"""Folding the steering into the attention output projection's bias: the same model at no cost per token.

The steering adds a constant `d = alpha * w * v` (per head, concatenated) to the input of the output projection,
so `W (h + d) + b = W h + (b + W d)`: exactly a bias on that projection. `fold` returns an ordinary Hugging Face
model, with no hooks or buffers, whose projections carry `b + W d` (`W d` computed in float64, then rounded once to
the weights' dtype). Where the family's stock class has a config flag that creates the bias (LLaMA's
`attention_bias`, OPT's `enable_bias`), the flag is set and the other biases it creates are added as zeros, so that
`save_pretrained` writes a folder the stock class loads; where the stock class has no slot at all (Mistral, Qwen2,
MPT) the bias works in memory only, and `destein_pl.steering.export` writes an equivalent stock architecture or
refuses. A steering that is all zero (alpha 0) folds to the base model itself: no bias is added, no weight changes.

Only an operator that declares it folds (`SteeringOperator.folds`: the paper's), without a gate, is a constant bias:
a gated steering depends on the context, and the `norm_preserving` and `published` operators are non-linear in the
activations, so `fold` refuses them (`NotFoldableError`, naming the option).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from destein_pl.steering.architectures import Architecture
from destein_pl.steering.attention import unwrap_block
from destein_pl.steering.operators import OPERATORS, SteeringOperator, operator_for, projected


class NotFoldableError(ValueError):
    """A steering that is not a constant bias on the output projections (a gate, or a non-linear operator)."""


def check_foldable(fusion: str | SteeringOperator = "paper", gate: str = "none") -> None:
    """Refuse, naming the option, a steering operator or gate mode that cannot be folded into a bias."""
    operator = operator_for(fusion) if isinstance(fusion, str) else fusion
    if not operator.folds:
        raise NotFoldableError(f"cannot fold fusion={operator.name!r} into a bias: it is not a constant offset (it "
                               f"depends on each activation); only operators that fold do "
                               f"({', '.join(n for n, c in OPERATORS.items() if c.folds)}). Serve it with destein-pl "
                               f"instead")
    if gate != "none":
        raise NotFoldableError(f"cannot fold gate={gate!r} into a bias: a probe-gated steering depends on the context; "
                               f"only gate='none' folds. Serve it with destein-pl instead")


def fold(steered: Any, inplace: bool = False) -> PreTrainedModel:
    """An unwrapped Hugging Face model computing what `steered` computes, the steering folded into the output
    projections' biases.

    `steered` is a `SteeredCausalLM`. By default the result is a deep copy and `steered` keeps working unchanged. With `inplace=True` the wrapped
    model itself is restored to its original attention classes and folded (no second copy in memory, e.g. for
    export); `steered` must not be used afterwards.
    """
    check_foldable(steered.fusion, steered.gate.mode)
    steering = has_steering(steered)
    model = steered.model if inplace else copy.deepcopy(steered.model)
    architecture = steered.architecture
    blocks = architecture.attention_blocks(model)
    offsets = [block.steering_offset() for block in blocks]
    for block in blocks:
        unwrap_block(block, getattr(block, architecture.projection))
    if steering:
        add_bias_slots(model, architecture)
        for projection, offset in zip(architecture.projections(model), offsets):
            add_to_bias(projection, offset)
        if hasattr(model, "destein_source"):
            del model.destein_source  # names the base model, which this no longer is
    return model


def has_steering(steered: Any) -> bool:
    """Whether any layer adds a non-zero vector (else the folded model is the base model)."""
    return any(bool(block.steering_offset().any()) for block in steered.blocks)


def add_bias_slots(model: PreTrainedModel, architecture: Architecture, model_type: str | None = None) -> None:
    """Give every output projection a bias (zeros where it has none), the way the stock class of `model_type`
    (default: the model's) would: set its config flag and add zero biases to the companions the flag creates."""
    slot = architecture.bias_slot(model_type or model.config.model_type)
    if slot.flag is not None:
        setattr(model.config, slot.flag, True)
        add_zero_biases(model, architecture, slot.companions)
    for projection in architecture.projections(model):
        ensure_bias(projection)


def add_zero_biases(model: PreTrainedModel, architecture: Architecture, companions: tuple[str, ...]) -> None:
    """A zero bias on each of `companions` (paths from a decoder layer) that has none."""
    for layer in architecture.layer_modules(model):
        for path in companions:
            ensure_bias(layer.get_submodule(path))


def ensure_bias(linear: nn.Module) -> None:
    """Give an `nn.Linear` without a bias a zero one (frozen, in the weight's dtype and device)."""
    if getattr(linear, "bias", None) is not None:
        return
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"cannot add a bias to a {type(linear).__name__}")
    weight = linear.weight
    linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=weight.dtype, device=weight.device),
                               requires_grad=False)


@torch.no_grad()
def add_to_bias(projection: nn.Module, offset: Tensor) -> None:
    """`b <- b + W d`, rounded once to the bias dtype; a zero `d` leaves `b` bit-identical."""
    if not offset.any():
        return
    bias = projection.bias
    bias.copy_((bias.to(torch.float64) + projected(projection, offset, torch.float64)).to(bias.dtype))


def folded_biases(model: PreTrainedModel, architecture: Architecture) -> list[Tensor | None]:
    """Every layer's output-projection bias, float32 on the CPU (None where a layer has none)."""
    return [None if p.bias is None else p.bias.detach().float().cpu() for p in architecture.projections(model)]
