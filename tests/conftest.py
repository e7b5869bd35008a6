"""Shared fixtures: tiny random-weight models of every supported family, and the real embedded model."""

from __future__ import annotations

import atexit
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
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    MptConfig,
    OPTConfig,
    Qwen2Config,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

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
