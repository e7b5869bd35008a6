"""Probe-gated steering: `none` is today's steering bit for bit; the gate reads the probes on the unsteered model,
is monotone in their score, keeps rows independent of their batch neighbours, and a cached forward equals a full
one. Old checkpoints load as before."""

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml

from destein_pl import SteeredCausalLM
from destein_pl.evaluation.sampling import SamplingSettings, sample
from destein_pl.steering.checkpoint import CheckpointError, read_checkpoint
from destein_pl.steering.folding import NotFoldableError, fold
from destein_pl.steering.gating import GateSettings, GateStateError
from destein_pl.steering.probes import Probes
from tests.conftest import FAMILIES, left_pad, plain_projections, random_ids, tiny_model

ALPHA = 0.6
CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"


def steered_tiny(family: str, alpha: float = ALPHA, fusion: str = "paper") -> SteeredCausalLM:
    steered = SteeredCausalLM(tiny_model(family))
    g = torch.Generator().manual_seed(2)
    steered.set_steering(torch.randn(steered.num_layers, steered.num_heads, steered.head_dim, generator=g),
                         torch.rand(steered.num_layers, steered.num_heads, generator=g), alpha)
    steered.fusion = fusion
    return steered


def random_probes(steered: SteeredCausalLM, seed: int = 3, scale: float = 1.0) -> Probes:
    g = torch.Generator().manual_seed(seed)
    L, H, D = steered.num_layers, steered.num_heads, steered.head_dim
    accuracy = torch.randperm(L * H, generator=g).float().reshape(L, H) / (L * H)  # distinct: no ties
    return Probes(scale * torch.randn(L, H, D, generator=g), 0.1 * torch.randn(L, H, generator=g), accuracy)


def separating_threshold(scores: torch.Tensor) -> float:
    """A threshold in the widest gap between the scores, so that a hard gate is not decided by the last bits."""
    values = scores.flatten().sort().values
    gaps = values[1:] - values[:-1]
    i = int(gaps.argmax())
    return float(values[i] + values[i + 1]) / 2


def logits(model, ids, mask=None, **kwargs):
    with torch.no_grad():
        if mask is None:
            return model(input_ids=ids, **kwargs).logits
        return model(**model.architecture.padded_inputs(ids, mask), **kwargs).logits


# ---- settings ------------------------------------------------------------------------------------------------
def test_settings_are_checked_and_round_trip_through_metadata():
    settings = GateSettings("smooth", threshold=0.3, temperature=0.1, heads=4, window=5)
    assert GateSettings.from_metadata(settings.metadata()) == settings
    shallow = GateSettings("hard", layers=2)
    assert GateSettings.from_metadata(shallow.metadata()) == shallow
    assert settings.metadata()["probe_scaling"] == "none"
    assert GateSettings.from_metadata(None) == GateSettings() and not GateSettings().enabled
    for bad in ({"mode": "soft"}, {"threshold": 1.5}, {"temperature": 0.0}, {"heads": 0}, {"window": 0},
                {"layers": 0}, {"layers": 1.5}):
        with pytest.raises(ValueError, match="gate"):
            GateSettings(**bad)
    with pytest.raises(ValueError, match="activation scaling 'standard'"):
        GateSettings.from_metadata({"mode": "hard", "probe_scaling": "standard"})


@pytest.mark.parametrize("mode", ["hard", "smooth"])
def test_gate_is_monotone_in_the_score_and_in_the_unit_interval(mode):
    score = torch.linspace(0, 1, 1001)
    gate = GateSettings(mode, threshold=0.4, temperature=0.05)(score)
    assert (gate >= 0).all() and (gate <= 1).all()
    assert (gate[1:] >= gate[:-1]).all()
    assert gate[0] < 0.01 and gate[-1] > 0.99
    if mode == "hard":
        assert gate[score < 0.4].eq(0).all() and gate[score >= 0.4].eq(1).all()
    else:
        torch.testing.assert_close(gate, torch.sigmoid((score - 0.4) / 0.05))


# ---- gate none -----------------------------------------------------------------------------------------------
def todays_logits(family: str, steered: SteeredCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """The paper's steering written out by hand with plain hooks on an unwrapped copy of the model."""
    model = tiny_model(family)
    for layer, proj in enumerate(plain_projections(model, family)):
        alpha = steered.blocks[layer].steer_alpha.float()
        offset = (alpha * steered.head_weights[layer].float()[:, None] * steered.vectors[layer].float()).reshape(-1)
        proj.register_forward_pre_hook(lambda m, a, offset=offset: (a[0] + offset.to(a[0].dtype),))
    return logits(model, ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_gate_none_is_todays_steering_bit_for_bit(family):
    steered = steered_tiny(family)
    ids = random_ids(2, 9)
    assert steered.gate.mode == "none"
    never_gated = logits(steered, ids)
    assert torch.equal(never_gated, todays_logits(family, steered, ids))
    steered.set_gate(GateSettings("hard"), random_probes(steered))
    logits(steered, ids)
    steered.set_gate(None)
    assert not steered.model._forward_pre_hooks and not steered.model._forward_hooks  # no gate hooks left
    assert torch.equal(logits(steered, ids), never_gated)
    prompts, keys, settings = [[5, 9, 14, 3], [7, 8, 9]], ["a", "b"], SamplingSettings(num_samples=2, max_new_tokens=6)
    again = sample(steered, steered.architecture, prompts, keys, settings, 0, [2], width=5).tokens
    fresh = steered_tiny(family)
    assert again == sample(fresh, fresh.architecture, prompts, keys, settings, 0, [2], width=5).tokens


# ---- what the gate reads -------------------------------------------------------------------------------------
def hand_scores(family: str, probes: Probes, settings: GateSettings, ids, mask) -> torch.Tensor:
    """The probes' score by hand: the unwrapped base model's per-head activations, each gate head's logit per
    position, averaged over the last `window` real positions, sigmoid, mean over the gate heads."""
    model = tiny_model(family)
    L, H, D = probes.coef.shape
    inputs = {}
    for layer, proj in enumerate(plain_projections(model, family)):
        proj.register_forward_pre_hook(lambda m, a, layer=layer: inputs.__setitem__(layer, a[0]))
    kwargs = {"attention_mask": mask}
    if family != "mpt":
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        model(input_ids=ids, **kwargs)
    ranked = sorted(range(L * H), key=lambda i: -float(probes.accuracy.flatten()[i]))[: settings.heads]
    B, T = ids.shape
    scores = torch.zeros(B, T)
    for b in range(B):
        for t in range(T):
            window = [s for s in range(max(0, t - settings.window + 1), t + 1) if mask[b, s]]
            probs = []
            for i in ranked:
                layer, head = divmod(i, H)
                acts = inputs[layer][b, :, head * D : (head + 1) * D]
                logit = sum(float(acts[s] @ probes.coef[layer, head] + probes.intercept[layer, head])
                            for s in window) / max(len(window), 1)
                probs.append(torch.sigmoid(torch.tensor(logit)))
            scores[b, t] = torch.stack(probs).mean()
    return scores


@pytest.mark.parametrize("fusion", ["paper", "published"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "mpt"])
def test_score_is_the_probes_on_the_unsteered_model(family, fusion):
    steered = steered_tiny(family, fusion=fusion)
    probes = random_probes(steered)
    settings = GateSettings("smooth", threshold=0.5, temperature=0.1, heads=5, window=3)
    steered.set_gate(settings, probes)
    ids, mask = left_pad([random_ids(1, 7, seed=4)[0], random_ids(1, 5, seed=5)[0]])
    gate, score = steered.gate_values(ids, mask)
    expected = hand_scores(family, probes, settings, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(score[real], expected[real], rtol=0, atol=1e-5)
    torch.testing.assert_close(gate[real], settings(score)[real])
    assert gate[~real].eq(0).all()  # only padding in the window: no steering
    steered.alpha = 2.5  # the gate does not depend on the steering it gates
    torch.testing.assert_close(steered.gate_values(ids, mask)[1], score, rtol=0, atol=0)


def test_with_window_last_k_the_gate_reads_the_feature_the_probes_were_fit_on():
    steered = steered_tiny("llama")
    probes = random_probes(steered)
    steered.set_gate(GateSettings("smooth", heads=1, window=8), probes)
    ids = random_ids(2, 12)
    _, score = steered.gate_values(ids)
    alpha = steered.alpha
    steered.alpha = 0.0
    features = steered.record_activations(ids, last_k=8)  # what calibration fits the probes on
    steered.alpha = alpha
    (layer, head), = probes.top_heads(1)
    logit = features[:, layer, head] @ probes.coef[layer, head] + probes.intercept[layer, head]
    torch.testing.assert_close(score[:, -1], torch.sigmoid(logit), rtol=0, atol=1e-6)


def test_a_shallow_gate_reads_only_its_first_layers_and_stops_its_shadow_pass_there():
    steered = steered_tiny("llama")
    probes = random_probes(steered)
    steered.set_gate(GateSettings("smooth", heads=1, window=8, layers=1), probes)
    ids = random_ids(2, 12)
    layers = steered.architecture.layer_modules(steered.model)
    calls = [0] * len(layers)
    handles = [layer.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, layer in enumerate(layers)]
    try:
        logits(steered.model, ids)
    finally:
        for handle in handles:
            handle.remove()
    assert calls[0] == 2 and all(count == 1 for count in calls[1:])  # the shadow pass ran layer 0 only
    _, score = steered.gate_values(ids)
    alpha = steered.alpha
    steered.alpha = 0.0
    features = steered.record_activations(ids, last_k=8)
    steered.alpha = alpha
    head = int(torch.argmax(probes.accuracy[0]))  # the best head of layer 0, whatever the deeper layers hold
    logit = features[:, 0, head] @ probes.coef[0, head] + probes.intercept[0, head]
    torch.testing.assert_close(score[:, -1], torch.sigmoid(logit), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="gate layers is 99, but the probes cover"):
        steered.set_gate(GateSettings("smooth", layers=99), probes)


# ---- the gate steers toxic contexts more --------------------------------------------------------------------
def test_a_context_the_probes_call_toxic_gets_a_higher_gate():
    steered = steered_tiny("llama")
    toxic, clean = random_ids(1, 10, seed=7), random_ids(1, 10, seed=8)
    alpha = steered.alpha
    steered.alpha = 0.0
    a_toxic, a_clean = steered.record_activations(torch.cat([toxic, clean]), last_k=8)
    steered.alpha = alpha
    coef = a_toxic - a_clean  # a probe direction that separates the two contexts' features, each head
    intercept = -(coef * (a_toxic + a_clean) / 2).sum(-1)
    accuracy = torch.rand(steered.num_layers, steered.num_heads, generator=torch.Generator().manual_seed(1))
    for mode in ("hard", "smooth"):
        steered.set_gate(GateSettings(mode, threshold=0.5, temperature=0.05, heads=6, window=8),
                         Probes(coef, intercept, accuracy))
        gate, score = steered.gate_values(torch.cat([toxic, clean]))
        assert score[0, -1] > 0.5 > score[1, -1]
        assert gate[0, -1] > gate[1, -1]


@pytest.mark.parametrize("fusion", ["paper", "norm_preserving", "published"])
def test_gate_open_is_the_ungated_steering_and_gate_closed_the_base_model(fusion):
    steered = steered_tiny("llama", fusion=fusion)
    ids, mask = left_pad([random_ids(1, 9, seed=4)[0], random_ids(1, 6, seed=5)[0]])
    ungated = logits(steered, ids, mask)
    base = logits(steered_tiny("llama", alpha=0.0), ids, mask)
    probes = random_probes(steered, scale=0.0)  # every logit is its intercept: the probes call every context ...
    probes.intercept.fill_(8.0)  # ... toxic
    steered.set_gate(GateSettings("hard"), probes)
    real = mask.bool()  # (padding positions, never attended to, are left unsteered by the gate)
    assert torch.equal(logits(steered, ids, mask)[real], ungated[real])
    probes.intercept.fill_(-8.0)  # ... clean
    steered.set_gate(GateSettings("hard"), probes)
    assert torch.equal(logits(steered, ids, mask), base)


def test_steering_grows_with_the_probe_score():
    steered = steered_tiny("llama", alpha=0.3)
    ids = random_ids(1, 10)
    base = logits(steered_tiny("llama", alpha=0.0), ids)
    probes = random_probes(steered, scale=0.0)
    gates, moves = [], []
    for shift in torch.linspace(-6, 6, 9):
        probes.intercept.fill_(float(shift))
        steered.set_gate(GateSettings("smooth", threshold=0.5, temperature=0.1), probes)
        gates.append(steered.gate_values(ids)[0][0, -1])
        moves.append((logits(steered, ids) - base)[0, -1].norm())
    gates, moves = torch.stack(gates), torch.stack(moves)
    assert (gates[1:] >= gates[:-1]).all() and gates[0] < 0.01 and gates[-1] > 0.99
    assert (moves[1:] >= moves[:-1]).all() and moves[0] < moves[-1] / 20


# ---- KV cache and batches -------------------------------------------------------------------------------------
def gated_tiny(family: str, mode: str, fusion: str = "paper", contexts: tuple | None = None) -> SteeredCausalLM:
    """A gated tiny model whose threshold splits the scores of a few contexts (`(ids, mask)`) with a wide margin."""
    steered = steered_tiny(family, fusion=fusion)
    probes = random_probes(steered, scale=2.0)
    steered.set_gate(GateSettings("smooth", heads=6, window=3), probes)
    ids, mask = contexts or (random_ids(4, 12, seed=11), torch.ones(4, 12, dtype=torch.long))
    threshold = separating_threshold(steered.gate_values(ids, mask)[1][mask.bool()])
    steered.set_gate(GateSettings(mode, threshold=threshold, temperature=0.02, heads=6, window=3))
    return steered


def assert_cached_steps_equal_a_full_forward(steered: SteeredCausalLM, ids: torch.Tensor, mask: torch.Tensor):
    full = logits(steered, ids, mask, use_cache=False)
    prefill = 5
    with torch.no_grad():
        out = steered(**steered.architecture.padded_inputs(ids[:, :prefill], mask[:, :prefill]), use_cache=True)
        cache, steps = out.cache, [out.logits]
        for t in range(prefill, ids.shape[1]):
            step = {"input_ids": ids[:, t : t + 1], "attention_mask": mask[:, : t + 1]}
            if steered.architecture.takes_position_ids:
                step["position_ids"] = mask[:, : t + 1].sum(1, keepdim=True) - 1
            out = steered(**step, cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits)
    cached = torch.cat(steps, dim=1)
    real = mask.bool()
    torch.testing.assert_close(cached[real], full[real], rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["hard", "smooth"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_steps_equal_a_full_forward(family, mode):
    ids, mask = left_pad([random_ids(1, 12, seed=12)[0], random_ids(1, 9, seed=13)[0]])
    steered = gated_tiny(family, mode, fusion="norm_preserving" if family == "opt" else "paper", contexts=(ids, mask))
    assert_cached_steps_equal_a_full_forward(steered, ids, mask)
    real = mask.bool()
    gate = steered.gate_values(ids, mask)[0][real]
    assert 0 < gate.mean() < 1  # the gate is open somewhere and closed (or half open) elsewhere


def test_cached_steps_equal_a_full_forward_with_a_sliding_window():
    from transformers import AutoModelForCausalLM, MistralConfig

    from tests.conftest import _LLAMA_LIKE

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MistralConfig(**_LLAMA_LIKE, sliding_window=4),
                                             attn_implementation="eager").eval()
    steered = SteeredCausalLM(model)
    g = torch.Generator().manual_seed(2)
    steered.set_steering(torch.randn(3, 4, 8, generator=g), torch.rand(3, 4, generator=g), ALPHA)
    steered.set_gate(GateSettings("smooth", threshold=0.5, temperature=0.1, heads=6, window=3),
                     random_probes(steered, scale=2.0))
    ids, mask = left_pad([random_ids(1, 12, seed=12)[0], random_ids(1, 9, seed=13)[0]])
    assert_cached_steps_equal_a_full_forward(steered, ids, mask)


@pytest.mark.parametrize("family", ["llama", "gpt2", "mpt"])
def test_greedy_generation_with_the_gate_equals_full_recompute(family):
    steered = gated_tiny(family, "hard")
    prompt = random_ids(1, 6, seed=14)
    with torch.no_grad():
        generated = steered.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                     min_new_tokens=8, do_sample=False, use_cache=True)
        seq = prompt
        for _ in range(8):
            next_token = steered(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, next_token], dim=1)
    assert torch.equal(generated, seq)
    greedy = SamplingSettings(num_samples=1, max_new_tokens=8, temperature=0)
    ours = sample(steered, steered.architecture, [prompt[0].tolist()], ["p"], greedy, 0, []).tokens
    assert ours[0][0] == seq[0, 6:].tolist()


@pytest.mark.parametrize("mode", ["hard", "smooth"])
@pytest.mark.parametrize("family", FAMILIES)
def test_gated_rows_do_not_depend_on_their_batch_neighbours(family, mode):
    steered = gated_tiny(family, mode)
    arch = steered.architecture
    prompt, other = [5, 9, 14, 3], [40, 41, 42, 43, 44, 45, 46, 47]
    settings, batch, keys = SamplingSettings(num_samples=2, max_new_tokens=10), [other, prompt, other, [60, 61]], "opqr"
    alone = sample(steered, arch, [prompt], ["p"], settings, 0, [2], width=8).tokens
    mixed = sample(steered, arch, batch, list(keys), settings, 0, [2], width=8).tokens
    assert mixed[1] == alone[0]
    ungated = copy.deepcopy(steered)
    ungated.set_gate(None)
    # the gate changed something
    assert sample(ungated, arch, batch, list(keys), settings, 0, [2], width=8).tokens != mixed


def test_a_cache_filled_without_the_gate_is_refused():
    steered = steered_tiny("llama")
    ids = random_ids(1, 6)
    with torch.no_grad():
        cache = steered(input_ids=ids, use_cache=True).cache
        steered.set_gate(GateSettings("hard"), random_probes(steered))
        with pytest.raises(GateStateError, match="filled without it"):
            steered(input_ids=ids[:, :1], cache=cache, use_cache=True)


def test_a_gate_needs_probes_and_cannot_be_folded():
    steered = steered_tiny("llama")
    with pytest.raises(ValueError, match="needs the calibrated probes"):
        steered.set_gate(GateSettings("smooth"))
    steered.set_gate(GateSettings("smooth"), random_probes(steered))
    with pytest.raises(NotFoldableError, match="gate='smooth'"):
        fold(steered)
    copied = copy.deepcopy(steered)  # a copy carries its own gate, on its own model
    ids = random_ids(2, 7)
    assert torch.equal(logits(copied, ids), logits(steered, ids))
    steered.set_gate(None)
    fold(steered)


# ---- checkpoints ---------------------------------------------------------------------------------------------
def test_a_checkpoint_without_fusion_or_gate_options_loads_as_paper_and_none(tmp_path):
    steered = steered_tiny("llama")
    steered.fusion = "published"
    steered.set_gate(GateSettings("hard"), random_probes(steered))
    reference = steered_tiny("llama")
    metadata = {"format": "destein-pl/1", "architecture": {
        "family": "llama", "model_type": "llama", "num_layers": 3, "num_heads": 4, "head_dim": 8, "hidden_size": 32},
        "options": {"head_weights": "probe", "top_k_heads": None, "last_k": 8, "val_fraction": 0.2, "probe_seed": 0}}
    tensors = {"vectors": reference.vectors, "head_weights": reference.head_weights,
               "alpha": torch.tensor(reference.alpha)}
    steered.load_steering(tensors, metadata, "old.safetensors")
    assert steered.fusion == "paper" and steered.gate.mode == "none" and steered.gate_probes is None
    ids = random_ids(2, 7)
    assert torch.equal(logits(steered, ids), logits(reference, ids))
    metadata["options"]["gate"] = {"mode": "hard"}
    with pytest.raises(CheckpointError, match="old.safetensors: gate 'hard' needs the gate's probes"):
        steered.load_steering(tensors, metadata, "old.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m-paradetox", "smollm2-135m-self-induced"])
def test_shipped_checkpoints_give_the_logits_they_gave_before_gating_existed(name):
    """Logits recorded from the shipped checkpoints before fusion variants and gating were added."""
    golden = json.loads((Path(__file__).parent / "data" / "shipped_checkpoint_logits.json").read_text())
    for suffix in (".ckpt", ".safetensors"):
        steered = SteeredCausalLM.from_checkpoint(CHECKPOINTS / f"{name}{suffix}")
        assert steered.fusion == "paper" and steered.gate.mode == "none"
        assert not steered.model._forward_pre_hooks
        assert steered.gate_probes is not None and steered.gate_probes.coef.shape == (30, 9, 64)
        batch = steered.tokenizer(["you are a", "hello there friend, how"], return_tensors="pt", padding=True)
        with torch.no_grad():
            last = steered(**batch).logits[:, -1].double()
        expected = golden[f"{name}{suffix}"]
        top = last.topk(10, dim=-1)
        assert top.indices.tolist() == expected["top_indices"]
        torch.testing.assert_close(top.values, torch.tensor(expected["top_values"], dtype=torch.float64),
                                   rtol=0, atol=1e-4)
        torch.testing.assert_close(torch.logsumexp(last, -1), torch.tensor(expected["logsumexp"],
                                   dtype=torch.float64), rtol=0, atol=1e-4)
    # the probes every shipped checkpoint carries are enough to gate it
    tensors, _ = read_checkpoint(CHECKPOINTS / f"{name}.safetensors")
    gated = SteeredCausalLM.from_checkpoint(CHECKPOINTS / f"{name}.safetensors", gate=GateSettings("smooth"))
    assert torch.equal(gated.gate_probes.coef, tensors["probe_coef"])
    batch = gated.tokenizer(["You are a stupid idiot and I hate you, you", "The weather today is sunny and the"],
                            return_tensors="pt", padding=True)
    _, score = gated.gate_values(batch["input_ids"], batch["attention_mask"])
    assert score[0, -1] > score[1, -1]  # the real model's probes find the insult more toxic


@pytest.mark.slow
def test_the_shipped_gated_checkpoint_carries_its_overlays_settings_and_gates_with_its_own_probes():
    """`checkpoints/smollm2-135m-gated.*` is what its overlay makes: a user loading it gets the gate and alpha chosen
    on the frontier, read by the probes fit without cues."""
    overlay = yaml.safe_load((CHECKPOINTS.parent / "configs" / "overlays" / "smollm2-135m-gated.yaml").read_text())
    tensors, _ = read_checkpoint(CHECKPOINTS / "smollm2-135m-gated.safetensors")
    for suffix in (".ckpt", ".safetensors"):
        steered = SteeredCausalLM.from_checkpoint(CHECKPOINTS / f"smollm2-135m-gated{suffix}")
        model = overlay["model"]
        assert steered.alpha == pytest.approx(model["alpha"]) and steered.fusion == "paper"
        assert steered.gate == GateSettings(**model["gate"])
        assert torch.equal(steered.gate_probes.coef, tensors["gate_probe_coef"])
        assert not torch.equal(tensors["gate_probe_coef"], tensors["probe_coef"])
    batch = steered.tokenizer(["You are a stupid idiot and I hate you, you", "The weather today is sunny and the"],
                              return_tensors="pt", padding=True)
    gate, _ = steered.gate_values(batch["input_ids"], batch["attention_mask"])
    assert gate[0, -1] > 0.5 > gate[1, -1]  # steers the insult, leaves the weather mostly alone


def test_a_gate_or_fusion_changes_which_stored_generations_a_rerun_reuses():
    steered = steered_tiny("llama")
    steered.set_gate(GateSettings("none"), random_probes(steered))
    plain = steered.steering_digest()
    # the default options keep the digest of vectors and head weights alone, so runs made before them still resume
    expected = hashlib.sha256()
    for tensor in (steered.vectors, steered.head_weights):
        expected.update(tensor.float().contiguous().numpy().tobytes())
    assert plain == expected.hexdigest()
    digests = {plain}
    for settings in (GateSettings("smooth"), GateSettings("smooth", threshold=0.4), GateSettings("hard")):
        steered.set_gate(settings)
        digests.add(steered.steering_digest())
    steered.set_gate(GateSettings("none"))
    steered.fusion = "norm_preserving"
    digests.add(steered.steering_digest())
    assert len(digests) == 5


def test_gate_options_without_a_gate_mode_are_refused_not_dropped(tiny_llama_dir):
    from destein_pl.lightning.module import DeSteinModule

    with pytest.raises(ValueError, match=r"model.gate: \{'threshold': 0.9\} given with mode 'none'"):
        DeSteinModule(base_model=str(tiny_llama_dir), gate=GateSettings(threshold=0.9))
    assert DeSteinModule(base_model=str(tiny_llama_dir), gate=GateSettings()).gate == GateSettings()


def test_an_incomplete_set_of_gate_probes_is_refused(tmp_path):
    steered = steered_tiny("llama")
    steered.set_gate(GateSettings("smooth"), random_probes(steered))
    metadata = {"format": "destein-pl/1", "architecture": steered.signature(),
                "options": {"fusion": "paper", "gate": steered.gate.metadata()}}
    tensors = {**steered.steering_tensors(), **steered.gate_probes.arrays("gate_probe_")}
    del tensors["gate_probe_accuracy"]
    with pytest.raises(CheckpointError, match="x.safetensors: incomplete probes: .*gate_probe_accuracy missing"):
        steered.load_steering(tensors, metadata, "x.safetensors")


@pytest.mark.parametrize("name, value, message", [
    ("gate_probe_coef", 3e38, "beyond 1e\\+06 in magnitude"),
    ("vectors", -2e7, "beyond 1e\\+06 in magnitude"),
    ("gate_probe_accuracy", 1.5, "accuracies or head weights in \\[0, 1\\]"),
    ("head_weights", -0.1, "accuracies or head weights in \\[0, 1\\]"),
])
def test_absurd_but_finite_steering_values_are_refused_at_load(name, value, message):
    steered = steered_tiny("llama")
    steered.set_gate(GateSettings("smooth"), random_probes(steered))
    metadata = {"format": "destein-pl/1", "architecture": steered.signature(),
                "options": {"fusion": "paper", "gate": steered.gate.metadata()}}
    tensors = {**steered.steering_tensors(), **steered.gate_probes.arrays("gate_probe_")}
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = value
    with pytest.raises(CheckpointError, match=f"x.ckpt: tensors \\['{name}'\\] .*{message}"):
        steered.load_steering(tensors, metadata, "x.ckpt")


def test_a_static_cache_or_a_huge_window_is_a_clear_error():
    steered = steered_tiny("llama")
    steered.set_gate(GateSettings("hard", threshold=0.0), random_probes(steered))
    ids = random_ids(1, 5)
    with pytest.raises(GateStateError, match="dynamic KV cache; got a StaticCache"):
        steered.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                         cache_implementation="static")
    with pytest.raises(ValueError, match="gate window must be an integer from 1 to 4096"):
        GateSettings("smooth", window=10**9)


@pytest.mark.parametrize("gate, message", [
    ("smooth", "options.gate must be a mapping"),
    (["smooth"], "options.gate must be a mapping"),
    ({"mode": "smooth", "threshold": "abc"}, "options.gate.threshold must be a number"),
    ({"mode": "smooth", "thresold": 0.3}, "options.gate has unknown keys \\['thresold'\\]"),
])
def test_malformed_gate_metadata_names_the_file(gate, message):
    steered = steered_tiny("llama")
    probes = random_probes(steered)
    metadata = {"format": "destein-pl/1", "architecture": steered.signature(), "options": {"gate": gate}}
    tensors = {**steered.steering_tensors(), **probes.arrays("gate_probe_")}
    with pytest.raises(CheckpointError, match=f"x.safetensors: {message}"):
        steered.load_steering(tensors, metadata, "x.safetensors")


# ---- the floor and the continuation probes ---------------------------------------------------------------------
def test_the_floor_is_the_least_share_of_alpha_and_keeps_the_gate_monotone():
    score = torch.linspace(0, 1, 1001)
    for mode in ("hard", "smooth"):
        plain, floored = GateSettings(mode, threshold=0.4), GateSettings(mode, threshold=0.4, floor=0.25)
        torch.testing.assert_close(floored(score), 0.25 + 0.75 * plain(score))
        assert floored(score).min() >= 0.25 and (floored(score)[1:] >= floored(score)[:-1]).all()
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="gate floor must be in \\[0, 1\\)"):
            GateSettings("smooth", floor=bad)
    with pytest.raises(ValueError, match="gate probes must be one of context, continuation"):
        GateSettings("smooth", probes="future")
    # defaults stay out of the metadata (and so out of the steering digest of a gate without them)
    assert "floor" not in GateSettings("smooth").metadata() and "probes" not in GateSettings("smooth").metadata()
    settings = GateSettings("smooth", floor=0.1, probes="continuation")
    assert GateSettings.from_metadata(settings.metadata()) == settings


@pytest.mark.parametrize("fusion", ["paper", "norm_preserving"])
def test_a_closed_gate_with_a_floor_steers_every_row_at_the_floors_share_of_alpha(fusion):
    ids, mask = left_pad([random_ids(1, 9, seed=4)[0], random_ids(1, 6, seed=5)[0]])
    steered = steered_tiny("llama", fusion=fusion)
    probes = random_probes(steered, scale=0.0)
    probes.intercept.fill_(-8.0)  # the probes call every context clean: the hard gate is closed
    steered.set_gate(GateSettings("hard", floor=0.25), probes)
    real = mask.bool()
    expected = logits(steered_tiny("llama", alpha=0.25 * ALPHA, fusion=fusion), ids, mask)
    torch.testing.assert_close(logits(steered, ids, mask)[real], expected[real], rtol=0, atol=1e-5)
    gate, _ = steered.gate_values(ids, mask)
    assert gate[real].eq(0.25).all() and gate[~real].eq(0).all()  # padding-only windows stay unsteered


def continuation_gated_tiny(family: str, mode: str, floor: float) -> SteeredCausalLM:
    """A tiny model gated by continuation probes (its context probes differ), with a floor."""
    steered = steered_tiny(family)
    steered.set_gate(GateSettings("smooth"), random_probes(steered, seed=9))  # context probes, not read below
    steered.set_gate(GateSettings("smooth", heads=6, window=3, probes="continuation"), random_probes(steered, scale=2.0))
    ids = random_ids(4, 12, seed=11)
    threshold = separating_threshold(steered.gate_values(ids)[1])
    steered.set_gate(GateSettings(mode, threshold=threshold, temperature=0.02, heads=6, window=3, floor=floor,
                                  probes="continuation"))
    return steered


@pytest.mark.parametrize("mode", ["hard", "smooth"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_continuation_probes_and_a_floor_keep_the_samplers_guarantees(family, mode):
    steered = continuation_gated_tiny(family, mode, floor=0.2)
    ids, mask = left_pad([random_ids(1, 12, seed=12)[0], random_ids(1, 9, seed=13)[0]])
    assert_cached_steps_equal_a_full_forward(steered, ids, mask)
    arch = steered.architecture
    prompt, other = [5, 9, 14, 3], [40, 41, 42, 43, 44, 45, 46, 47]
    settings, batch, keys = SamplingSettings(num_samples=2, max_new_tokens=10), [other, prompt, other, [60, 61]], "opqr"
    alone = sample(steered, arch, [prompt], ["p"], settings, 0, [2], width=8).tokens
    assert sample(steered, arch, batch, list(keys), settings, 0, [2], width=8).tokens[1] == alone[0]


def test_the_gate_reads_the_probe_set_its_settings_name_and_the_digest_follows_it():
    steered = steered_tiny("llama")
    context, continuation = random_probes(steered, seed=3), random_probes(steered, seed=4)
    steered.set_gate(GateSettings("smooth", heads=5, window=3), context)
    ids, mask = left_pad([random_ids(1, 7, seed=4)[0], random_ids(1, 5, seed=5)[0]])
    on_context = steered.steering_digest()
    settings = GateSettings("smooth", heads=5, window=3, probes="continuation")
    with pytest.raises(ValueError, match="probes 'continuation' needs the continuation probes.*destein gate"):
        steered.set_gate(settings)
    steered.set_gate(settings, continuation)
    assert steered.gate_probes is context and steered.continuation_probes is continuation
    real = mask.bool()
    expected = hand_scores("llama", continuation, settings, ids, mask)
    torch.testing.assert_close(steered.gate_values(ids, mask)[1][real], expected[real], rtol=0, atol=1e-5)
    assert steered.steering_digest() != on_context
    steered.set_gate(GateSettings("smooth", heads=5, window=3))
    assert steered.steering_digest() == on_context


def test_a_checkpoint_gated_by_continuation_probes_loads_them_and_refuses_to_lack_them():
    steered = steered_tiny("llama")
    context, continuation = random_probes(steered, seed=3), random_probes(steered, seed=4)
    settings = GateSettings("smooth", floor=0.1, probes="continuation")
    metadata = {"format": "destein-pl/1", "architecture": steered.signature(),
                "options": {"fusion": "paper", "gate": settings.metadata()}}
    tensors = {**steered.steering_tensors(), **context.arrays("gate_probe_")}
    with pytest.raises(CheckpointError, match="x.ckpt: gate 'smooth' needs the continuation probes "
                                              "\\(continuation_probe_\\*\\)"):
        steered.load_steering(tensors, metadata, "x.ckpt")
    fresh = steered_tiny("llama")
    fresh.load_steering({**tensors, **{f"probes.{k}": v for k, v in continuation.arrays("continuation_probe_").items()}},
                        metadata, "x.ckpt")
    assert fresh.gate == settings
    assert torch.equal(fresh.continuation_probes.coef, continuation.coef)
    assert torch.equal(fresh.gate_probes.coef, context.coef)
