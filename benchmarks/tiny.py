"""A tiny random-weight Llama with the embedded model's tokenizer, saved as a model folder, and a steering
checkpoint calibrated for it: what a quick run (`--quick`) steers, calibrates and evaluates where the code path
matters and the real model's quality does not, so that the whole text pipeline runs in seconds."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from benchmarks.results import DATA
from destein_pl.steering.loading import builtin_model_folder

TOKENIZER_OF = "smollm2-135m"
PAIRS = DATA / "paradetox" / "paradetox.tsv"


def tiny_model(folder: Path) -> Path:
    """The tiny model's folder (3 layers x 4 heads x 8), made on first use (written beside it and renamed into
    place, never left half-written); the same weights every time."""
    if (folder / "config.json").is_file():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(builtin_model_folder(TOKENIZER_OF))
    config = LlamaConfig(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                         intermediate_size=64, max_position_embeddings=512, vocab_size=len(tokenizer),
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def tiny_checkpoint(model: Path, path: Path) -> Path:
    """A steering checkpoint (`.safetensors`) for the tiny model, calibrated on 8 ParaDetox pairs at alpha 1.3 as
    `destein fit` calibrates; made on first use (the checkpoint writer replaces files whole)."""
    if path.is_file():
        return path
    from destein_pl import CalibrationOptions, PairsConfig, SteeredCausalLM, calibrate, load_base_model, load_pairs

    steered = SteeredCausalLM(*load_base_model(model))
    calibration = calibrate(steered, load_pairs(PairsConfig(str(PAIRS), m=8, seed=0)), CalibrationOptions(alpha=1.3),
                            progress=False)
    return calibration.save(path, steered, heatmap=False)
