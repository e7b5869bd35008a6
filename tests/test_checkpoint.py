import copy
import re
from pathlib import Path

import pytest
import torch

from destein_pl import SteeredCausalLM
from destein_pl.steering.checkpoint import CheckpointError, CheckpointMismatchError, read_checkpoint
from destein_pl.lightning.module import DeSteinModule
from tests.conftest import tiny_model


def logits(steered, text="you are a"):
    batch = steered.tokenizer([text, "hello there friend"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return steered(**batch).logits


@pytest.mark.parametrize("name", ["tiny.ckpt", "tiny.safetensors"])
def test_round_trip_gives_identical_logits(calibrated, name):
    module, out = calibrated
    loaded = SteeredCausalLM.from_checkpoint(out / name)
    assert loaded.alpha == module.steered.alpha
    assert torch.equal(logits(loaded), logits(module.steered))
    base = copy.deepcopy(loaded)
    base.alpha = 0.0
    assert not torch.equal(logits(base), logits(loaded))
    assert SteeredCausalLM.from_checkpoint(out / name, alpha=0.25).alpha == 0.25


def test_lightning_load_from_checkpoint(calibrated):
    module, out = calibrated
    restored = DeSteinModule.load_from_checkpoint(out / "tiny.ckpt")
    assert torch.equal(restored.steered.vectors, module.steered.vectors)
    assert torch.equal(restored.steered.head_weights, module.steered.head_weights)


def test_checkpoint_holds_no_base_weights_and_loads_without_unpickling(calibrated):
    _, out = calibrated
    tensors, metadata = read_checkpoint(out / "tiny.ckpt")  # torch.load(weights_only=True) inside
    assert metadata["format"] == "destein-pl/1"
    assert sum(t.numel() for t in tensors.values()) < 1000
    assert (out / "tiny.ckpt").stat().st_size < 100_000


def test_checkpoint_for_another_model_is_an_error(calibrated):
    _, out = calibrated
    for name in ("tiny.ckpt", "tiny.safetensors"):
        tensors, metadata = read_checkpoint(out / name)
        for other in (SteeredCausalLM(tiny_model("gpt2")), SteeredCausalLM(tiny_model("opt"))):
            with pytest.raises(CheckpointMismatchError, match=r"made for another model \(family: checkpoint 'llama'"):
                other.load_steering(tensors, metadata, out / name)


def test_unknown_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="steering checkpoint not found"):
        read_checkpoint(tmp_path / "x.ckpt")
    (tmp_path / "x.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="expected .ckpt or .safetensors"):
        read_checkpoint(tmp_path / "x.pt")
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match="not a destein-pl steering checkpoint"):
        SteeredCausalLM.from_checkpoint(tmp_path / "plain.ckpt")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m-paradetox", "smollm2-135m-self-induced"])
def test_shipped_checkpoints_load_ready_to_generate(name):
    """Both files of each shipped checkpoint load into the embedded model with the same steering."""
    folder = Path(__file__).resolve().parents[1] / "checkpoints"
    from_ckpt = SteeredCausalLM.from_checkpoint(folder / f"{name}.ckpt")
    tensors, metadata = read_checkpoint(folder / f"{name}.safetensors")
    assert metadata["base_model"]["name_or_path"] == "smollm2-135m" and metadata["alpha"] == 1.3
    assert from_ckpt.alpha == pytest.approx(1.3)
    assert torch.equal(from_ckpt.vectors, tensors["vectors"])
    assert torch.equal(from_ckpt.head_weights, tensors["head_weights"])
    steered = logits(from_ckpt)
    from_ckpt.alpha = 0.0
    assert (steered - logits(from_ckpt)).abs().max() > 0.1  # the steering moves the next-token logits


def test_malformed_metadata_json_is_an_error_naming_the_file(calibrated, tmp_path, capsys):
    from safetensors.torch import save_file

    from tests.conftest import refusal

    _, folder = calibrated
    tensors, metadata = read_checkpoint(folder / "tiny.safetensors")
    headed = tmp_path / "headed.safetensors"
    save_file(tensors, str(headed), metadata={"destein": '{"format": "destein-pl/1",'})
    expected = f"{headed} (its header's 'destein' metadata): the steering metadata is not valid JSON"
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        read_checkpoint(headed)
    assert refusal(capsys, "generate", "--ckpt", str(headed)).startswith(expected)
    bare = tmp_path / "bare.safetensors"
    save_file(tensors, str(bare))
    (tmp_path / "bare.json").write_text("{'alpha': 0.5}\n")
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'bare.json'}: the steering metadata is not "
                                                        f"valid JSON (Expecting property name enclosed in double "
                                                        f"quotes at line 1, column 2); expected the JSON object")):
        read_checkpoint(bare)
    assert refusal(capsys, "export", "--ckpt_path", str(bare), "--out", str(tmp_path / "folded")).startswith(
        f"{tmp_path / 'bare.json'}: the steering metadata is not valid JSON")
    assert not (tmp_path / "folded").exists()


def test_metadata_is_written_as_strict_json(calibrated, tmp_path):
    import json

    from destein_pl.steering.checkpoint import save_steering

    _, folder = calibrated
    tensors, metadata = read_checkpoint(folder / "tiny.safetensors")
    path = tmp_path / "nan.safetensors"
    save_steering(path, tensors, {**metadata, "continuation_probes": {"validation_auroc": float("nan")}})

    def refuse(constant):
        raise AssertionError(f"bare {constant} in the JSON")

    written = json.loads(path.with_suffix(".json").read_text(), parse_constant=refuse)
    assert written["continuation_probes"]["validation_auroc"] is None
    assert read_checkpoint(path)[1] == written
