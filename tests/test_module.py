"""Calibration as a Lightning fit: the vectors against a hand computation, and 2 processes against 1."""

import json

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from destein_pl import architecture_for
from destein_pl.calibration.pairs import NONTOXIC_CUE, TOXIC_CUE, PairsConfig, load_pairs
from destein_pl.lightning.datamodule import DeSteinDataModule
from destein_pl.lightning.module import DeSteinModule
from tests.conftest import PAIRS, calibrate


def hand_activations(model, tokenizer, text, last_k=8):
    """[L, H, D]: projection inputs of one unpadded text, mean over its last k tokens, by plain hooks."""
    arch = architecture_for(model.config)
    inputs = []
    hooks = [
        getattr(block, arch.projection).register_forward_pre_hook(lambda m, a: inputs.append(a[0][0, -last_k:].mean(0)))
        for block in arch.attention_blocks(model)
    ]
    with torch.no_grad():
        model(**tokenizer(text, return_tensors="pt"))
    for h in hooks:
        h.remove()
    heads = model.config.num_attention_heads
    return torch.stack([x.view(heads, -1) for x in inputs])


def test_vectors_equal_hand_computation(calibrated, tiny_llama_dir):
    module, _ = calibrated
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    diffs = [
        hand_activations(model, tokenizer, NONTOXIC_CUE + p["nontoxic"])
        - hand_activations(model, tokenizer, TOXIC_CUE + p["toxic"])
        for p in PAIRS
    ]
    expected = torch.stack(diffs).mean(0)
    torch.testing.assert_close(module.steered.vectors, expected, rtol=0, atol=1e-5)
    assert module.steered.alpha == pytest.approx(0.5)
    weights = module.steered.head_weights
    assert ((weights >= 0) & (weights <= 1)).all()
    assert torch.equal(weights, module.calibration.probes.accuracy)


def test_outputs_beside_the_checkpoint_and_metadata(calibrated):
    _, out = calibrated
    assert {p.name for p in out.iterdir()} >= {"tiny.ckpt", "tiny.safetensors", "tiny.json", "tiny-probes.png"}
    meta = json.loads((out / "tiny.json").read_text())
    assert meta["architecture"] == {"family": "llama", "model_type": "llama", "num_layers": 3, "num_heads": 4,
                                    "head_dim": 8, "hidden_size": 32}
    assert meta["pairs"]["source"] == "pairs.jsonl" and meta["pairs"]["m"] == 4
    assert meta["options"]["head_weights"] == "probe" and meta["alpha"] == 0.5
    checkpoint = torch.load(out / "tiny.ckpt", weights_only=True)
    assert all(".steer_" in k or k.startswith("probes.") for k in checkpoint["state_dict"])
    assert (out / "tiny-probes.png").read_bytes()[:4] == b"\x89PNG"


def test_the_gate_probes_are_fit_on_the_pairs_without_cues_and_travel_with_the_checkpoint(calibrated,
                                                                                         tiny_llama_dir):
    from destein_pl import SteeredCausalLM
    from destein_pl.calibration.probes import fit_head_probes

    module, out = calibrated
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    pairs = load_pairs(PairsConfig(str(out / "pairs.jsonl"), m=len(PAIRS), seed=0))  # in the order fit saw them
    toxic, nontoxic = (torch.stack([hand_activations(model, tokenizer, getattr(p, side)) for p in pairs])
                       for side in ("toxic", "nontoxic"))
    expected = fit_head_probes(toxic, nontoxic)
    gate = module.calibration.gate_probes
    torch.testing.assert_close(gate.coef, expected.coef, rtol=0, atol=1e-4)
    torch.testing.assert_close(gate.intercept, expected.intercept, rtol=0, atol=1e-4)
    assert torch.equal(gate.accuracy, expected.accuracy)
    # the head weights still come from the probes on the cued pairs (the paper's)
    assert torch.equal(module.steered.head_weights, module.calibration.probes.accuracy)
    assert not torch.allclose(gate.coef, module.calibration.probes.coef)
    for name in ("tiny.ckpt", "tiny.safetensors"):
        loaded = SteeredCausalLM.from_checkpoint(out / name)
        assert torch.equal(loaded.gate_probes.coef, gate.coef), name
        assert torch.equal(loaded.gate_probes.intercept, gate.intercept), name


def test_uniform_weights_and_top_k_heads(tiny_llama_dir, calibrated, tmp_path):
    _, out = calibrated
    module = calibrate(tiny_llama_dir, out / "pairs.jsonl", tmp_path, head_weights="uniform",
                       top_k_heads=5)
    weights = module.steered.head_weights
    assert int((weights == 1).sum()) == 5 and int((weights == 0).sum()) == weights.numel() - 5


def test_max_epochs_other_than_one_is_an_error(tiny_llama_dir, calibrated):
    _, out = calibrated
    module = DeSteinModule(base_model=str(tiny_llama_dir))
    data = DeSteinDataModule(pairs=PairsConfig(str(out / "pairs.jsonl"), m=4))
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="max_epochs=1"):
        trainer.fit(module, data)
