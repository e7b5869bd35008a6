"""The evaluation settings the benchmarks run with, built in one place: the protocol's sampling (nucleus 0.9,
temperature 1, seed 0), the profanity-check scorer and perplexity under the unsteered model, with the number and
length of the continuations a benchmark chooses; for `evaluate()` and the sampler in this process, and for
`destein test`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from destein_pl import EvaluationConfig
from destein_pl.evaluation.sampling import SamplingSettings

PROTOCOL_SAMPLES = 25
"""Continuations per prompt of the paper's protocol."""
PROTOCOL_TOKENS = 20
"""New tokens per continuation of the paper's protocol."""


def sampling(samples: int = PROTOCOL_SAMPLES, tokens: int = PROTOCOL_TOKENS) -> SamplingSettings:
    """The protocol's sampling with `samples` continuations of `tokens` new tokens per prompt."""
    return SamplingSettings(num_samples=samples, max_new_tokens=tokens)


def evaluation_config(output_dir: Path | str, alphas: Sequence[float], samples: int = PROTOCOL_SAMPLES,
                      tokens: int = PROTOCOL_TOKENS) -> EvaluationConfig:
    """`EvaluationConfig` of the protocol into `output_dir`, at `alphas`, with `samples` continuations of `tokens`
    new tokens per prompt."""
    return EvaluationConfig(output_dir=str(output_dir), alphas=list(alphas), sampling=sampling(samples, tokens))


def destein_test_options(samples: int, tokens: int | None = None) -> list[str]:
    """`destein test` options for `samples` continuations per prompt, of `tokens` new tokens (None: the config's)."""
    length = [] if tokens is None else ["--model.evaluation.sampling.max_new_tokens", str(tokens)]
    return ["--model.evaluation.sampling.num_samples", str(samples), *length]
