import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig

from destein_pl import SteeredCausalLM, UnsupportedArchitectureError, load_base_model
from destein_pl.steering.loading import BUILTIN_MODELS, builtin_model_folder


def test_unknown_name_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown model 'no-such-model'.*built-in name \(smollm2-135m\)"):
        load_base_model("no-such-model")


def test_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load_base_model(tmp_path / "model.gguf")
    with pytest.raises(FileNotFoundError, match="no such model file or folder"):
        load_base_model(str(tmp_path / "nothing" / "here"))


def test_bad_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown dtype 'float8'.*bfloat16"):
        load_base_model("smollm2-135m", dtype="float8")


def test_unsupported_architecture_fails_before_loading_weights(tmp_path):
    config = GPTNeoXConfig(num_hidden_layers=1, num_attention_heads=2, hidden_size=16, intermediate_size=32)
    config.save_pretrained(tmp_path)  # a folder with a config and no weights at all
    with pytest.raises(UnsupportedArchitectureError, match="'gpt_neox' is not supported"):
        load_base_model(tmp_path)


@pytest.mark.slow
def test_embedded_model_loads_and_is_steerable(smollm2):
    model, tokenizer = smollm2
    assert model.config.model_type == "llama" and model.dtype == torch.float32
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    steered = SteeredCausalLM(model, tokenizer)
    try:
        assert (steered.num_layers, steered.num_heads, steered.head_dim) == (30, 9, 64)
        state = steered.state_dict()
        for name in ("steer_vectors", "steer_head_weights", "steer_alpha"):
            assert f"model.model.layers.29.self_attn.{name}" in state
        assert state["model.model.layers.0.self_attn.steer_vectors"].shape == (9, 64)

        batch = tokenizer(["You are such a stupid", "The weather today is"], return_tensors="pt", padding=True)

        def greedy():
            with torch.no_grad():
                return steered.generate(**batch, max_new_tokens=12, do_sample=False)

        base_out = greedy()
        unwrapped = AutoModelForCausalLM.from_pretrained(builtin_model_folder("smollm2-135m")).eval()
        with torch.no_grad():
            reference = unwrapped.generate(**batch, max_new_tokens=12, do_sample=False,
                                           pad_token_id=tokenizer.pad_token_id)
        assert torch.equal(base_out, reference)  # zero steering: the base model's continuation

        g = torch.Generator().manual_seed(0)
        vectors = 8 * torch.randn(30, 9, 64, generator=g)
        steered.set_steering(vectors, torch.ones(30, 9), alpha=1.0)
        assert not torch.equal(greedy(), base_out)
    finally:
        steered.alpha = 0.0  # the session fixture's model is shared


@pytest.mark.slow
def test_two_processes_building_the_cache_at_once(tmp_path):
    """Both processes succeed, the cache is complete, no temporary folder is left, and the next load reuses it."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    code = "from destein_pl.steering.loading import builtin_model_folder; print(builtin_model_folder('smollm2-135m'))"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0].decode().strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outputs[0] == outputs[1]
    models = tmp_path / "destein-pl" / "models"
    folder = models / f"smollm2-135m-{BUILTIN_MODELS['smollm2-135m'].version()}"
    assert list(models.iterdir()) == [folder] and outputs[0] == str(folder)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    weights = (folder / "model.safetensors").stat()
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    again = (folder / "model.safetensors").stat()
    assert (again.st_ino, again.st_mtime_ns) == (weights.st_ino, weights.st_mtime_ns)


def test_the_test_session_caches_the_embedded_model_outside_the_users_cache():
    from destein_pl.files import cache_dir

    assert cache_dir().parent.name.startswith("destein-test-cache-")
    assert Path(tempfile.gettempdir()) in cache_dir().parents
