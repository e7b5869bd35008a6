import copy

import pytest
import torch

from destein_pl import SteeredCausalLM, UnsupportedArchitectureError, architecture_for
from tests.conftest import FAMILIES, SDPA_FAMILIES, left_pad, random_ids, tiny_model


def random_steering(steered: SteeredCausalLM, seed: int = 2, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    vectors = scale * torch.randn(steered.num_layers, steered.num_heads, steered.head_dim, generator=g)
    probes = torch.rand(steered.num_layers, steered.num_heads, generator=g)
    return vectors, probes


def projection(model, layer: int):
    arch = architecture_for(model.config)
    return getattr(arch.attention_blocks(model)[layer], arch.projection)


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_steering_is_exactly_the_base_model(family):
    base = tiny_model(family)
    steered = SteeredCausalLM(copy.deepcopy(base))
    ids = random_ids(2, 11)
    with torch.no_grad():
        assert torch.equal(steered(input_ids=ids).logits, base(input_ids=ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_head_matches_hand_computation(family):
    base = tiny_model(family)
    steered = SteeredCausalLM(copy.deepcopy(base))
    layer, head, alpha, p = 1, 2, 0.7, 0.9
    v = torch.randn(steered.head_dim, generator=torch.Generator().manual_seed(5))
    vectors = torch.zeros(steered.num_layers, steered.num_heads, steered.head_dim)
    probes = torch.zeros(steered.num_layers, steered.num_heads)
    vectors[layer, head], probes[layer, head] = v, p
    steered.set_steering(vectors, probes, alpha)
    ids = random_ids(2, 9)

    base_inputs, steered_outputs = [], []
    h1 = projection(base, layer).register_forward_pre_hook(lambda m, a: base_inputs.append(a[0]))
    h2 = projection(steered.model, layer).register_forward_hook(lambda m, a, out: steered_outputs.append(out))
    with torch.no_grad():
        base(input_ids=ids)
        steered(input_ids=ids)
    h1.remove(), h2.remove()

    h = base_inputs[0].clone()
    d = steered.head_dim
    h[..., head * d : (head + 1) * d] += alpha * p * v
    with torch.no_grad():
        expected = projection(base, layer)(h)
    torch.testing.assert_close(steered_outputs[0], expected, rtol=0, atol=1e-6)

    # End to end: the base model with the same edit made by hand gives the steered logits.
    def edit(module, args):
        x = args[0].clone()
        x[..., head * d : (head + 1) * d] += alpha * p * v
        return (x,)

    projection(base, layer).register_forward_pre_hook(edit)
    with torch.no_grad():
        torch.testing.assert_close(steered(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=1e-5)
        unsteered = SteeredCausalLM(tiny_model(family))(input_ids=ids).logits
        assert not torch.allclose(steered(input_ids=ids).logits, unsteered)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_with_cache_equals_full_recompute(family):
    steered = SteeredCausalLM(tiny_model(family))
    steered.set_steering(*random_steering(steered), alpha=0.5)
    prompt = random_ids(1, 6)
    with torch.no_grad():
        generated = steered.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
            use_cache=True, min_new_tokens=8,
        )
        seq = prompt
        for _ in range(8):
            next_token = steered(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, next_token], dim=1)
    assert torch.equal(generated, seq)


@pytest.mark.parametrize(
    "family, attn", [(f, "eager") for f in FAMILIES] + [(f, "sdpa") for f in SDPA_FAMILIES]
)
def test_left_padded_batch_matches_rows_alone(family, attn):
    steered = SteeredCausalLM(tiny_model(family, attn))
    steered.set_steering(*random_steering(steered), alpha=0.5)
    rows = [random_ids(1, 10, seed=3)[0], random_ids(1, 4, seed=4)[0], random_ids(1, 7, seed=5)[0]]
    ids, mask = left_pad(rows)
    with torch.no_grad():
        batched = steered(**steered.architecture.padded_inputs(ids, mask)).logits
        for i, r in enumerate(rows):
            alone = steered(input_ids=r[None]).logits[0]
            torch.testing.assert_close(batched[i, ids.shape[1] - len(r) :], alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", SDPA_FAMILIES)
def test_eager_and_sdpa_agree(family):
    eager = SteeredCausalLM(tiny_model(family, "eager"))
    sdpa = SteeredCausalLM(tiny_model(family, "sdpa"))
    assert torch.equal(eager.model.lm_head.weight, sdpa.model.lm_head.weight)
    for m in (eager, sdpa):
        m.set_steering(*random_steering(m), alpha=0.8)
    ids = random_ids(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(eager(input_ids=ids).logits, sdpa(input_ids=ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_record_activations_is_mean_of_last_real_tokens(family):
    steered = SteeredCausalLM(tiny_model(family))
    rows = [random_ids(1, 12, seed=6)[0], random_ids(1, 3, seed=7)[0]]
    ids, mask = left_pad(rows)
    k = 5
    recorded = steered.record_activations(ids, mask, last_k=k)
    assert recorded.shape == (2, steered.num_layers, steered.num_heads, steered.head_dim)
    for i, r in enumerate(rows):  # each row alone, hooks on the unwrapped projections
        inputs = []
        hooks = [
            projection(steered.model, l).register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
            for l in range(steered.num_layers)
        ]
        with torch.no_grad():
            steered(input_ids=r[None])
        for h in hooks:
            h.remove()
        for l, x in enumerate(inputs):
            expected = x[0, -min(k, len(r)) :].mean(0).view(steered.num_heads, steered.head_dim)
            torch.testing.assert_close(recorded[i, l], expected, rtol=0, atol=1e-5)


def test_right_padding_is_excluded_too():
    steered = SteeredCausalLM(tiny_model("gpt2"))
    r = random_ids(1, 6)
    right = torch.cat([r, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 6 + [0] * 4])
    torch.testing.assert_close(
        steered.record_activations(right, mask, last_k=3), steered.record_activations(r, last_k=3), rtol=0, atol=1e-5
    )


def test_buffers_in_state_dict_follow_dtype_and_accept_other_devices_and_dtypes():
    steered = SteeredCausalLM(tiny_model("llama"))
    keys = [k for k in steered.state_dict() if "steer_" in k]
    assert len(keys) == 3 * steered.num_layers
    assert "model.model.layers.0.self_attn.steer_vectors" in keys
    vectors, probes = random_steering(steered)
    steered.to(torch.bfloat16)
    steered.set_steering(vectors.double(), probes.double(), alpha=0.3)  # float64 input: copied, not an error
    assert steered.blocks[0].steer_vectors.dtype == torch.bfloat16
    ids = random_ids(1, 5)
    with torch.no_grad():
        out = steered.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
        assert steered(input_ids=ids).logits.dtype == torch.bfloat16
    assert out.shape == (1, 8)


def test_alpha_is_readable_and_settable_and_scales_the_edit():
    steered = SteeredCausalLM(tiny_model("opt"))
    vectors, probes = random_steering(steered)
    steered.set_steering(vectors, probes, alpha=0.25)
    assert steered.alpha == 0.25
    assert torch.equal(steered.vectors, vectors) and torch.equal(steered.head_weights, probes)
    steered.alpha = 0.0
    base = tiny_model("opt")
    ids = random_ids(1, 6)
    with torch.no_grad():
        assert torch.equal(steered(input_ids=ids).logits, base(input_ids=ids).logits)


def test_set_steering_rejects_wrong_shapes():
    steered = SteeredCausalLM(tiny_model("gpt2"))
    L, H, D = steered.num_layers, steered.num_heads, steered.head_dim
    with pytest.raises(ValueError, match=r"vectors must have shape .*\[3, 4, 8\], got \[3, 4, 7\]"):
        steered.set_steering(torch.zeros(L, H, D - 1), torch.zeros(L, H))
    with pytest.raises(ValueError, match=r"head_weights must have shape .*\[3, 4\], got \[4, 3\]"):
        steered.set_steering(torch.zeros(L, H, D), torch.zeros(H, L))
    with pytest.raises(ValueError, match="NaN"):
        steered.set_steering(torch.full((L, H, D), float("nan")), torch.zeros(L, H))
    with pytest.raises(ValueError, match="finite"):
        steered.alpha = float("inf")


def test_unsupported_architecture_and_double_wrapping_are_errors():
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    neox = AutoModelForCausalLM.from_config(
        GPTNeoXConfig(num_hidden_layers=1, num_attention_heads=2, hidden_size=16, intermediate_size=32, vocab_size=50)
    )
    with pytest.raises(UnsupportedArchitectureError, match="'gpt_neox' is not supported.*gpt2, llama"):
        SteeredCausalLM(neox)
    model = tiny_model("gpt2")
    SteeredCausalLM(model)
    with pytest.raises(ValueError, match="already wrapped"):
        SteeredCausalLM(model)


def test_deepcopy_keeps_steering_on_the_copy():
    steered = SteeredCausalLM(tiny_model("llama"))
    steered.set_steering(*random_steering(steered), alpha=1.0)
    clone = copy.deepcopy(steered)
    clone.alpha = 0.0
    ids = random_ids(1, 6)
    with torch.no_grad():
        assert not torch.equal(steered(input_ids=ids).logits, clone(input_ids=ids).logits)
        assert torch.equal(clone(input_ids=ids).logits, tiny_model("llama")(input_ids=ids).logits)


# ---- per-row alpha ---------------------------------------------------------------------------------------------
ROW_ALPHAS = [0.0, 0.5, 1.3, 0.5]


def per_row_and_alone(steered: SteeredCausalLM, alphas: list[float], new_tokens: int = 8):
    """(logits, greedy tokens) of a left-padded batch whose rows run at `alphas`, and of each row as a batch of one
    (the same padded row) at its alpha through the shared alpha."""
    rows = [random_ids(1, n, seed=20 + n)[0] for n in (9, 5, 7, 9)][: len(alphas)]
    ids, mask = left_pad(rows)
    inputs = steered.architecture.padded_inputs(ids, mask)
    greedy = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        batched = (steered(**inputs, alpha=alphas).logits,
                   steered.generate(input_ids=ids, attention_mask=mask, alpha=alphas, **greedy))
        shared = steered.alpha
        alone_logits, alone_tokens = [], []
        for i, alpha in enumerate(alphas):
            steered.alpha = alpha
            row = {k: v[i : i + 1] for k, v in inputs.items()}
            alone_logits.append(steered(**row).logits[0])
            alone_tokens.append(steered.generate(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1],
                                                 **greedy)[0])
        steered.alpha = shared
    return batched, (torch.stack(alone_logits), torch.stack(alone_tokens)), mask.bool()


def unsteered(steered: SteeredCausalLM) -> list[torch.Tensor]:
    """The real positions' logits of `per_row_and_alone`'s rows at alpha 0."""
    ids, mask = left_pad([random_ids(1, n, seed=20 + n)[0] for n in (9, 5, 7, 9)])
    with torch.no_grad():
        logits = steered(**steered.architecture.padded_inputs(ids, mask), alpha=[0.0] * 4).logits
    return [row[m] for row, m in zip(logits, mask.bool())]


@pytest.mark.parametrize("family, fusion", [(f, "paper") for f in FAMILIES]
                         + [("llama", "norm_preserving"), ("gpt2", "published")])
def test_rows_at_different_alphas_give_what_a_batch_of_one_at_each_alpha_gives(family, fusion):
    steered = SteeredCausalLM(tiny_model(family))
    if fusion == "published" and steered.config.hidden_size != steered.num_heads * steered.head_dim:
        pytest.skip("the published fusion needs hidden_size == heads * head_dim")
    steered.set_steering(*random_steering(steered), alpha=0.9)
    steered.fusion = fusion
    (logits, tokens), (alone_logits, alone_tokens), real = per_row_and_alone(steered, ROW_ALPHAS)
    torch.testing.assert_close(logits[real], alone_logits[real], rtol=0, atol=1e-5)
    assert torch.equal(tokens, alone_tokens)
    assert all(not torch.allclose(alone_logits[i][real[i]], base) for i, base in enumerate(unsteered(steered))
               if ROW_ALPHAS[i])  # each nonzero alpha has an effect
    assert steered.alpha == pytest.approx(0.9) and all(b.steer_rows is None for b in steered.blocks)  # restored on exit


@pytest.mark.parametrize("family", FAMILIES)
def test_gated_rows_at_different_alphas_keep_their_own_gate(family):
    from tests.test_gating import gated_tiny

    steered = gated_tiny(family, "smooth")
    (logits, tokens), (alone_logits, alone_tokens), real = per_row_and_alone(steered, ROW_ALPHAS)
    torch.testing.assert_close(logits[real], alone_logits[real], rtol=0, atol=1e-5)
    assert torch.equal(tokens, alone_tokens)


def test_equal_row_alphas_are_the_shared_alpha_exactly_and_mismatched_rows_are_refused():
    steered = SteeredCausalLM(tiny_model("llama"))
    steered.set_steering(*random_steering(steered), alpha=0.2)
    ids = random_ids(3, 6)
    with torch.no_grad():
        rows = steered(input_ids=ids, alpha=[0.7, 0.7, 0.7]).logits
        steered.alpha = 0.7
        assert torch.equal(rows, steered(input_ids=ids).logits)
        with pytest.raises(ValueError, match="holds 2 rows but this forward has 3"):
            steered(input_ids=ids, alpha=[0.1, 0.7])
        with pytest.raises(ValueError, match="finite"):
            steered(input_ids=ids, alpha=[0.1, float("nan"), 0.2])
    assert steered.alpha == pytest.approx(0.7)
