"""DExperts (Liu et al. 2021): decoding-time experts. At every step the next-token logits are
`base + alpha * (expert - antiexpert)`, from the base model and two models of its family fine-tuned on non-toxic
(expert) and toxic (anti-expert) text; sampling then draws from those logits as from the model's own.

Each of the three models runs every step with a KV cache of its own, so a step costs three forward passes, and the
two experts' weights are extra memory. The experts are given as model paths (a folder, `.gguf` file, built-in name
or hub id, as for `model.base_model`) and must share the base model's family and tokenizer;
`python -m benchmarks dexperts_train` makes a LoRA pair from the base model on ParaDetox's two sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from destein_pl.baselines.method import Method, input_digest, register


@dataclass
class EnsembleCache:
    """The three models' KV caches, with the batch operations the sampler applies to a cache."""

    caches: list[Any]

    def batch_select_indices(self, indices: Tensor) -> None:
        for cache in self.caches:
            cache.batch_select_indices(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for cache in self.caches:
            cache.batch_repeat_interleave(repeats)

    def get_seq_length(self) -> int:
        return self.caches[0].get_seq_length()


@dataclass
class EnsembleOutput:
    logits: Tensor
    cache: EnsembleCache | None


class ExpertEnsemble(nn.Module):
    """What the sampler calls in place of the steered model: the three forwards, and the logits combined in float32
    at the steered model's alpha."""

    def __init__(self, steered, expert: nn.Module, antiexpert: nn.Module) -> None:
        super().__init__()
        self.steered, self.expert, self.antiexpert = steered, expert, antiexpert

    def forward(self, cache: EnsembleCache | None = None, **inputs: Any) -> EnsembleOutput:
        models = (self.steered, self.expert, self.antiexpert)
        caches = cache.caches if cache is not None else [None] * len(models)
        outputs = [model(**inputs, cache=c) for model, c in zip(models, caches)]
        base, expert, anti = (o.logits.float() for o in outputs)
        logits = base + self.steered.alpha * (expert - anti)
        made = [o.cache for o in outputs]
        return EnsembleOutput(logits, EnsembleCache(made) if made[0] is not None else None)


@register
class DExperts(Method):
    """`logits + alpha * (expert - antiexpert)` at every step.

    Args:
        expert: the non-toxic expert (model folder, `.gguf`, built-in name or hub id).
        antiexpert: the toxic anti-expert.
        dtype: their dtype (None: as stored).
    """

    name = "dexperts"

    def __init__(self, expert: str, antiexpert: str, dtype: str | None = None) -> None:
        if not expert or not antiexpert:
            raise ValueError("dexperts: give both the expert and the antiexpert (model paths)")
        self.expert_path, self.antiexpert_path, self.dtype = expert, antiexpert, dtype
        self.models: tuple[nn.Module, nn.Module] | None = None
        self._digests: dict[str, str | None] | None = None

    def attach(self, steered) -> None:
        from destein_pl.steering.loading import device_map_for, load_base_model

        models = []
        for role, path in (("expert", self.expert_path), ("antiexpert", self.antiexpert_path)):
            model, tokenizer = load_base_model(path, dtype=self.dtype, device_map=device_map_for(steered.device))
            if model.config.model_type != steered.config.model_type:
                raise ValueError(f"dexperts: the {role} {path} is a {model.config.model_type} model; the base model "
                                 f"is {steered.config.model_type} (the experts share its family)")
            if tokenizer.get_vocab() != steered.tokenizer.get_vocab():
                raise ValueError(f"dexperts: the {role} {path} has another tokenizer than the base model")
            models.append(model.eval().requires_grad_(False))
        self.models = (models[0], models[1])

    def detach(self, steered) -> None:
        self.models = None

    def sampling_model(self, steered) -> nn.Module:
        if self.models is None:
            raise RuntimeError("dexperts: attach the method to the model first (SteeredCausalLM.set_method)")
        return ExpertEnsemble(steered, *self.models)

    def settings(self) -> dict[str, Any]:
        if self._digests is None:
            self._digests = {"expert_sha256": input_digest(self.expert_path),
                             "antiexpert_sha256": input_digest(self.antiexpert_path)}
        return {"method": self.name, "expert": str(self.expert_path), "antiexpert": str(self.antiexpert_path),
                **self._digests, "dtype": self.dtype}
