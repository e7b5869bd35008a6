"""Shared fixtures and helpers: tiny random-weight models of every supported family, the real embedded model, a
calibrated tiny model, and the plain-Python evaluation runs."""

from __future__ import annotations

import atexit
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: a hub id must fail fast, not hang
# The embedded model is dequantized into a cache of this test session, never into the user's own cache.
_CACHE = tempfile.mkdtemp(prefix="destein-test-cache-")
os.environ["XDG_CACHE_HOME"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, True)

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    MptConfig,
    OPTConfig,
    Qwen2Config,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
RTP100 = SHARED_DATA / "rtp" / "rtp_test_100.jsonl"

VOCAB = 97
_COMMON = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_LLAMA_LIKE = dict(
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, hidden_size=32, intermediate_size=64,
    max_position_embeddings=128, **_COMMON,
)
TINY_CONFIGS = {
    "gpt2": lambda: GPT2Config(n_layer=3, n_head=4, n_embd=32, n_positions=128, **_COMMON),
    "llama": lambda: LlamaConfig(**_LLAMA_LIKE),
    "mistral": lambda: MistralConfig(**_LLAMA_LIKE),
    "qwen2": lambda: Qwen2Config(**_LLAMA_LIKE),
    "opt": lambda: OPTConfig(
        num_hidden_layers=3, num_attention_heads=4, hidden_size=32, ffn_dim=64, word_embed_proj_dim=32,
        max_position_embeddings=128, **_COMMON,
    ),
    "mpt": lambda: MptConfig(n_layers=3, n_heads=4, d_model=32, expansion_ratio=2, max_seq_len=128, **_COMMON),
    # Gemma 3's layout: one key/value head, heads wider than hidden_size / heads, q/k norms, a post-attention norm,
    # and sliding-window layers (a window shorter than the tests' sequences) before a global one.
    "gemma3": lambda: Gemma3TextConfig(
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=16, hidden_size=32,
        intermediate_size=64, max_position_embeddings=128, query_pre_attn_scalar=16, sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"], **_COMMON,
    ),
}
FAMILIES = list(TINY_CONFIGS)
SDPA_FAMILIES = [f for f in FAMILIES if f != "mpt"]  # transformers' MPT has only eager attention


def tiny_model(family: str, attn_implementation: str = "eager", seed: int = 0) -> torch.nn.Module:
    """A tiny random-weight causal LM of `family`, in eval mode, deterministic for a seed."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[family](), attn_implementation=attn_implementation)
    return model.eval()


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (model, tokenizer), loaded once per test session."""
    from destein_pl import load_base_model

    return load_base_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3():
    """The real Gemma 3 270M base model (model, tokenizer), loaded once per test session."""
    from destein_pl import load_base_model

    return load_base_model("gemma3-270m")


def save_tiny_model_dir(family: str, path: Path) -> Path:
    """A tiny random model of `family` saved as a model folder with the embedded model's real tokenizer, so the
    whole text pipeline (tokenize, pad, calibrate, generate) runs in seconds."""
    from transformers import AutoTokenizer

    from destein_pl.steering.loading import builtin_model_folder

    tokenizer = AutoTokenizer.from_pretrained(builtin_model_folder("smollm2-135m"))
    config = TINY_CONFIGS[family]()
    config.vocab_size = len(tokenizer)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = 2, 1, 2
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny_model_dir("llama", tmp_path_factory.mktemp("tiny-llama"))


def refusal(capsys, *args: str) -> str:
    """The message of the one line `destein ARGS` ends with on a user error (exit code 2, no traceback)."""
    from destein_pl.lightning.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    prefix = f"destein {args[0]}: error: "
    assert last.startswith(prefix), err
    return last[len(prefix) :]


# ---- token batches and hand computations -----------------------------------------------------------------------


def random_ids(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def left_pad(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    return ids, mask


def plain_projections(model: torch.nn.Module, family: str) -> list[torch.nn.Module]:
    """Each layer's attention output projection, found by hand (not through the registry under test)."""
    paths = {"gpt2": ("transformer.h", "attn.c_proj"), "llama": ("model.layers", "self_attn.o_proj"),
             "mistral": ("model.layers", "self_attn.o_proj"), "qwen2": ("model.layers", "self_attn.o_proj"),
             "opt": ("model.decoder.layers", "self_attn.out_proj"), "mpt": ("transformer.blocks", "attn.out_proj"),
             "gemma3": ("model.layers", "self_attn.o_proj")}
    layers, projection = paths[family]
    return [layer.get_submodule(projection) for layer in model.get_submodule(layers)]


def reference_perplexity(model, prompt, continuation):
    """transformers' own loss on the whole unpadded sequence, with the prompt masked out of the labels."""
    ids = torch.tensor([prompt + continuation])
    labels = ids.clone()
    labels[0, : len(prompt)] = -100
    with torch.no_grad():
        return math.exp(model(input_ids=ids, labels=labels).loss.item())


# ---- a tiny model calibrated as a Lightning fit ----------------------------------------------------------------

PAIRS = [
    {"toxic": "you are a stupid idiot", "nontoxic": "you are mistaken"},
    {"toxic": "shut up, moron", "nontoxic": "please be quiet"},
    {"toxic": "this is crap", "nontoxic": "this is not good"},
    {"toxic": "what a dumb f***ing idea, honestly", "nontoxic": "what a questionable idea"},
]


def calibrate(model_dir, pairs_path, out_dir, **module_args):
    import lightning as L

    from destein_pl.calibration.pairs import PairsConfig
    from destein_pl.lightning.callbacks import SteeringCheckpoint
    from destein_pl.lightning.datamodule import DeSteinDataModule
    from destein_pl.lightning.module import DeSteinModule

    module = DeSteinModule(base_model=str(model_dir), **module_args)
    data = DeSteinDataModule(pairs=PairsConfig(str(pairs_path), m=len(PAIRS), seed=0, batch_size=3))
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[SteeringCheckpoint(str(out_dir), "tiny")],
    )
    trainer.fit(module, data)
    return module


@pytest.fixture(scope="session")
def calibrated(tiny_llama_dir, tmp_path_factory):
    """(module, folder): the tiny LLaMA calibrated on `PAIRS` at alpha 0.5, its outputs `tiny.*` in the folder.
    Read-only for every test, so made once per session."""
    tmp = tmp_path_factory.mktemp("calibrated")
    pairs_path = tmp / "pairs.jsonl"
    pairs_path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    module = calibrate(tiny_llama_dir, pairs_path, tmp, alpha=0.5)
    return module, tmp


GATE_OPTIONS = ["--options.sampling.num_samples", "3", "--options.sampling.max_new_tokens", "6",
                "--options.toxic_at", "0.1", "--n", "40"]
"""Few short continuations of 40 prompts; a low `toxic_at`, so that the tiny random model's gibberish gives both
labels under the real scorer."""


@pytest.fixture(scope="session")
def continuation_gated(calibrated, tmp_path_factory):
    """`destein gate` on the calibrated tiny model: (its folder, the output checkpoint, the labelling run's folder).
    Read-only for every test."""
    from destein_pl.lightning.cli import main

    _, folder = calibrated
    tmp = tmp_path_factory.mktemp("gate")
    main(["gate", "--ckpt_path", str(folder / "tiny.ckpt"), "--out", str(tmp / "gated.ckpt"), str(RTP100),
          "--output_dir", str(tmp / "run"), *GATE_OPTIONS])
    return folder, tmp / "gated.ckpt", tmp / "run"


# ---- evaluation runs: `destein test` as a Lightning test, and plain-Python `evaluate` --------------------------

def small_sampling(**changes):
    """Few, short samples: what the evaluation tests draw, with `changes` (e.g. `seed=7`)."""
    from destein_pl.evaluation.sampling import SamplingSettings

    return SamplingSettings(**{"num_samples": 3, "max_new_tokens": 6, **changes})


def run_test(model_dir, out, *, batch_size=4, n=6, alphas=(0.0, 1.0), ckpt=None, scorer=None, callbacks=(),
             steering=None, **evaluation):
    import lightning as L

    from destein_pl.evaluation.config import EvaluationConfig
    from destein_pl.evaluation.prompts import PromptsConfig
    from destein_pl.lightning.datamodule import DeSteinDataModule
    from destein_pl.lightning.module import DeSteinModule

    if scorer is not None:
        evaluation["scorer"] = scorer
    module = DeSteinModule(base_model=str(model_dir), evaluation=EvaluationConfig(
        output_dir=str(out), alphas=list(alphas), **{"sampling": small_sampling(), **evaluation}))
    if steering is not None:
        module.configure_model()
        module.steered.set_steering(*steering)
    data = DeSteinDataModule(prompts=PromptsConfig(str(RTP100), n=n, seed=0, batch_size=batch_size))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=list(callbacks))
    trainer.test(module, data, ckpt_path=ckpt, verbose=False)
    return json.loads((out / "results.json").read_text())


def generations(out, alpha):
    return (out / f"alpha_{alpha:g}" / "generations.jsonl").read_text()


PERPLEXITY_RTOL = 1e-5
"""How closely perplexities of one evaluation agree across process counts: texts, scores and every other metric
agree exactly, perplexities (float32 sums over tokens) to this relative tolerance (docs/multi-gpu.md)."""


def assert_same_generations(actual: str, expected: str) -> None:
    """Two `generations.jsonl` texts hold the same records, perplexities within `PERPLEXITY_RTOL`."""
    import json

    rows = [[json.loads(line) for line in text.splitlines()] for text in (actual, expected)]
    assert len(rows[0]) == len(rows[1])
    for got, want in zip(*rows):
        assert {k: v for k, v in got.items() if k != "perplexity"} == \
            {k: v for k, v in want.items() if k != "perplexity"}
        assert got["perplexity"] == pytest.approx(want["perplexity"], rel=PERPLEXITY_RTOL)


def assert_same_metrics(actual: dict, expected: dict) -> None:
    """`metrics()` of two runs: equal, perplexities within `PERPLEXITY_RTOL`."""
    assert actual.keys() == expected.keys()
    for alpha in expected:
        for subset, values in expected[alpha].items():
            for name, value in values.items():
                got = actual[alpha][subset][name]
                assert got == (pytest.approx(value, rel=PERPLEXITY_RTOL) if name == "ppl" and value else value), \
                    (alpha, subset, name)


def metrics(results):
    return {r["alpha"]: r["metrics"] for r in results["runs"]}


@pytest.fixture(scope="module")
def tiny_steered(tiny_llama_dir):
    """The tiny LLaMA with the real tokenizer, wrapped (zero steering), for plain-Python evaluation runs."""
    from destein_pl import SteeredCausalLM, load_base_model

    return SteeredCausalLM(*load_base_model(tiny_llama_dir))


def evaluate_small(steered, prompts, out, verbose=False, **config):
    """`evaluate` at alpha 0 with few, short samples into `out`; returns the results."""
    from destein_pl import evaluate
    from destein_pl.evaluation.config import EvaluationConfig

    options = {"sampling": small_sampling(), "alphas": [0.0], **config}
    return evaluate(steered, prompts, EvaluationConfig(output_dir=str(out), **options), progress=False,
                    verbose=verbose)
