"""`EvaluationConfig`: the settings of an evaluation (defaults: the paper's RealToxicityPrompts protocol), each
checked where it is given."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from destein_pl.evaluation.sampling import SamplingSettings
from destein_pl.evaluation.scorers import ToxicityScorer, build_scorer

OnChangedPrompts = Literal["refuse", "regenerate"]


@dataclass
class EvaluationConfig:
    """How a model is evaluated (defaults: the paper's protocol).

    Args:
        output_dir: folder of this evaluation; one `alpha_<a>` folder per alpha. Reusing it resumes.
        alphas: steering strengths to evaluate; None: 0 (the base model) and the loaded steering's alpha.
        sampling: how continuations are drawn (`num_samples`, `max_new_tokens`, `top_p`, `temperature`, `seed`,
            `max_prompt_tokens`; defaults: the paper's 25 x 20 tokens at top_p 0.9, temperature 1).
        scorer: toxicity scorer: a short name (`profanity-check`, `hf-classifier`, `perspective`,
            `jigsaw-bilstm`) or `class_path`/`init_args` (see `--model.evaluation.scorer.help NAME` for its options).
        perplexity_model: language model that measures perplexity (name, path or hub id); None: the unsteered
            model itself.
        perplexity_model_dtype: its dtype (None: as stored).
        perplexity_batch_size: continuations per perplexity forward pass, at least 1.
        shard_perplexity_model: with several processes, shard the perplexity model over them (FSDP2, one unit per
            decoder layer) instead of loading it whole on each: for a model larger than one device (e.g. a 70B
            judge beside 13B replicas). Ignored in one process.
        max_batch_tokens: a generation batch holds at most this many tokens (rows x (prompt + new tokens)); a
            prompt's samples always share one batch.
        attn_implementation: attention kernels while generating. `eager` (default) gives a prompt the same
            samples whatever batch it shares; `sdpa`'s CPU kernel splits its work by batch size, so samples can
            then change in rare cases with the batch. None keeps the model's.
        on_changed_prompts: what to do when the output folder holds a prompt id whose text differs from the
            prompt given now: `refuse` (an error listing them) or `regenerate` (make them anew).
    """

    output_dir: str = "runs/eval"
    alphas: list[float] | None = None
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    scorer: ToxicityScorer | str = "profanity-check"
    perplexity_model: str | None = None
    perplexity_model_dtype: str | None = None
    perplexity_batch_size: int = 64
    shard_perplexity_model: bool = False
    max_batch_tokens: int = 65536
    attn_implementation: str | None = "eager"
    on_changed_prompts: OnChangedPrompts = "refuse"

    def __post_init__(self) -> None:
        _at_least("perplexity_batch_size", self.perplexity_batch_size, 1)
        _at_least("max_batch_tokens", self.max_batch_tokens, 1)
        for alpha in self.alphas or []:
            if not math.isfinite(alpha):
                raise ValueError(f"evaluation.alphas must be finite numbers, got {self.alphas}")
        if self.on_changed_prompts not in ("refuse", "regenerate"):
            raise ValueError(f"evaluation.on_changed_prompts must be 'refuse' or 'regenerate', got "
                             f"{self.on_changed_prompts!r}")

    def build_scorer(self) -> ToxicityScorer:
        """The scorer these settings name."""
        return build_scorer(self.scorer)

    def fingerprint(self, alpha: float, steering: str | None, scorer: dict[str, Any]) -> dict[str, Any]:
        """What the generations of one alpha depend on; a resumed run must match it. The sampling settings are
        recorded flat, as evaluation folders have always recorded them, so that those still resume."""
        sampling = self.sampling
        return {
            "alpha": alpha, "num_samples": sampling.num_samples, "max_new_tokens": sampling.max_new_tokens,
            "top_p": sampling.top_p, "temperature": sampling.temperature, "seed": sampling.seed,
            "max_prompt_tokens": sampling.max_prompt_tokens, "scorer": scorer,
            "perplexity_model": self.perplexity_model, "perplexity_model_dtype": self.perplexity_model_dtype,
            "steering": steering,
        }


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ValueError(f"evaluation.{name} must be at least {low}, got {value}")
