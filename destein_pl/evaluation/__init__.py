"""Evaluation with the RealToxicityPrompts protocol: prompts, the sampler, scorers, perplexity, metrics, per-alpha
runs, reports, and the `Evaluator` that ties them together."""

from destein_pl.evaluation.config import EvaluationConfig
from destein_pl.evaluation.evaluator import Evaluator, evaluate
from destein_pl.evaluation.prompts import Prompt, PromptsConfig, load_prompts, read_prompts
from destein_pl.evaluation.sampling import PromptSampler, SamplingSettings
from destein_pl.evaluation.scorers import SCORERS, ToxicityScorer, build_scorer

__all__ = [
    "SCORERS",
    "EvaluationConfig",
    "Evaluator",
    "Prompt",
    "PromptSampler",
    "PromptsConfig",
    "SamplingSettings",
    "ToxicityScorer",
    "build_scorer",
    "evaluate",
    "load_prompts",
    "read_prompts",
]
