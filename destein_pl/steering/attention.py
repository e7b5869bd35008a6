"""`SteeredAttention`: the mixin that turns a model's attention block, in place, into a steered one.

Each attention block of a wrapped model becomes an instance of a generated subclass of its own class
(`SteeredLlamaAttention`, ...). The subclass holds one layer's steering as three non-learned buffers (the heads'
vectors `[H, D]`, their weights `[H]`, alpha), the steering operator (`destein_pl.steering.operators`), and an
optional modifier (the probe gate) that gives the operator a per-row, per-position scale of alpha, and optional
per-row alphas (`SteeredCausalLM.row_alphas`) that multiply that scale. Two hooks on the block's output projection
call the operator at its site (the projection's input or output).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor, nn

from destein_pl.steering.operators import Paper, SteeringOperator

Scale = Tensor | bool
"""How much of alpha the current forward gets: `[batch, seq]` in [0, 1], True (all of it) or False (no steering at
all: the operator is not called)."""


class Modifier(Protocol):
    """Scales the steering per row and position for the forward being computed (the probe gate)."""

    def scale(self) -> Scale:
        """The current forward's scale."""


class SteeredAttention(nn.Module):
    """Mixin of the generated attention subclasses; holds the steering of one layer."""

    steer_vectors: Tensor
    steer_head_weights: Tensor
    steer_alpha: Tensor
    steer_operator: SteeringOperator
    steer_modifier: Modifier | None
    steer_rows: Tensor | None
    """Per-row alphas `[batch]` (float32) while `SteeredCausalLM.row_alphas` is active, with `steer_alpha` 1; None:
    every row at `steer_alpha`."""

    def _init_steering(self, num_heads: int, head_dim: int, projection: nn.Module) -> None:
        device = projection.weight.device
        self.register_buffer("steer_vectors", torch.zeros(num_heads, head_dim, device=device))
        self.register_buffer("steer_head_weights", torch.zeros(num_heads, device=device))
        self.register_buffer("steer_alpha", torch.zeros((), device=device))
        self.steer_operator = Paper()
        self.steer_modifier = None
        self.steer_rows = None
        # Bound methods (not closures) so that copy.deepcopy rebinds the hooks to the copied block.
        projection.register_forward_pre_hook(self._steer_projection_input)
        projection.register_forward_hook(self._steer_projection_output)

    def steering_offset(self) -> Tensor:
        """`alpha * w * v`, the vector the paper adds to the projection input, `[num_heads * head_dim]`, float32."""
        weighted = self.steer_alpha.float() * self.steer_head_weights.float()[:, None] * self.steer_vectors.float()
        return weighted.reshape(-1)

    def _steer(self, site: str, module: nn.Module, x: Tensor) -> Tensor | None:
        if self.steer_operator.site != site:
            return None
        scale = True if self.steer_modifier is None else self.steer_modifier.scale()
        if scale is False:
            return None
        if self.steer_rows is not None:
            scale = row_scale(self.steer_rows, x, scale)
        return self.steer_operator(x, self, module, None if scale is True else scale)

    def _steer_projection_input(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        hidden, *rest = args
        steered = self._steer("input", module, hidden)
        return None if steered is None else (steered, *rest)

    def _steer_projection_output(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor | None:
        return self._steer("output", module, output)


def row_scale(rows: Tensor, x: Tensor, scale: Scale) -> Tensor:
    """The scale `[batch, seq]` of a forward whose rows have their own alphas `rows` `[batch]`: each row's alpha,
    times the modifier's scale where there is one (`True`: none)."""
    if rows.shape[0] != x.shape[0]:
        raise ValueError(f"per-row alpha holds {rows.shape[0]} rows but this forward has {x.shape[0]}; give one alpha "
                         f"per row of the batch (after any expansion such as num_return_sequences)")
    column = rows.to(device=x.device, dtype=torch.float32)[:, None].expand(x.shape[0], x.shape[1])
    return column if scale is True else column * scale.to(device=x.device, dtype=torch.float32)


STEER_BUFFERS = ("steer_vectors", "steer_head_weights", "steer_alpha")
STEER_ATTRIBUTES = ("steer_operator", "steer_modifier", "steer_rows")
STEER_HOOKS = (SteeredAttention._steer_projection_input, SteeredAttention._steer_projection_output)

_STEERED_CLASSES: dict[type, type] = {}


def steered_class(cls: type[nn.Module]) -> type[nn.Module]:
    """The generated subclass `Steered<cls>` of an attention class (one per class)."""
    if cls not in _STEERED_CLASSES:
        _STEERED_CLASSES[cls] = type(f"Steered{cls.__name__}", (SteeredAttention, cls), {"__module__": __name__})
    return _STEERED_CLASSES[cls]


def original_class(steered: type) -> type:
    """The attention class that `steered_class` subclassed into `steered`."""
    bases = [base for base in steered.__bases__ if base is not SteeredAttention]
    if len(bases) != 1 or SteeredAttention not in steered.__bases__:
        raise TypeError(f"{steered.__name__} is not a generated steered attention class")
    return bases[0]


def unwrap_block(block: SteeredAttention, projection: nn.Module) -> None:
    """Restore a steered attention block to its original class: remove its hooks, buffers and attributes."""
    for hooks, with_kwargs in ((projection._forward_pre_hooks, projection._forward_pre_hooks_with_kwargs),
                               (projection._forward_hooks, projection._forward_hooks_with_kwargs)):
        for key, hook in list(hooks.items()):
            if getattr(hook, "__func__", None) in STEER_HOOKS and hook.__self__ is block:
                del hooks[key]
                with_kwargs.pop(key, None)
                projection._forward_hooks_always_called.pop(key, None)
    for name in (*STEER_BUFFERS, *STEER_ATTRIBUTES):
        delattr(block, name)
    block.__class__ = original_class(type(block))
