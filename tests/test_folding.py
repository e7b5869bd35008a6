"""Folding the steering into the output projection's bias: the same logits as live steering, for every family."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

from destein_pl import SteeredCausalLM
from destein_pl.steering.architectures import ARCHITECTURES, architecture_for
from destein_pl.steering.folding import fold
from destein_pl.steering.model import SteeredAttention
from tests.conftest import FAMILIES, TINY_CONFIGS, VOCAB, tiny_model

ALPHA = 1.5


def steered_tiny(family: str, alpha: float = ALPHA, seed: int = 1) -> SteeredCausalLM:
    """A tiny model of `family` with random (non-zero) vectors and head weights at `alpha`."""
    steered = SteeredCausalLM(tiny_model(family))
    generator = torch.Generator().manual_seed(seed)
    vectors = torch.randn(steered.num_layers, steered.num_heads, steered.head_dim, generator=generator)
    steered.set_steering(vectors, torch.rand(steered.num_layers, steered.num_heads, generator=generator), alpha)
    return steered


def left_padded_batch(seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 10), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


@torch.no_grad()
def padded_logits(model, steered: SteeredCausalLM, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits at the real (non-pad) positions of a left-padded batch."""
    return model(**steered.architecture.padded_inputs(ids, mask)).logits[mask.bool()]


@pytest.mark.parametrize("family", FAMILIES)
def test_fold_equals_live_steering_on_a_left_padded_batch(family):
    steered = steered_tiny(family)
    folded = fold(steered)
    ids, mask = left_padded_batch()
    live = padded_logits(steered, steered, ids, mask)
    assert (padded_logits(folded, steered, ids, mask) - live).abs().max() <= 1e-5
    steered.alpha = 0.0
    assert (padded_logits(steered, steered, ids, mask) - live).abs().max() > 1e-2  # the steering matters here


@pytest.mark.parametrize("family", FAMILIES)
def test_fold_equals_live_steering_when_generating_with_the_cache(family):
    steered = steered_tiny(family)
    folded = fold(steered)
    ids, mask = left_padded_batch()
    kwargs = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False,
              "use_cache": True, "output_logits": True, "return_dict_in_generate": True, "pad_token_id": 0}
    with torch.no_grad():
        live, again = steered.generate(**kwargs), folded.generate(**kwargs)
    assert torch.equal(live.sequences, again.sequences)
    for step_live, step_folded in zip(live.logits, again.logits, strict=True):
        assert (step_live - step_folded).abs().max() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_fold_returns_a_plain_copy_and_leaves_the_steered_model_working(family):
    steered = steered_tiny(family)
    ids, mask = left_padded_batch()
    before = padded_logits(steered, steered, ids, mask)
    folded = fold(steered)
    architecture = steered.architecture
    assert folded is not steered.model
    for block in architecture.attention_blocks(folded):
        assert not isinstance(block, SteeredAttention)
        assert not any(name.startswith("steer_") for name, _ in block.named_buffers())
        assert not getattr(block, architecture.projection)._forward_pre_hooks
    assert torch.equal(padded_logits(steered, steered, ids, mask), before)
    SteeredCausalLM(folded)  # an ordinary model again: it can be wrapped


def test_fold_in_place_restores_the_wrapped_model():
    steered = steered_tiny("llama")
    ids, mask = left_padded_batch()
    live = padded_logits(steered, steered, ids, mask)
    model = steered.model
    folded = fold(steered, inplace=True)
    assert folded is model
    assert type(folded.model.layers[0].self_attn).__name__ == "LlamaAttention"
    assert (padded_logits(folded, steered, ids, mask) - live).abs().max() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_fold_at_alpha_zero_leaves_every_weight_bit_identical_and_adds_no_bias(family):
    folded = fold(steered_tiny(family, alpha=0.0))
    base = tiny_model(family)
    folded_state, base_state = folded.state_dict(), base.state_dict()
    assert folded_state.keys() == base_state.keys()  # no bias added, no config flag set
    for name, tensor in base_state.items():
        assert torch.equal(folded_state[name], tensor), name
    assert folded.config.to_dict() == base.config.to_dict()


def test_fold_sets_the_bias_flag_so_that_save_pretrained_reloads_with_the_stock_class(tmp_path):
    steered = steered_tiny("llama")
    folded = fold(steered)
    assert folded.config.attention_bias and not steered.config.attention_bias  # the copy's config only
    q_bias = folded.model.layers[0].self_attn.q_proj.bias
    assert q_bias is not None and not q_bias.any()
    folded.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids, mask = left_padded_batch()
    difference = padded_logits(reloaded.eval(), steered, ids, mask) - padded_logits(folded, steered, ids, mask)
    assert difference.abs().max() <= 1e-6


def test_every_model_type_has_a_bias_slot_entry():
    for architecture in ARCHITECTURES:
        for model_type in architecture.model_types:
            slot = architecture.bias_slot(model_type)
            if slot.export_as is not None:
                assert not slot.stock and architecture.bias_slot(slot.export_as).stock
            if not slot.stock:
                assert slot.note


@pytest.mark.parametrize("family", FAMILIES)
def test_registry_bias_slots_match_the_stock_classes(family):
    """The registry's facts about transformers: the flag creates the bias; a class without a slot has none even
    with every bias-looking flag set."""
    config = TINY_CONFIGS[family]()
    architecture = architecture_for(config)
    slot = architecture.bias_slot(config.model_type)
    if slot.flag is not None:
        setattr(config, slot.flag, False)
        assert all(p.bias is None for p in architecture.projections(AutoModelForCausalLM.from_config(config)))
        setattr(config, slot.flag, True)
    if not slot.stock:
        config.attention_bias, config.no_bias, config.enable_bias = True, False, True
    model = AutoModelForCausalLM.from_config(config)
    assert all((p.bias is not None) == slot.stock for p in architecture.projections(model))
    if slot.stock:
        layer = architecture.layer_modules(model)[0]
        assert all(layer.get_submodule(path).bias is not None for path in slot.companions)


@pytest.mark.parametrize(("config", "expected"), [
    (MistralConfig(max_position_embeddings=128, sliding_window=16), True),
    (MistralConfig(max_position_embeddings=128, sliding_window=128), False),
    (MistralConfig(max_position_embeddings=128, sliding_window=None), False),
    (Qwen2Config(max_position_embeddings=128), False),
    (Qwen2Config(max_position_embeddings=128, use_sliding_window=True, sliding_window=16, max_window_layers=0), True),
    (Qwen2Config(num_hidden_layers=2, max_position_embeddings=128, use_sliding_window=True, sliding_window=16,
                 max_window_layers=2), False),
])
def test_sliding_window_in_effect(config, expected):
    assert architecture_for(config).sliding_window_in_effect(config) is expected
