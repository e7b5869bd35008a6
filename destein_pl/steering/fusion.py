"""Fusion operators: how a layer's detoxification vectors are combined with its attention activations.

Three variants, selected by `SteeredCausalLM.fusion` (stored in the checkpoint metadata as `options.fusion`):

- `paper` (default): at every position, before the output projection, each head's output becomes
  `h' = h + g * alpha * w * v` (DeStein's head-wise fusion; `g` is the probe gate, 1 when ungated). Ungated it is a
  constant offset of the projection input, hence exactly a bias on the projection (`folding`).
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

The non-linear variants are not a constant bias, so they cannot be folded into one (`folding` refuses them). Where
the gate is 0 (a row the probes call clean, in `hard` mode) every variant returns its input unchanged, bit for bit,
and so does every variant at zero steering (alpha 0 is the base model exactly).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

Fusion = Literal["paper", "published", "norm_preserving"]
FUSIONS: tuple[str, ...] = ("paper", "published", "norm_preserving")
CONSTANT_FUSIONS: tuple[str, ...] = ("paper",)
"""Fusions that add a constant to the projection input (when ungated), i.e. that fold into a bias."""


def check_fusion(fusion: str) -> str:
    """`fusion` if it names a variant, else an error listing them."""
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}; got {fusion!r}")
    return fusion


def _gate_column(gate: Tensor, like: Tensor) -> Tensor:
    """A `[batch, seq]` gate as `[batch, seq, 1]` in `like`'s dtype and device."""
    return gate.to(device=like.device, dtype=like.dtype)[..., None]


def paper(hidden: Tensor, offset: Tensor, gate: Tensor) -> Tensor:
    """`h + g * d`: the paper's fusion with a per-row, per-position gate `[batch, seq]` (ungated steering adds
    `offset` directly, in `SteeredAttention`)."""
    return hidden + _gate_column(gate, hidden) * offset.to(device=hidden.device, dtype=hidden.dtype)


def norm_preserving(hidden: Tensor, offset: Tensor, num_heads: int, gate: Tensor | None = None) -> Tensor:
    """Each head's output shifted by its slice of `offset` (`[heads * head_dim]`, scaled by the gate) and rescaled
    to its unsteered norm, per position; computed in float32, returned in `hidden`'s dtype.

    Heads with a zero offset, rows and positions with a zero gate, and heads whose output or shifted output has zero
    norm keep their input exactly.
    """
    *lead, width = hidden.shape
    heads = hidden.float().reshape(*lead, num_heads, width // num_heads)
    shift = offset.float().to(hidden.device).reshape(num_heads, width // num_heads)
    if gate is None:
        shifted = heads + shift
        keep = torch.zeros(heads.shape[:-1], dtype=torch.bool, device=hidden.device)
    else:
        g = gate.float().to(hidden.device)[..., None, None]
        shifted = heads + g * shift
        keep = (g[..., 0] <= 0).expand(heads.shape[:-1])
    norm, shifted_norm = heads.norm(dim=-1, keepdim=True), shifted.norm(dim=-1, keepdim=True)
    rescaled = shifted * (norm / shifted_norm.clamp_min(torch.finfo(torch.float32).tiny))
    keep = keep | ~shift.any(dim=-1) | (norm[..., 0] == 0) | (shifted_norm[..., 0] == 0)
    out = torch.where(keep[..., None], heads, rescaled).reshape(*lead, width).to(hidden.dtype)
    # where a head is kept, return the input itself (no float32 round trip)
    return torch.where(keep[..., None].expand(heads.shape).reshape(*lead, width), hidden, out)


def projected(projection: nn.Module, vector: Tensor) -> Tensor:
    """`W x` in float32 for an affine output projection (`nn.Linear`, or GPT-2's `Conv1D` that stores `W` as
    `[in, out]`): what the projection's output changes by when `x` is added to its input."""
    weight = projection.weight.detach().float()
    vector = vector.float().to(weight.device)
    if isinstance(projection, Conv1D):
        return vector @ weight
    if isinstance(projection, nn.Linear):
        return weight @ vector
    raise TypeError(f"the published fusion needs an nn.Linear or Conv1D output projection, got "
                    f"{type(projection).__name__}")


def published_direction(projection: nn.Module, vectors: Tensor, head_weights: Tensor) -> Tensor:
    """`d`, float32 `[hidden_size]`: the (toxic - non-toxic) difference after the projection, `-W v`, with its
    `head_dim`-wide slices scaled by `1 + w` (the authors' weighting)."""
    num_heads, head_dim = vectors.shape
    d = projected(projection, -vectors.reshape(-1))
    if d.numel() != num_heads * head_dim:
        raise ValueError(f"the published fusion slices the attention output into heads, which needs hidden_size == "
                         f"num_heads * head_dim; got {d.numel()} != {num_heads} * {head_dim}")
    scale = 1.0 + head_weights.float().to(d.device)
    return (d.reshape(num_heads, head_dim) * scale[:, None]).reshape(-1)


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def published(output: Tensor, direction: Tensor, alpha: Tensor | float, gate: Tensor | None = None) -> Tensor:
    """`normalize(normalize(x) - g * alpha * normalize(d)) * |x|` for the projection output `x` at every position,
    computed in float32 and returned in `output`'s dtype; rows and positions with a zero gate keep `x` exactly."""
    x = output.float()
    strength = torch.as_tensor(alpha, dtype=torch.float32, device=x.device)
    step = strength * _unit(direction.float().to(x.device))
    if gate is not None:
        step = gate.float().to(x.device)[..., None] * step
    norm = x.norm(dim=-1, keepdim=True)
    steered = (_unit(_unit(x) - step) * norm).to(output.dtype)
    if gate is None:
        return steered
    return torch.where(_gate_column(gate, output) > 0, steered, output)
