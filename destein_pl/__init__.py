"""DeStein: detoxify causal language models by steering their attention heads at inference time.

The plain-Python API: load a model, wrap it, calibrate it on steering pairs, generate, evaluate.

    model, tokenizer = load_base_model("smollm2-135m")
    steered = SteeredCausalLM(model, tokenizer)
    calibration = calibrate(steered, load_pairs(PairsConfig("paradetox.tsv")), CalibrationOptions(alpha=1.3))
    results = evaluate(steered, load_prompts(PromptsConfig("prompts.jsonl", n=20)))
"""

from destein_pl.calibration import (
    Calibration,
    CalibrationOptions,
    ContinuationProbeOptions,
    PairsConfig,
    SteeringPair,
    calibrate,
    fit_continuation_probes,
    load_pairs,
)
from destein_pl.evaluation import (
    EvaluationConfig,
    Evaluator,
    Prompt,
    PromptsConfig,
    SamplingSettings,
    evaluate,
    load_prompts,
)
from destein_pl.steering import (
    ARCHITECTURES,
    BUILTIN_MODELS,
    Architecture,
    GateSettings,
    SteeredCausalLM,
    UnsupportedArchitectureError,
    architecture_for,
    load_base_model,
)

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "BUILTIN_MODELS",
    "Calibration",
    "CalibrationOptions",
    "ContinuationProbeOptions",
    "EvaluationConfig",
    "Evaluator",
    "GateSettings",
    "PairsConfig",
    "Prompt",
    "PromptsConfig",
    "SamplingSettings",
    "SteeredCausalLM",
    "SteeringPair",
    "UnsupportedArchitectureError",
    "architecture_for",
    "calibrate",
    "evaluate",
    "fit_continuation_probes",
    "load_base_model",
    "load_pairs",
    "load_prompts",
]
