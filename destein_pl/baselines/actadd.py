"""ActAdd / CAA (Turner et al. 2023; Panickssery et al. 2024): one vector added to the residual stream at one layer.

The vector is the mean over the steering pairs of the (non-toxic - toxic) residual stream after decoder layer
`layer` (each text's activations averaged over its last `last_k` tokens, as DeStein's vectors are), and
`alpha * vector` is added to that layer's output at every position, prompt and continuation alike. This is what
`repeng` and `steering-vectors` do with a residual-stream vector.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from destein_pl.baselines.method import Method, input_digest, register
from destein_pl.baselines.pair_activations import pair_texts, record_texts
from destein_pl.calibration.pairs import PairsConfig
from destein_pl.steering.activations import last_tokens_weights


def residual_means(steered, input_ids: Tensor, attention_mask: Tensor, last_k: int) -> Tensor:
    """Every decoder layer's output averaged over each row's last `last_k` real tokens, float32 `[batch, L, W]`."""
    weights = last_tokens_weights(attention_mask, last_k)
    means: dict[int, Tensor] = {}

    def keep(layer: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            means[layer] = (hidden.detach().float() * weights.to(hidden.device)[..., None]).sum(dim=1)
        return hook

    layers = steered.architecture.layer_modules(steered.model)
    handles = [module.register_forward_hook(keep(i)) for i, module in enumerate(layers)]
    try:
        steered.model(**steered.architecture.padded_inputs(input_ids, attention_mask), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([means[i] for i in range(len(layers))], dim=1)


@register
class ActAdd(Method):
    """`alpha * v` added to decoder layer `layer`'s output at every position.

    Args:
        pairs: steering-pairs source (ParaDetox TSV, JSONL or hub id), as for `destein fit`.
        m: pairs sampled from it.
        seed: seed of that sample.
        cues: prefix the paper's cues to the two sides (as DeStein's calibration does).
        layer: the decoder layer (0-based) whose output is shifted; None: the middle one.
        last_k: each text's activations are averaged over its last k tokens.
    """

    name = "actadd"

    def __init__(self, pairs: str, m: int = 40, seed: int = 0, cues: bool = True, layer: int | None = None,
                 last_k: int = 8) -> None:
        self.pairs = PairsConfig(source=pairs, m=m, seed=seed, cues=cues)
        if last_k < 1:
            raise ValueError(f"actadd: last_k must be at least 1, got {last_k}")
        self.layer, self.last_k = layer, last_k
        self.vectors: Tensor | None = None
        """`[L, W]`: the mean (non-toxic - toxic) residual stream after each layer."""
        self._handle = None

    def attach(self, steered) -> None:
        layers = steered.architecture.layer_modules(steered.model)
        layer = len(layers) // 2 if self.layer is None else self.layer
        if not 0 <= layer < len(layers):
            raise ValueError(f"actadd: layer must be in 0..{len(layers) - 1} for this model, got {self.layer}")
        self.layer = layer
        toxic, nontoxic = pair_texts(self.pairs)

        def record(ids: Tensor, mask: Tensor) -> Tensor:
            return residual_means(steered, ids, mask, self.last_k)

        self.vectors = (record_texts(steered, nontoxic, record) - record_texts(steered, toxic, record)).mean(dim=0)
        vector = self.vectors[layer]

        def shift(module, args, output):
            alpha = steered.alpha
            if alpha == 0:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden + alpha * vector.to(device=hidden.device, dtype=hidden.dtype)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        self._handle = layers[layer].register_forward_hook(shift)

    def detach(self, steered) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def settings(self) -> dict[str, Any]:
        return {"method": self.name, "pairs": self.pairs.source.rsplit("/", 1)[-1],
                "pairs_sha256": input_digest(self.pairs.source), "m": self.pairs.m,
                "seed": self.pairs.seed, "cues": self.pairs.cues, "layer": self.layer, "last_k": self.last_k}
