"""Steering operators (`paper`, `norm_preserving`, `published`, and one registered by a test) against hand
computations with plain hooks, their storage in checkpoints, and folding's refusal of those that do not fold."""

import copy

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from destein_pl import CalibrationOptions, SteeredCausalLM, calibrate, load_base_model
from destein_pl.calibration.pairs import SteeringPair
from destein_pl.steering.checkpoint import read_checkpoint
from destein_pl.steering.folding import NotFoldableError, fold
from destein_pl.steering.gating import GateSettings
from destein_pl.steering.operators import OPERATORS
from tests.conftest import FAMILIES, plain_projections, random_ids, tiny_model

ALPHA = 0.6


def steered_tiny(family: str, fusion: str, alpha: float = ALPHA) -> SteeredCausalLM:
    steered = SteeredCausalLM(tiny_model(family))
    g = torch.Generator().manual_seed(2)
    vectors = torch.randn(steered.num_layers, steered.num_heads, steered.head_dim, generator=g)
    weights = torch.rand(steered.num_layers, steered.num_heads, generator=g)
    weights[0, 1] = 0.0  # a head outside the top k: no paper shift, but still a (1 + 0) slice in `published`
    steered.set_steering(vectors, weights, alpha)
    steered.fusion = fusion
    return steered


def hand_logits(family: str, steered: SteeredCausalLM, ids: torch.Tensor, fusion: str) -> torch.Tensor:
    """The same tiny model, unwrapped, with the variant written out by hand in plain hooks."""
    model = tiny_model(family)
    alpha = ALPHA
    num_heads, head_dim = steered.num_heads, steered.head_dim
    for layer, proj in enumerate(plain_projections(model, family)):
        v = steered.vectors[layer]  # [H, D]
        w = steered.head_weights[layer]  # [H]
        if fusion == "norm_preserving":
            def pre(module, args, v=v, w=w):
                x = args[0]
                heads = x.reshape(*x.shape[:-1], num_heads, head_dim)
                shifted = heads + alpha * w[:, None] * v
                ratio = heads.norm(dim=-1, keepdim=True) / shifted.norm(dim=-1, keepdim=True)
                out = shifted * ratio
                out[..., w == 0, :] = heads[..., w == 0, :]  # no shift, no change
                return (out.reshape(x.shape),)

            proj.register_forward_pre_hook(pre)
        elif fusion == "published":
            flat = -v.reshape(-1)  # toxic - non-toxic, before the projection
            weight = proj.weight.detach()
            d = flat @ weight if isinstance(proj, Conv1D) else weight @ flat  # after it: W (a_tox - a_non)
            d = (d.reshape(num_heads, head_dim) * (1 + w)[:, None]).reshape(-1)

            def post(module, args, y, d=d):
                unit_y = y / y.norm(dim=-1, keepdim=True)
                moved = unit_y - alpha * d / d.norm()
                return moved / moved.norm(dim=-1, keepdim=True) * y.norm(dim=-1, keepdim=True)

            proj.register_forward_hook(post)
    with torch.no_grad():
        return model(input_ids=ids).logits


# `published` slices hidden_size into heads, which Gemma 3's wider heads do not allow (refused, tested below).
@pytest.mark.parametrize("family, fusion", [(f, v) for f in FAMILIES for v in ("published", "norm_preserving")
                                            if (f, v) != ("gemma3", "published")])
def test_variant_matches_hand_computation(family, fusion):
    steered = steered_tiny(family, fusion)
    ids = random_ids(2, 9)
    with torch.no_grad():
        ours = steered(input_ids=ids).logits
        paper = copy.deepcopy(steered)
        paper.fusion = "paper"
        assert not torch.allclose(ours, paper(input_ids=ids).logits, atol=1e-3)  # a different variant indeed
    torch.testing.assert_close(ours, hand_logits(family, steered, ids, fusion), rtol=0, atol=2e-5)


def test_published_is_refused_where_the_heads_do_not_slice_the_hidden_size():
    steered = SteeredCausalLM(tiny_model("gemma3"))  # 4 heads x 16 wide, hidden_size 32
    with pytest.raises(ValueError, match=r"fusion='published' slices .* this model has 32 != 4 \* 16"):
        steered.fusion = "published"
    assert steered.fusion == "paper"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_norm_preserving_keeps_each_heads_norm(family):
    steered = steered_tiny(family, "norm_preserving")
    proj = plain_projections(steered.model, family)[1]
    before, after = [], []  # the projection input before and after the steering hook
    h1 = proj.register_forward_pre_hook(lambda m, a: before.append(a[0]), prepend=True)
    h2 = proj.register_forward_pre_hook(lambda m, a: after.append(a[0]))
    with torch.no_grad():
        steered(input_ids=random_ids(1, 6))
    h1.remove(), h2.remove()
    H, D = steered.num_heads, steered.head_dim
    b, a = before[0].reshape(1, 6, H, D), after[0].reshape(1, 6, H, D)
    torch.testing.assert_close(a.norm(dim=-1), b.norm(dim=-1), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("fusion", OPERATORS)
@pytest.mark.parametrize("family", ["llama", "gpt2", "mpt"])
def test_zero_alpha_is_exactly_the_base_model_for_every_variant(family, fusion):
    steered = steered_tiny(family, fusion, alpha=0.0)
    ids = random_ids(2, 7)
    with torch.no_grad():
        assert torch.equal(steered(input_ids=ids).logits, tiny_model(family)(input_ids=ids).logits)


def test_unknown_fusion_is_an_error():
    steered = SteeredCausalLM(tiny_model("llama"))
    with pytest.raises(ValueError, match="fusion must be one of paper, published, norm_preserving"):
        steered.fusion = "residual"
    with pytest.raises(ValueError, match="fusion must be one of"):
        CalibrationOptions(fusion="residual")


@pytest.mark.parametrize("fusion", ["published", "norm_preserving"])
def test_folding_refuses_a_non_constant_fusion(fusion):
    steered = steered_tiny("llama", fusion)
    with pytest.raises(NotFoldableError, match=f"fusion='{fusion}'"):
        fold(steered)
    with pytest.raises(NotFoldableError, match=f"fusion='{fusion}'"):
        steered.fold()
    steered.fusion = "paper"
    folded = fold(steered)  # paper without a gate still folds, and matches the live steering
    ids = random_ids(2, 7)
    with torch.no_grad():
        torch.testing.assert_close(folded(input_ids=ids).logits, steered(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_fold_in_place_removes_every_steering_hook():
    steered = steered_tiny("gpt2", "paper")
    folded = fold(steered, inplace=True)
    for proj in plain_projections(folded, "gpt2"):
        assert not proj._forward_pre_hooks and not proj._forward_hooks
    for block in (layer.attn for layer in folded.transformer.h):
        assert not any(hasattr(block, name) for name in ("steer_operator", "steer_modifier", "steer_vectors"))


PAIRS = [SteeringPair(f"you are a stupid idiot number {i}", f"you are a kind person number {i}") for i in range(10)]


@pytest.fixture(scope="module")
def calibrated_tiny(tiny_llama_dir, tmp_path_factory):
    """A tiny model calibrated with the published fusion and a smooth gate, saved as .safetensors."""
    model, tokenizer = load_base_model(str(tiny_llama_dir))
    steered = SteeredCausalLM(model, tokenizer)
    options = CalibrationOptions(alpha=0.8, fusion="published",
                                 gate=GateSettings("smooth", threshold=0.4, temperature=0.2, heads=5))
    calibration = calibrate(steered, PAIRS, options, batch_size=5, progress=False)
    path = calibration.save(tmp_path_factory.mktemp("fusion") / "tiny.safetensors", steered, heatmap=False)
    return steered, path


def test_checkpoint_stores_and_restores_fusion_and_gate(calibrated_tiny):
    steered, path = calibrated_tiny
    _, metadata = read_checkpoint(path)
    assert metadata["options"]["fusion"] == "published"
    assert metadata["options"]["gate"] == {"mode": "smooth", "threshold": 0.4, "temperature": 0.2, "heads": 5,
                                           "window": 8, "probe_scaling": "none"}
    loaded = SteeredCausalLM.from_checkpoint(path)
    assert loaded.fusion == "published" and loaded.gate == steered.gate
    batch = steered.tokenizer(["you are a", "hello there my friend"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, steered(**batch).logits)
    overridden = SteeredCausalLM.from_checkpoint(path, fusion="paper", gate=GateSettings("none"))
    assert overridden.fusion == "paper" and not overridden.gate.enabled


def test_export_refuses_a_non_constant_fusion_before_loading_the_model(calibrated_tiny, tmp_path):
    from destein_pl.steering.export import export

    _, path = calibrated_tiny
    with pytest.raises(NotFoldableError, match="fusion='published'"):
        export(str(path), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_lightning_module_passes_fusion_and_gate_to_the_checkpoint_and_overrides_it(calibrated_tiny, tiny_llama_dir):
    from destein_pl.lightning.module import DeSteinModule
    from destein_pl.steering.checkpoint import METADATA_KEY

    steered, path = calibrated_tiny
    tensors, metadata = read_checkpoint(path)
    # the Lightning form of the same checkpoint: per-block buffers under `steered.`, probes under `probes.`
    state = {f"steered.{k}": v for k, v in steered.state_dict().items() if ".steer_" in k}
    state.update({f"probes.{k}": v for k, v in tensors.items() if "probe_" in k})
    checkpoint = {"state_dict": state, METADATA_KEY: metadata}

    keeps = DeSteinModule(base_model=str(tiny_llama_dir))
    assert keeps.options.fusion == "paper" and not keeps.options.gate.enabled  # calibration defaults
    keeps.on_load_checkpoint(checkpoint)
    assert keeps.steered.fusion == "published" and keeps.steered.gate.mode == "smooth"

    overrides = DeSteinModule(base_model=str(tiny_llama_dir), fusion="norm_preserving",
                              gate=GateSettings("hard", threshold=0.7, heads=3))
    assert overrides.hparams.fusion == "norm_preserving" and "gate" not in overrides.hparams
    overrides.on_load_checkpoint(checkpoint)
    assert overrides.steered.fusion == "norm_preserving"
    assert (overrides.steered.gate.mode, overrides.steered.gate.threshold, overrides.steered.gate.heads) == \
        ("hard", 0.7, 3)


def test_a_new_operator_is_one_registered_class():
    """The extension point: a class with `@register` is selectable by name, called at its site with the gate's
    scale, and refused by folding unless it declares that it folds."""
    from destein_pl.steering.operators import OPERATORS, SteeringOperator, register

    @register
    class Doubled(SteeringOperator):
        name = "doubled_for_test"

        def __call__(self, x, layer, projection, scale):
            return x + 2 * layer.steering_offset().to(x)

    try:
        steered = steered_tiny("llama", "doubled_for_test")
        reference = steered_tiny("llama", "paper", alpha=2 * ALPHA)
        ids = random_ids(2, 7)
        with torch.no_grad():
            torch.testing.assert_close(steered(input_ids=ids).logits, reference(input_ids=ids).logits)
        with pytest.raises(NotFoldableError, match="fusion='doubled_for_test'"):
            fold(steered)
        with pytest.raises(ValueError, match="already registered"):
            register(Doubled)
    finally:
        OPERATORS.pop("doubled_for_test")
