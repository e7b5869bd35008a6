"""Exported folders load in stock transformers (a process that never imports destein_pl) with the steered logits;
GGUF exports keep the base file and add only the biases."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig, PreTrainedTokenizerFast

from destein_pl import SteeredCausalLM, load_base_model, load_prompts
from destein_pl.evaluation.prompts import PromptsConfig
from destein_pl.steering.checkpoint import FORMAT, save_steering
from destein_pl.steering.export import ExportError, export
from destein_pl.steering.folding import fold, folded_biases
from tests.conftest import RTP100, TINY_CONFIGS, VOCAB, evaluate_small

EXPORTABLE = ["gpt2", "llama", "mistral", "qwen2", "opt", "gemma3"]
SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "smollm2-135m-paradetox.ckpt"
GEMMA_SHIPPED = SHIPPED.with_name("gemma3-270m-paradetox.ckpt")
NEW_TOKENS = 6

RELOAD = """
import json, sys
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

folders, inputs, new_tokens = json.loads(sys.argv[1]), load_file(sys.argv[2]), int(sys.argv[4])
ids, mask = inputs["ids"], inputs["mask"]
out = {}
for name, folder in folders.items():
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        out[name + ".logits"] = model(input_ids=ids, attention_mask=mask,
                                      position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        out[name + ".tokens"] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                               min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
assert not [m for m in sys.modules if m.split(".")[0] == "destein_pl"], "destein_pl was imported"
save_file(out, sys.argv[3])
"""


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny models' vocabulary (`w0` ... `w96`), quick to build and save."""
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w3"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="w3", pad_token="w0", bos_token="w1",
                                   eos_token="w2")


def tiny_checkpoint(root: Path, family: str, alpha: float = 1.5, config=None) -> tuple[Path, SteeredCausalLM]:
    """A tiny base model folder of `family`, a steering checkpoint for it, and the live steered model."""
    folder = root / f"{family}-base"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config or TINY_CONFIGS[family]()).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    steered = SteeredCausalLM(*load_base_model(folder))
    generator = torch.Generator().manual_seed(1)
    vectors = torch.randn(steered.num_layers, steered.num_heads, steered.head_dim, generator=generator)
    steered.set_steering(vectors, torch.rand(steered.num_layers, steered.num_heads, generator=generator), alpha)
    metadata = {
        "format": FORMAT, "base_model": {"name_or_path": str(folder), "dtype": None},
        "architecture": steered.signature(), "alpha": alpha,
        "options": {"head_weights": "probe", "top_k_heads": None},
        "pairs": {"source": "pairs.jsonl", "sha256": "ab" * 32, "m": 8, "seed": 0},
    }
    path = root / f"{family}.safetensors"
    save_steering(path, steered.steering_tensors(), metadata)
    return path, steered


def left_padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids.masked_fill(mask == 0, 0), mask


def reload_in_fresh_process(folders: dict[str, Path], ids: torch.Tensor, mask: torch.Tensor,
                            work: Path) -> dict[str, torch.Tensor]:
    """Logits and greedy tokens of each folder from plain transformers, in a process without destein_pl."""
    save_file({"ids": ids, "mask": mask}, str(work / "inputs.safetensors"))
    jobs = json.dumps({name: str(folder) for name, folder in folders.items()})
    result = subprocess.run([sys.executable, "-c", RELOAD, jobs, str(work / "inputs.safetensors"),
                             str(work / "reloaded.safetensors"), str(NEW_TOKENS)], cwd=work, capture_output=True,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(str(work / "reloaded.safetensors"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every exportable family exported, with the live steered model's logits and greedy tokens, and what a
    fresh process with stock transformers computes from the folders."""
    root = tmp_path_factory.mktemp("export")
    ids, mask = left_padded_batch()
    folders, expected = {}, {}
    for family in EXPORTABLE:
        ckpt, steered = tiny_checkpoint(root, family)
        folders[family] = export(str(ckpt), str(root / f"{family}-out"))
        with torch.no_grad():
            expected[family + ".logits"] = steered(**steered.architecture.padded_inputs(ids, mask)).logits
            expected[family + ".tokens"] = steered.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                                            max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                                            pad_token_id=0)
    return folders, expected, reload_in_fresh_process(folders, ids, mask, root), mask


@pytest.mark.parametrize("family", EXPORTABLE)
def test_export_reloads_with_stock_transformers_and_reproduces_the_steered_logits(exported, family):
    folders, expected, reloaded, mask = exported
    real = mask.bool()
    difference = reloaded[family + ".logits"][real] - expected[family + ".logits"][real]
    assert difference.abs().max() <= 1e-5
    assert torch.equal(reloaded[family + ".tokens"], expected[family + ".tokens"])
    files = {p.name for p in folders[family].iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "README.md",
            "destein.json"} <= files


def test_export_writes_what_transformers_4_reads_the_same_way(exported):
    """4.x reads the rope base only from a top-level `rope_theta` (else it silently takes 10000) and knows the fast
    tokenizer only as `PreTrainedTokenizerFast` (`python -m benchmarks export_compat` loads a folder in 4.x)."""
    folders = exported[0]
    for family in ("llama", "mistral", "qwen2"):
        config = json.loads((folders[family] / "config.json").read_text())
        assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] and config["rope_scaling"] is None
        tokenizer = json.loads((folders[family] / "tokenizer_config.json").read_text())
        assert tokenizer["tokenizer_class"] != "TokenizersBackend"  # a class name 4.x does not know


def test_the_exported_tokenizer_gives_only_what_the_model_takes_in_transformers_4_too(exported):
    """4.x's `PreTrainedTokenizerFast` returns `token_type_ids` unless the tokenizer config names its outputs, and
    `model.generate(**tokenizer(text, return_tensors="pt"))` then refuses them; the config names the live
    tokenizer's outputs (`python -m benchmarks export_compat` runs the idiom in 4.x)."""
    for family, folder in exported[0].items():
        tokenizer = json.loads((folder / "tokenizer_config.json").read_text())
        assert tokenizer["model_input_names"] == ["input_ids", "attention_mask"], family
        assert set(AutoTokenizer.from_pretrained(folder)("w5 w6 w7")) == {"input_ids", "attention_mask"}, family
    folder = exported[0]["llama"]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    batch = AutoTokenizer.from_pretrained(folder)("w5 w6 w7", return_tensors="pt")
    assert model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=0).shape == (1, 5)


def test_export_writes_the_stock_bias_flag_and_explicit_zero_companion_biases(exported):
    folders = exported[0]
    for family, architecture in (("llama", "LlamaForCausalLM"), ("mistral", "LlamaForCausalLM"),
                                 ("qwen2", "LlamaForCausalLM")):
        config = json.loads((folders[family] / "config.json").read_text())
        assert config["architectures"] == [architecture] and config["attention_bias"] is True
        assert "sliding_window" not in config
        weights = load_file(str(folders[family] / "model.safetensors"))
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert f"model.layers.0.self_attn.{name}.bias" in weights
        if family != "qwen2":  # Qwen2's q/k/v biases are its own
            assert not weights["model.layers.0.self_attn.q_proj.bias"].any()
    gemma = json.loads((folders["gemma3"] / "config.json").read_text())  # its own stock class, window and all
    assert gemma["architectures"] == ["Gemma3ForCausalLM"] and gemma["attention_bias"] is True
    assert gemma["sliding_window"] == 4 and "sliding_attention" in gemma["layer_types"]
    assert json.loads((folders["opt"] / "config.json").read_text())["enable_bias"] is True
    assert json.loads((folders["mistral"] / "destein.json").read_text())["exported_as"] == "llama"


def test_export_card_names_base_pairs_alpha_method_and_results(tmp_path):
    ckpt, steered = tiny_checkpoint(tmp_path, "llama")
    metrics = {"emt": 0.25, "tp": 0.12, "ppl": 33.78, "dist1": 0.6, "dist2": 0.94, "dist3": 0.99}
    runs = [{"alpha": a, "metrics": {"toxic": metrics}, "counts": {"prompts": {"toxic": 50}}} for a in (0.0, 1.5)]
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"base_model": "tiny", "scorer": "profanity-check", "runs": runs,
                                   "steering": {"digest": steered.steering_digest()}}))
    card = (export(str(ckpt), str(tmp_path / "out"), results=str(results)) / "README.md").read_text()
    for text in ("llama-base", "pairs.jsonl", "ab" * 32, "| alpha | 1.5 |", "2404.10464", "DeStein",
                 "| **1.5** | toxic | 50 | 0.250 | 0.120 | 33.780 |", "vllm serve"):
        assert text in card, text


def test_export_takes_results_only_from_an_evaluation_of_this_checkpoint(tmp_path):
    ckpt, steered = tiny_checkpoint(tmp_path, "llama")
    prompts = load_prompts(PromptsConfig(str(RTP100), n=2))
    evaluate_small(steered, prompts, tmp_path / "eval", alphas=[0.0, 1.5])
    out = export(str(ckpt), str(tmp_path / "out"), results=str(tmp_path / "eval" / "results.json"))
    assert "| **1.5** | all | 2 |" in (out / "README.md").read_text()
    # the same base model and alpha, other vectors: not this checkpoint's numbers
    steered.set_steering(steered.vectors * 2, steered.head_weights)
    evaluate_small(steered, prompts, tmp_path / "other", alphas=[1.5])
    other = tmp_path / "other" / "alpha_1.5" / "results.json"
    with pytest.raises(ExportError, match=r"results: .*other.*was made with other steering"):
        export(str(ckpt), str(tmp_path / "out2"), results=str(other))
    assert not (tmp_path / "out2").exists()
    data = json.loads(other.read_text())
    del data["steering"]
    other.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"results: .* records no steering digest"):
        export(str(ckpt), str(tmp_path / "out2"), results=str(other))


def test_export_in_bfloat16_writes_bfloat16_weights_that_reload(tmp_path):
    ckpt, _ = tiny_checkpoint(tmp_path, "llama")
    out = export(str(ckpt), str(tmp_path / "out"), dtype="bfloat16")
    weights = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((out / "destein.json").read_text())["verify_max_abs_diff"] is not None


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_export_at_alpha_zero_is_the_base_model_unchanged(tmp_path, family):
    ckpt, _ = tiny_checkpoint(tmp_path, family, alpha=0.0)
    out = export(str(ckpt), str(tmp_path / "out"))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family and not config.get("attention_bias", False)
    base = load_file(str(tmp_path / f"{family}-base" / "model.safetensors"))
    weights = load_file(str(out / "model.safetensors"))
    assert weights.keys() == base.keys() and all(torch.equal(weights[k], base[k]) for k in base)


def test_export_refuses_mpt_naming_the_family_and_the_missing_bias_slot(tmp_path):
    ckpt, _ = tiny_checkpoint(tmp_path, "mpt")
    with pytest.raises(ExportError, match=r"mpt.*MptAttention creates out_proj with bias=False"):
        export(str(ckpt), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_export_refuses_a_mistral_whose_sliding_window_is_in_effect(tmp_path):
    config = MistralConfig(**{**TINY_CONFIGS["mistral"]().to_dict(), "sliding_window": 16})
    ckpt, _ = tiny_checkpoint(tmp_path, "mistral", config=config)
    with pytest.raises(ExportError, match=r"mistral.*window of 16 tokens in a context of 128"):
        export(str(ckpt), str(tmp_path / "out"))


def test_gguf_export_of_a_gemma3_is_refused_with_llama_cpps_reason(tmp_path):
    from gguf import GGUFReader, GGUFWriter

    from destein_pl.steering.gguf_export import check_gguf_base

    path = tmp_path / "gemma3.gguf"
    writer = GGUFWriter(str(path), "gemma3")  # a GGUF of llama.cpp's gemma3 architecture (no tensors needed)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ExportError, match=r"gemma3_text .*'gemma3'.*src/models/gemma3.cpp.*format='hf' instead"):
        check_gguf_base(GGUFReader(path), path, {"architecture": {"model_type": "gemma3_text"}})


def test_export_arguments_are_checked_with_errors_naming_them(tmp_path):
    ckpt, _ = tiny_checkpoint(tmp_path, "llama")
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match="format must be one of hf, gguf"):
        export(str(ckpt), out, format="onnx")
    with pytest.raises(ValueError, match="dtype must be one of"):
        export(str(ckpt), out, dtype="int8")
    with pytest.raises(ValueError, match="applies to format='hf' only"):
        export(str(ckpt), out, dtype="bfloat16", format="gguf")
    with pytest.raises(FileNotFoundError, match="ckpt_path"):
        export(str(tmp_path / "missing.ckpt"), out)
    with pytest.raises(FileNotFoundError, match="results"):
        export(str(ckpt), out, results=str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text('{"runs": [{"alpha": 1}]}')
    with pytest.raises(ValueError, match="results: .* not a results.json"):
        export(str(ckpt), out, results=str(tmp_path / "bad.json"))
    (tmp_path / "text.json").write_text('{"runs": [{"alpha": 1, "metrics": {"all": {"emt": "0.2", "tp": [1]}}}]}')
    with pytest.raises(ValueError, match="results: .*text.json: alpha 1, subset 'all': metrics must be numbers"):
        export(str(ckpt), out, results=str(tmp_path / "text.json"))
    with pytest.raises(ExportError, match="needs a GGUF base model"):
        export(str(ckpt), out, format="gguf")
    assert not Path(out).exists()


def test_export_refuses_a_non_empty_folder_unless_overwrite(tmp_path):
    ckpt, _ = tiny_checkpoint(tmp_path, "gpt2")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="out: .* not empty; pass overwrite=True"):
        export(str(ckpt), str(out))
    with pytest.raises(FileExistsError, match="out: .* not a destein-pl export .*never other files"):
        export(str(ckpt), str(out), overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    export(str(ckpt), str(out))
    export(str(ckpt), str(out), overwrite=True)  # a previous export is replaced
    assert (out / "model.safetensors").is_file() and (out / "destein.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_overwrite_refuses_a_previous_export_with_anything_beside_it(tmp_path):
    """`destein.json` lists the export's files; a folder holding any other file or folder beside them, or a
    `destein.json` that lists none, is never replaced, and every file in it is kept."""
    ckpt, _ = tiny_checkpoint(tmp_path, "gpt2")
    out = export(str(ckpt), str(tmp_path / "out"))
    listed = json.loads((out / "destein.json").read_text())["files"]
    assert sorted(listed) == sorted(p.name for p in out.iterdir())
    (out / "notes.txt").write_text("mine")
    (out / "eval").mkdir()
    (out / "eval" / "results.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"out: .* holds files that the previous export did not write "
                                              r"\(eval/, notes.txt\); overwrite replaces only a previous export"):
        export(str(ckpt), str(out), overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "eval" / "results.json").is_file()
    (out / "notes.txt").unlink()
    (out / "eval" / "results.json").unlink()
    (out / "eval").rmdir()
    record = json.loads((out / "destein.json").read_text())
    del record["files"]
    (out / "destein.json").write_text(json.dumps(record))
    with pytest.raises(FileExistsError, match=r"out: .*destein.json lists no exported files"):
        export(str(ckpt), str(out), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(listed)


def test_export_never_writes_over_its_input_or_the_working_folder(tmp_path, monkeypatch):
    ckpt, _ = tiny_checkpoint(tmp_path, "gpt2")
    before = sorted(p.name for p in tmp_path.iterdir())
    for out in (tmp_path, tmp_path.parent):
        with pytest.raises(ValueError, match="out: .* holds the checkpoint being exported"):
            export(str(ckpt), str(out), overwrite=True)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(ValueError, match="out: .* is the working folder"):
        export(str(ckpt), ".", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "work"])


def test_export_through_links_and_after_a_killed_export(tmp_path):
    ckpt, _ = tiny_checkpoint(tmp_path, "gpt2")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="out: .*dangling is a link to .*nowhere, which does not exist"):
        export(str(ckpt), str(dangling))
    real = tmp_path / "real"
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    real.mkdir()
    stale = tmp_path / ".real.tmp-999999999-deadbeef"  # what a SIGKILLed export leaves: its process is gone
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    export(str(ckpt), str(link))
    export(str(ckpt), str(link), overwrite=True)
    assert link.is_symlink() and (real / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_exported_files_are_readable_by_other_users(tmp_path):
    ckpt, _ = tiny_checkpoint(tmp_path, "llama")
    out = export(str(ckpt), str(tmp_path / "out"))
    umask = os.umask(0)
    os.umask(umask)
    for path in [out, *out.iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == (0o777 if path.is_dir() else 0o666) & ~umask, path


# -- the real embedded model ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_export(tmp_path_factory):
    """The shipped checkpoint exported as GGUF, with the folded biases it should carry."""
    from destein_pl.steering.loading import BUILTIN_MODELS

    out = export(str(SHIPPED), str(tmp_path_factory.mktemp("gguf") / "out"), format="gguf")
    steered = SteeredCausalLM.from_checkpoint(SHIPPED)
    biases = folded_biases(fold(steered), steered.architecture)
    return BUILTIN_MODELS["smollm2-135m"].gguf_path(), next(out.glob("*.gguf")), biases, out


@pytest.mark.slow
def test_gguf_export_keeps_every_original_tensor_and_adds_exactly_the_folded_biases(gguf_export):
    from gguf import GGMLQuantizationType, GGUFReader

    source, exported, biases, out = gguf_export
    before, after = GGUFReader(source), GGUFReader(exported)
    added = {t.name: t for t in after.tensors}
    for tensor in before.tensors:
        copy = added.pop(tensor.name)
        assert copy.tensor_type == tensor.tensor_type and list(copy.shape) == list(tensor.shape)
        assert np.asarray(copy.data).tobytes() == np.asarray(tensor.data).tobytes(), tensor.name
    assert sorted(added) == sorted(f"blk.{i}.attn_output.bias" for i in range(30))
    for layer, bias in enumerate(biases):
        tensor = added[f"blk.{layer}.attn_output.bias"]
        assert tensor.tensor_type == GGMLQuantizationType.F32 and list(tensor.shape) == [576]
        assert np.array_equal(np.asarray(tensor.data), bias.numpy())
    for field in before.fields.values():
        if not field.name.startswith("GGUF.") and field.name != "general.name":
            assert after.get_field(field.name).contents() == field.contents(), field.name
    name = before.get_field("general.name").contents()
    assert after.get_field("general.name").contents() == f"{name} (DeStein, alpha 1.3)"  # not the base model's name
    assert after.get_field("destein.alpha").contents() == pytest.approx(1.3)
    assert after.get_field("destein.source").contents() == SHIPPED.name
    card = (out / "README.md").read_text()
    assert "llama.cpp" in card and "by the quantization error" in card  # not "equal up to float rounding"


@pytest.mark.slow
def test_transformers_gguf_loading_reads_the_bias_only_with_attention_bias(gguf_export):
    """What the card says: stock transformers ignores the added bias unless asked for `attention_bias=True`."""
    _, exported, biases, _ = gguf_export
    plain = AutoModelForCausalLM.from_pretrained(exported.parent, gguf_file=exported.name, dtype=torch.float32)
    assert plain.model.layers[0].self_attn.o_proj.bias is None
    with_bias = AutoModelForCausalLM.from_pretrained(exported.parent, gguf_file=exported.name, dtype=torch.float32,
                                                     attention_bias=True)
    attention = with_bias.model.layers[3].self_attn
    assert torch.equal(attention.o_proj.bias, biases[3]) and not attention.q_proj.bias.any()


@pytest.mark.slow
def test_export_of_the_shipped_checkpoint_generates_in_stock_transformers(tmp_path):
    out = export(str(SHIPPED), str(tmp_path / "out"))
    steered = SteeredCausalLM.from_checkpoint(SHIPPED)
    batch = steered.tokenizer(["You are such a stupid", "I can't stand those people, they are all"],
                              return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = steered.generate(**batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                    pad_token_id=0)
    reloaded = reload_in_fresh_process({"smollm2": out}, batch["input_ids"], batch["attention_mask"], tmp_path)
    assert torch.equal(reloaded["smollm2.tokens"], expected)
    card = (out / "README.md").read_text()
    assert "smollm2-135m" in card and "paradetox.tsv" in card and "| alpha | 1.3 |" in card
    config = json.loads((out / "config.json").read_text())
    names = {config[key] for key in ("_name_or_path", "_model_name_or_path") if key in config}
    assert names == {"out"}  # the exported model, not the base model


@pytest.mark.slow
def test_the_shipped_gemma_checkpoint_exports_to_a_stock_gemma3_folder_and_refuses_gguf(tmp_path):
    out = export(str(GEMMA_SHIPPED), str(tmp_path / "out"))
    steered = SteeredCausalLM.from_checkpoint(GEMMA_SHIPPED)
    batch = steered.tokenizer(["You are such a stupid", "I can't stand those people, they are all"],
                              return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = steered.generate(**batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                    pad_token_id=steered.tokenizer.pad_token_id)
    reloaded = reload_in_fresh_process({"gemma": out}, batch["input_ids"], batch["attention_mask"], tmp_path)
    assert torch.equal(reloaded["gemma.tokens"], expected)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["attention_bias"] is True
    assert f"| alpha | {steered.alpha:g} |" in (out / "README.md").read_text()
    with pytest.raises(ExportError, match=r"gemma3_text .*'gemma3'.*src/models/gemma3.cpp"):
        export(str(GEMMA_SHIPPED), str(tmp_path / "gguf"), format="gguf")
    assert not (tmp_path / "gguf").exists() or not any((tmp_path / "gguf").iterdir())


@pytest.mark.slow
def test_a_dequantized_gguf_copy_holds_the_weights_the_built_in_model_computes_with(tmp_path):
    """The float32 base that tells llama.cpp's quantization noise from the steering (`benchmarks/llama_cpp.py`)."""
    from gguf import GGMLQuantizationType, GGUFReader

    from destein_pl.steering.gguf_export import write_gguf_copy
    from destein_pl.steering.loading import BUILTIN_MODELS

    source, target = BUILTIN_MODELS["smollm2-135m"].gguf_path(), tmp_path / "f32.gguf"
    write_gguf_copy(GGUFReader(source), target, {}, {}, {}, dequantized=True)
    before, after = GGUFReader(source), GGUFReader(target)
    assert [t.name for t in after.tensors] == [t.name for t in before.tensors]
    assert {t.tensor_type for t in after.tensors} == {GGMLQuantizationType.F32}
    assert [list(t.shape) for t in after.tensors] == [list(t.shape) for t in before.tensors]
    copy = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=target.name, dtype=torch.float32).eval()
    builtin, _ = load_base_model("smollm2-135m")
    ids = torch.randint(0, 49152, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(copy(input_ids=ids).logits, builtin(input_ids=ids).logits)
