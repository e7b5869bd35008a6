"""Self-Detoxify (Leong et al. 2023, "Self-Detoxifying Language Models via Toxification Reversal", arXiv
2310.09573): the toxification direction from a negatively and a positively prefixed copy of the context, computed
online at every step and reversed in every attention layer of the unprefixed forward.

Every forward the sampler makes runs three passes: the context behind the negative prefix (the paper's, which is
DeStein's toxic cue) and behind the positive prefix (the non-toxic cue), each with a KV cache of its own and no edit,
then the plain context, edited. Per layer `l` and head `h`, with `o` the head's output before the output projection
at the last position: `d = o(negative) - o(positive)`, and in the plain pass the last position's head output `v`
becomes

    v' = v - alpha * (1 + |d|)^norm_exp * (1 + max(0, cos(v, n)))^sim_exp * d

with `n` the head's output at the negative prefix's last token (the prefix alone: the same for every context), and
`v'` then rescaled, over all heads of the layer together, to the norm `v` had. Only the last position is edited: the
prompt's last token at the first step, then each generated token (earlier prompt positions keep their values). The
generated tokens join both prefixed copies, so the direction follows the continuation. `alpha` is this library's
strength (1: the paper's method; 0: the base model); `norm_exp` 0.4 and `sim_exp` 0.6 are the authors' GPT-2-large
values, from their code, which this follows (the paper's Section 3 could not be read here): its `n` is read from
the first row of the first batch and kept, which is this same per-head constant wherever the prefix is tokenized
alone. A step costs three forward passes (the authors' two, with the prefixed copies in one batch of twice the rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from destein_pl.baselines.method import Method, float_option, register
from destein_pl.calibration.pairs import NONTOXIC_CUE, TOXIC_CUE
from destein_pl.evaluation.sampling import left_padded


@dataclass
class ReversalCache:
    """The plain context's KV cache and the two prefixed copies' (with their attention masks), under the sampler's
    batch operations."""

    cache: Any
    prefixed: list[Any]
    masks: list[Tensor]

    def batch_select_indices(self, indices: Tensor) -> None:
        for cache in (self.cache, *self.prefixed):
            cache.batch_select_indices(indices)
        self.masks = [m[indices] for m in self.masks]

    def batch_repeat_interleave(self, repeats: int) -> None:
        for cache in (self.cache, *self.prefixed):
            cache.batch_repeat_interleave(repeats)
        self.masks = [m.repeat_interleave(repeats, dim=0) for m in self.masks]

    def get_seq_length(self) -> int:
        return self.cache.get_seq_length()


@dataclass
class ReversalOutput:
    logits: Tensor
    cache: ReversalCache | None


class Reversal(nn.Module):
    """What the sampler calls in place of the steered model: the two prefixed passes, then the edited plain one."""

    def __init__(self, steered, method: SelfDetoxify) -> None:
        super().__init__()
        self.steered, self.method = steered, method
        self.record: dict[int, Tensor] | None = None
        self.directions: list[Tensor] | None = None
        self._handles = [projection.register_forward_pre_hook(self._hook(layer))
                         for layer, projection in enumerate(steered.architecture.projections(steered.model))]

    def _hook(self, layer: int):
        def hook(module: nn.Module, args: tuple[Any, ...]):
            hidden = args[0]
            if self.record is not None:
                self.record[layer] = hidden[:, -1].detach().float()
                return None
            if self.directions is None:
                return None
            edited = hidden.clone()
            edited[:, -1] = self.method.reverse(hidden[:, -1], self.directions[layer], layer,
                                                self.steered.alpha).to(hidden.dtype)
            return (edited, *args[1:])
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _last_outputs(self, inputs: dict[str, Tensor], cache: Any) -> tuple[list[Tensor], Any]:
        """Every layer's head outputs at the last position `[B, H * D]` of an unedited pass, and its cache."""
        self.record = {}
        try:
            out = self.steered(**inputs, cache=cache, use_cache=True, logits_to_keep=1)
        finally:
            recorded, self.record = self.record, None
        return [recorded[i] for i in range(len(recorded))], out.cache

    def forward(self, cache: ReversalCache | None = None, **inputs: Any) -> ReversalOutput:
        steered, architecture = self.steered, self.steered.architecture
        if cache is None:  # the prompts: each prefix put before each (unpadded) row, padded to one fixed width
            ids, mask = inputs["input_ids"], inputs["attention_mask"]
            rows = [row[m.bool()].tolist()[self.method.lead :] for row, m in zip(ids, mask)]
            width = ids.shape[1] - self.method.lead + max(len(p) for p in self.method.prefixes)
            prefixed = [left_padded([prefix + row for row in rows], width, steered.tokenizer.pad_token_id,
                                    ids.device) for prefix in self.method.prefixes]
            passes = [(architecture.padded_inputs(i, m), m, None) for i, m in prefixed]
        else:
            token = inputs["input_ids"][:, -1]
            passes = []
            for past, mask in zip(cache.prefixed, cache.masks):
                step, mask = architecture.step_inputs(token, mask)
                passes.append((step, mask, past))
        outputs = [self._last_outputs(step, past) for step, _, past in passes]
        (negative, neg_cache), (positive, pos_cache) = outputs
        self.directions = [n - p for n, p in zip(negative, positive)]
        try:
            out = steered(**inputs, cache=None if cache is None else cache.cache)
        finally:
            self.directions = None
        made = None if out.cache is None else ReversalCache(out.cache, [neg_cache, pos_cache],
                                                            [mask for _, mask, _ in passes])
        return ReversalOutput(out.logits, made)


EXPONENT_MAX = 10.0
"""The largest `norm_exp` or `sim_exp` accepted (the authors' values are 0.4 and 0.6)."""


@register
class SelfDetoxify(Method):
    """Toxification reversal in every attention layer, its direction from a negative and a positive prefix.

    Args:
        negative_prefix: the prefix that induces toxicity (default: the paper's, DeStein's toxic cue).
        positive_prefix: the reference prefix (default: the paper's, DeStein's non-toxic cue).
        norm_exp: exponent of the direction's norm in the step size (authors' GPT-2-large value 0.4), in [0, 10].
        sim_exp: exponent of the similarity term (authors' value 0.6), in [0, 10].
    """

    name = "self_detoxify"

    def __init__(self, negative_prefix: str = TOXIC_CUE, positive_prefix: str = NONTOXIC_CUE, norm_exp: float = 0.4,
                 sim_exp: float = 0.6) -> None:
        if not negative_prefix or not positive_prefix:
            raise ValueError("self_detoxify: both prefixes must be non-empty")
        self.negative_prefix, self.positive_prefix = negative_prefix, positive_prefix
        self.norm_exp = float_option(self.name, "norm_exp", norm_exp, 0, EXPONENT_MAX)
        self.sim_exp = float_option(self.name, "sim_exp", sim_exp, 0, EXPONENT_MAX)
        self.prefixes: list[list[int]] = []
        self.lead = 0
        self.negative_end: list[Tensor] = []
        """Per layer, each head's output at the negative prefix's last token `[H, D]`."""
        self.num_heads = 0
        self._reversal: Reversal | None = None

    @torch.no_grad()
    def attach(self, steered) -> None:
        tokenizer = steered.tokenizer
        self.prefixes = [list(tokenizer(p)["input_ids"]) for p in (self.negative_prefix, self.positive_prefix)]
        self.lead = len(tokenizer("")["input_ids"])
        self.num_heads = steered.num_heads
        ids = torch.tensor([self.prefixes[0]], device=steered.device)
        seen: dict[int, Tensor] = {}
        handles = [projection.register_forward_pre_hook(
            lambda module, args, layer=layer: seen.__setitem__(layer, args[0][0, -1].float()))
            for layer, projection in enumerate(steered.architecture.projections(steered.model))]
        try:
            steered.model(**steered.architecture.padded_inputs(ids, torch.ones_like(ids)), use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        self.negative_end = [seen[i].view(self.num_heads, -1) for i in range(len(seen))]
        self._reversal = Reversal(steered, self)

    def detach(self, steered) -> None:
        if self._reversal is not None:
            self._reversal.remove()
            self._reversal = None

    def sampling_model(self, steered) -> nn.Module:
        if self._reversal is None:
            raise RuntimeError("self_detoxify: attach the method to the model first (SteeredCausalLM.set_method)")
        return self._reversal

    def reverse(self, value: Tensor, direction: Tensor, layer: int, alpha: float) -> Tensor:
        """The reversed head outputs `[B, H * D]` of one layer's last position (float32)."""
        rows = value.shape[0]
        v = value.float().view(rows, self.num_heads, -1)
        d = direction.float().to(v.device).view(rows, self.num_heads, -1)
        n = self.negative_end[layer].to(v.device)
        similarity = torch.nn.functional.cosine_similarity(v, n[None], dim=-1).clamp_min(0)
        step = (1 + d.norm(dim=-1)) ** self.norm_exp * (1 + similarity) ** self.sim_exp
        edited = (v - alpha * step[..., None] * d).reshape(rows, -1)
        norm, new = value.float().norm(dim=-1, keepdim=True), edited.norm(dim=-1, keepdim=True)
        return edited * (norm / new.clamp_min(torch.finfo(torch.float32).tiny))

    def settings(self) -> dict[str, Any]:
        return {"method": self.name, "negative_prefix": self.negative_prefix, "positive_prefix": self.positive_prefix,
                "norm_exp": self.norm_exp, "sim_exp": self.sim_exp}
