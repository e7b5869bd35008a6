"""`EvaluationConfig`: the settings of an evaluation (defaults: the paper's RealToxicityPrompts protocol), each
checked where it is given."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal

from destein_pl.evaluation.scorers import ToxicityScorer, build_scorer

OnChangedPrompts = Literal["refuse", "regenerate"]


@dataclass
class EvaluationConfig:
    """How a model is evaluated (defaults: the paper's protocol).

    Args:
        output_dir: folder of this evaluation; one `alpha_<a>` folder per alpha. Reusing it resumes.
        alphas: steering strengths to evaluate; None: 0 (the base model) and the loaded steering's alpha.
        num_samples: continuations per prompt (paper: 25), at least 1.
        max_new_tokens: tokens per continuation (paper: 20), at least 1.
        top_p: nucleus sampling mass (paper: 0.9), in (0, 1].
        temperature: sampling temperature (paper: 1), at least 0; 0 is greedy.
        seed: continuations depend only on (seed, prompt id, sample index).
        scorer: toxicity scorer: a short name (`profanity-check`, `hf-classifier`, `perspective`) or
            `class_path`/`init_args` (see `--model.evaluation.scorer.help NAME` for its options).
        perplexity_model: language model that measures perplexity (name, path or hub id); None: the unsteered
            model itself.
        perplexity_model_dtype: its dtype (None: as stored).
        perplexity_batch_size: continuations per perplexity forward pass, at least 1.
        shard_perplexity_model: with several processes, shard the perplexity model over them (FSDP2, one unit per
            decoder layer) instead of loading it whole on each: for a model larger than one device (e.g. a 70B
            judge beside 13B replicas). Ignored in one process.
        max_prompt_tokens: prompts longer than this many tokens are cut from the left (with a warning), at least 1.
        max_batch_tokens: a generation batch holds at most this many tokens (rows x (prompt + new tokens)); a
            prompt's samples always share one batch.
        attn_implementation: attention kernels while generating. `eager` (default) gives a prompt the same
            samples whatever batch it shares; `sdpa`'s CPU kernel splits its work by batch size, so samples can
            then change in rare cases with the batch. None keeps the model's.
        on_changed_prompts: what to do when the output folder holds a prompt id whose text differs from the
            prompt given now: `refuse` (an error listing them) or `regenerate` (make them anew).
        scorer_args: deprecated: the options of a short-name scorer; use `class_path`/`init_args`.
        evaluator: deprecated name of `perplexity_model`.
        evaluator_dtype: deprecated name of `perplexity_model_dtype`.
    """

    output_dir: str = "runs/eval"
    alphas: list[float] | None = None
    num_samples: int = 25
    max_new_tokens: int = 20
    top_p: float = 0.9
    temperature: float = 1.0
    seed: int = 0
    scorer: ToxicityScorer | str = "profanity-check"
    perplexity_model: str | None = None
    perplexity_model_dtype: str | None = None
    perplexity_batch_size: int = 64
    shard_perplexity_model: bool = False
    max_prompt_tokens: int = 512
    max_batch_tokens: int = 65536
    attn_implementation: str | None = "eager"
    on_changed_prompts: OnChangedPrompts = "refuse"
    scorer_args: dict[str, Any] | None = None
    evaluator: str | None = None
    evaluator_dtype: str | None = None

    def __post_init__(self) -> None:
        for old, new in (("evaluator", "perplexity_model"), ("evaluator_dtype", "perplexity_model_dtype")):
            if getattr(self, old) is not None:
                warnings.warn(f"evaluation.{old} is deprecated; use evaluation.{new}", DeprecationWarning, 2)
                setattr(self, new, getattr(self, old))
                setattr(self, old, None)
        if self.scorer_args:
            warnings.warn("evaluation.scorer_args is deprecated; give the scorer as class_path/init_args",
                          DeprecationWarning, 2)
        _at_least("num_samples", self.num_samples, 1)
        _at_least("max_new_tokens", self.max_new_tokens, 1)
        _at_least("perplexity_batch_size", self.perplexity_batch_size, 1)
        _at_least("max_prompt_tokens", self.max_prompt_tokens, 1)
        _at_least("max_batch_tokens", self.max_batch_tokens, 1)
        if not (0 < self.top_p <= 1):
            raise ValueError(f"evaluation.top_p must be in (0, 1] (the nucleus mass), got {self.top_p}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"evaluation.temperature must be a finite number >= 0 (0 is greedy), got "
                             f"{self.temperature}")
        for alpha in self.alphas or []:
            if not math.isfinite(alpha):
                raise ValueError(f"evaluation.alphas must be finite numbers, got {self.alphas}")
        if self.on_changed_prompts not in ("refuse", "regenerate"):
            raise ValueError(f"evaluation.on_changed_prompts must be 'refuse' or 'regenerate', got "
                             f"{self.on_changed_prompts!r}")

    def build_scorer(self) -> ToxicityScorer:
        """The scorer these settings name."""
        return build_scorer(self.scorer, **(self.scorer_args or {}))

    def fingerprint(self, alpha: float, steering: str | None, scorer: dict[str, Any]) -> dict[str, Any]:
        """What the generations of one alpha depend on; a resumed run must match it."""
        return {
            "alpha": alpha, "num_samples": self.num_samples, "max_new_tokens": self.max_new_tokens,
            "top_p": self.top_p, "temperature": self.temperature, "seed": self.seed,
            "max_prompt_tokens": self.max_prompt_tokens, "scorer": scorer,
            "perplexity_model": self.perplexity_model, "perplexity_model_dtype": self.perplexity_model_dtype,
            "steering": steering,
        }


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ValueError(f"evaluation.{name} must be at least {low}, got {value}")
