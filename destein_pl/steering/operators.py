"""Steering operators: how a layer's detoxification vectors shift its attention output, one class per variant.

An operator is chosen by name (`SteeredCausalLM.fusion`, `model.fusion` in YAML, `options.fusion` in a checkpoint's
metadata) from `OPERATORS`. It declares where it acts (`site`: the output projection's input, i.e. the concatenated
per-head outputs, or its output) and whether, ungated, it is a constant offset of the projection input, i.e.
exactly a bias on the projection (`folds`; `destein_pl.steering.folding` asks). Its `__call__` gets the tensor at
its site, the layer's steering (vectors, head weights, alpha) and a per-row, per-position `scale` of alpha
(`[batch, seq]`, from the probe gate; None: ungated). Where `scale` is 0 every operator returns its input unchanged,
bit for bit, and so does every operator at zero steering (alpha 0 is the base model exactly).

Adding a variant is adding a class here with `@register` (and its test in `tests/test_operators.py`).

- `paper` (default): `h' = h + g * alpha * w * v` per head, before the projection (DeStein's head-wise fusion; `g`
  the scale). Ungated it is a constant offset, hence a bias on the projection.
- `norm_preserving`: the same shift, then each head's output, at each position, rescaled to its unsteered norm:
  `h' = (h + s) * |h| / |h + s|` with `s = g * alpha * w * v`. Only the direction of a head's output changes. A head
  whose output or shifted output has zero norm keeps its unsteered output.
- `published`: what the authors' published code does (`../shared/DESIGN.md`): the site is *after* the output
  projection (the attention sublayer output, `hidden_size` wide), and the fusion there is
  `x' = normalize(normalize(x) - g * alpha * normalize(d)) * |x|` at every position (padding included), with `d` the
  (toxic - non-toxic) activation difference at that site, its `head_dim`-wide slices scaled by `1 + w`. Here `d` is
  derived from the calibrated per-head vectors, which are measured before the projection: the projection is
  affine, so the difference after it is `W (a_toxic - a_nontoxic) = -W v` (its bias cancels). The authors weigh the
  slices with probes fit on the slices after the projection; our head weights `w` (probe accuracies measured before
  it, 0 outside `top_k_heads`) are the closest this calibration has. Slicing needs `hidden_size == heads * head_dim`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Literal, Protocol

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D

Site = Literal["input", "output"]


class LayerSteering(Protocol):
    """One layer's steering as an operator reads it (a `SteeredAttention` block)."""

    steer_vectors: Tensor
    """`[num_heads, head_dim]`."""
    steer_head_weights: Tensor
    """`[num_heads]`."""
    steer_alpha: Tensor
    """A scalar."""

    def steering_offset(self) -> Tensor:
        """`alpha * w * v`, float32 `[num_heads * head_dim]`."""


class SteeringOperator(ABC):
    """How one variant combines a layer's steering with the activations at its site."""

    name: ClassVar[str]
    site: ClassVar[Site] = "input"
    """`input`: the output projection's input (per-head outputs); `output`: the projection's output."""
    folds: ClassVar[bool] = False
    """Whether, ungated, it adds a constant to the projection input (then it folds into the projection's bias)."""

    def check(self, config: PretrainedConfig, num_heads: int, head_dim: int) -> None:
        """Refuse, with a message naming the variant, a model layout this operator cannot act on."""

    @abstractmethod
    def __call__(self, x: Tensor, layer: LayerSteering, projection: nn.Module, scale: Tensor | None) -> Tensor:
        """`x` (`[batch, seq, width]` at the site) steered; `scale` `[batch, seq]` multiplies alpha (None: 1)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


OPERATORS: dict[str, type[SteeringOperator]] = {}
"""Every steering operator by name (the value of the `fusion` option)."""


def register(cls: type[SteeringOperator]) -> type[SteeringOperator]:
    """Class decorator: make an operator selectable by its `name`."""
    if cls.name in OPERATORS:
        raise ValueError(f"a steering operator named {cls.name!r} is already registered")
    OPERATORS[cls.name] = cls
    return cls


def operator_for(name: str) -> SteeringOperator:
    """The operator `name` names, or an error listing them."""
    if name not in OPERATORS:
        raise ValueError(f"fusion must be one of {', '.join(OPERATORS)}; got {name!r}")
    return OPERATORS[name]()


def _column(scale: Tensor, like: Tensor) -> Tensor:
    """A `[batch, seq]` scale as `[batch, seq, 1]` in `like`'s dtype and device."""
    return scale.to(device=like.device, dtype=like.dtype)[..., None]


@register
class Paper(SteeringOperator):
    """`h + g * alpha * w * v` before the projection: the paper's head-wise fusion."""

    name = "paper"
    folds = True

    def __call__(self, x: Tensor, layer: LayerSteering, projection: nn.Module, scale: Tensor | None) -> Tensor:
        offset = layer.steering_offset().to(device=x.device, dtype=x.dtype)
        return x + offset if scale is None else x + _column(scale, x) * offset


@register
class Published(SteeringOperator):
    """The authors' published code: a normalized shift of the attention output, after the projection."""

    name = "published"
    site = "output"

    def check(self, config: PretrainedConfig, num_heads: int, head_dim: int) -> None:
        if config.hidden_size != num_heads * head_dim:
            raise ValueError(f"fusion='published' slices the attention output into heads, which needs hidden_size == "
                             f"num_heads * head_dim; this model has {config.hidden_size} != {num_heads} * {head_dim}")

    def __call__(self, x: Tensor, layer: LayerSteering, projection: nn.Module, scale: Tensor | None) -> Tensor:
        if float(layer.steer_alpha) == 0 or not layer.steer_vectors.any():
            return x  # zero steering is the base model exactly
        direction = published_direction(projection, layer.steer_vectors, layer.steer_head_weights)
        return published(x, direction, layer.steer_alpha, scale)


@register
class NormPreserving(SteeringOperator):
    """The paper's shift, then each head's output rescaled to its unsteered norm (per position)."""

    name = "norm_preserving"

    def __call__(self, x: Tensor, layer: LayerSteering, projection: nn.Module, scale: Tensor | None) -> Tensor:
        return norm_preserving(x, layer.steering_offset(), layer.steer_vectors.shape[0], scale)


def norm_preserving(hidden: Tensor, offset: Tensor, num_heads: int, scale: Tensor | None = None) -> Tensor:
    """Each head's output shifted by its slice of `offset` (`[heads * head_dim]`, times `scale`) and rescaled to its
    unsteered norm, per position; computed in float32, returned in `hidden`'s dtype.

    Heads with a zero offset, rows and positions with a zero scale, and heads whose output or shifted output has zero
    norm keep their input exactly.
    """
    *lead, width = hidden.shape
    heads = hidden.float().reshape(*lead, num_heads, width // num_heads)
    shift = offset.float().to(hidden.device).reshape(num_heads, width // num_heads)
    if scale is None:
        shifted = heads + shift
        keep = torch.zeros(heads.shape[:-1], dtype=torch.bool, device=hidden.device)
    else:
        g = scale.float().to(hidden.device)[..., None, None]
        shifted = heads + g * shift
        keep = (g[..., 0] <= 0).expand(heads.shape[:-1])
    norm, shifted_norm = heads.norm(dim=-1, keepdim=True), shifted.norm(dim=-1, keepdim=True)
    rescaled = shifted * (norm / shifted_norm.clamp_min(torch.finfo(torch.float32).tiny))
    keep = keep | ~shift.any(dim=-1) | (norm[..., 0] == 0) | (shifted_norm[..., 0] == 0)
    out = torch.where(keep[..., None], heads, rescaled).reshape(*lead, width).to(hidden.dtype)
    # where a head is kept, return the input itself (no float32 round trip)
    return torch.where(keep[..., None].expand(heads.shape).reshape(*lead, width), hidden, out)


def projected(projection: nn.Module, vector: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """`W x` in `dtype` for an affine output projection (`nn.Linear`, or GPT-2's `Conv1D` that stores `W` as
    `[in, out]`): what the projection's output changes by when `x` is added to its input."""
    weight = projection.weight.detach()
    if weight.device.type == "meta" or not weight.is_floating_point():
        raise TypeError(f"cannot project through a {type(projection).__name__} with {weight.dtype} weights on "
                        f"{weight.device}; load the model with real floating-point weights")
    weight = weight.to(dtype)
    vector = vector.to(device=weight.device, dtype=dtype)
    if isinstance(projection, Conv1D):  # y = x W + b
        return vector @ weight
    if isinstance(projection, nn.Linear):
        return weight @ vector
    raise TypeError(f"expected an nn.Linear or Conv1D output projection, got {type(projection).__name__}")


def published_direction(projection: nn.Module, vectors: Tensor, head_weights: Tensor) -> Tensor:
    """`d`, float32 `[hidden_size]`: the (toxic - non-toxic) difference after the projection, `-W v`, with its
    `head_dim`-wide slices scaled by `1 + w` (the authors' weighting)."""
    num_heads, head_dim = vectors.shape
    d = projected(projection, -vectors.reshape(-1))
    if d.numel() != num_heads * head_dim:
        raise ValueError(f"the published fusion slices the attention output into heads, which needs hidden_size == "
                         f"num_heads * head_dim; got {d.numel()} != {num_heads} * {head_dim}")
    weight = 1.0 + head_weights.float().to(d.device)
    return (d.reshape(num_heads, head_dim) * weight[:, None]).reshape(-1)


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def published(output: Tensor, direction: Tensor, alpha: Tensor | float, scale: Tensor | None = None) -> Tensor:
    """`normalize(normalize(x) - g * alpha * normalize(d)) * |x|` for the projection output `x` at every position,
    computed in float32 and returned in `output`'s dtype; rows and positions with a zero scale keep `x` exactly."""
    x = output.float()
    strength = torch.as_tensor(alpha, dtype=torch.float32, device=x.device)
    step = strength * _unit(direction.float().to(x.device))
    if scale is not None:
        step = scale.float().to(x.device)[..., None] * step
    norm = x.norm(dim=-1, keepdim=True)
    steered = (_unit(_unit(x) - step) * norm).to(output.dtype)
    if scale is None:
        return steered
    return torch.where(_column(scale, output) > 0, steered, output)
