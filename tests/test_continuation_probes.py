"""Continuation probes and `destein gate`: the soft-label probes against an independent fit, the labels against the
stored continuations, the gate's score against the features the probes were fit on, and what the verb writes,
resumes and refuses."""

import json

import numpy as np
import pytest
import torch

from destein_pl import SteeredCausalLM
from destein_pl.calibration.continuation_gate import gate, gate_prompts
from destein_pl.calibration.continuation_probes import (
    ContinuationProbeOptions,
    best_threshold,
    fit_soft_probes,
)
from destein_pl.calibration.pairs import PairsConfig
from destein_pl.evaluation.prompts import read_prompts
from destein_pl.evaluation.sampling import SamplingSettings
from destein_pl.steering.checkpoint import read_checkpoint
from destein_pl.steering.gating import GateSettings
from tests.conftest import RTP100, refusal


def soft_data(seed: int = 0, n: int = 80, heads: int = 2, dim: int = 3):
    """Features `[n, 1, heads, dim]` and labels in quarters, toxic where head 1's first feature is high."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, 1, heads, dim, generator=g)
    labels = (torch.sigmoid(3 * features[:, 0, 1, 0]) * 4).round() / 4
    return features, labels


def test_soft_probes_are_the_fit_on_each_continuation_counted_as_an_example():
    from sklearn.linear_model import LogisticRegression

    features, labels = soft_data()
    train, val = np.arange(60), np.arange(60, 80)
    probes = fit_soft_probes(features, labels, train, val)
    # independently: 4 continuations per prompt, each a row of its own with a 0/1 label; 4 times the loss of the
    # weighted fit, so the same optimum at a quarter of the inverse regularization C
    for head in range(2):
        x, y = [], []
        for i in train:
            toxic = round(float(labels[i]) * 4)
            x += [features[i, 0, head].double().numpy()] * 4
            y += [1] * toxic + [0] * (4 - toxic)
        reference = LogisticRegression(C=0.25, max_iter=1000, tol=1e-10).fit(np.array(x), np.array(y))
        np.testing.assert_allclose(probes.coef[0, head].numpy(), reference.coef_[0], rtol=0, atol=2e-3)
        np.testing.assert_allclose(float(probes.intercept[0, head]), reference.intercept_[0], rtol=0, atol=2e-3)
    # the validation AUROC by hand: over every (toxic continuation, non-toxic continuation) of the validation
    # prompts, how often the toxic one's prompt scores higher (ties count half)
    head = 1
    scores = features[val, 0, head] @ probes.coef[0, head] + probes.intercept[0, head]
    p = labels[val]
    wins = total = 0.0
    for i in range(len(val)):
        for j in range(len(val)):
            weight = float(p[i] * (1 - p[j]))
            total += weight
            wins += weight * (1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0)
    assert float(probes.accuracy[0, head]) == pytest.approx(wins / total, abs=1e-6)
    assert probes.accuracy[0, 1] > 0.8 > probes.accuracy[0, 0]  # the planted head ranks first
    assert probes.top_heads(1) == [(0, 1)]


def test_soft_probes_need_both_kinds_of_continuation():
    features, labels = soft_data()
    with pytest.raises(ValueError, match="validation prompts' continuations are all toxic or all non-toxic"):
        fit_soft_probes(features, labels.clamp(max=0) + (torch.arange(80) < 60).float() * labels, np.arange(60),
                        np.arange(60, 80))


def test_best_threshold_maximises_balanced_accuracy():
    assert best_threshold([0.1, 0.2, 0.3, 0.9], [False, False, True, True]) == 0.3
    assert best_threshold([0.1, 0.5, 0.6, 0.7], [True, False, True, True]) == 0.6  # 2/3 + 1 beats 1 + 0
    with pytest.raises(ValueError, match="validation prompts with a toxic continuation and prompts without one; got 2 "
                                         "with and 0 without"):
        best_threshold([0.1, 0.2], [True, True])


def test_gate_writes_a_checkpoint_whose_gate_reads_the_continuation_probes(continuation_gated):
    folder, out, run = continuation_gated
    source_tensors, source_meta = read_checkpoint(folder / "tiny.ckpt")
    for path in (out, out.with_suffix(".safetensors")):
        steered = SteeredCausalLM.from_checkpoint(path)
        assert steered.gate.mode == "smooth" and steered.gate.probes == "continuation"
        assert steered.continuation_probes is not None
        torch.testing.assert_close(steered.gate_probes.coef, source_tensors["probes.gate_probe_coef"])
    tensors, metadata = read_checkpoint(out)
    assert torch.equal(tensors["steered.model.model.layers.0.self_attn.steer_vectors"],
                       source_tensors["steered.model.model.layers.0.self_attn.steer_vectors"])
    provenance = metadata["continuation_probes"]
    assert provenance["prompts"] == 40 and provenance["samples"] == 3 and provenance["toxic_at"] == 0.1
    assert metadata["options"]["gate"]["threshold"] == steered.gate.threshold
    assert metadata["pairs"] == source_meta["pairs"]
    # the labels are the stored continuations' shares of toxic scores
    records = [json.loads(line) for line in (run / "alpha_0" / "generations.jsonl").read_text().splitlines()]
    assert len(records) == 40 and all(len(r["toxicity"]) == 3 for r in records)
    shares = [sum(t >= 0.1 for t in r["toxicity"]) / 3 for r in records]
    assert provenance["toxic_share"] == pytest.approx(sum(shares) / 40, abs=1e-6)
    assert 0 < provenance["toxic_share"] < 1
    # the gate's score at a prompt's last token is the probes on the prompt's feature they were fit on
    prompt = steered.tokenizer(records[0]["prompt"], return_tensors="pt")
    _, score = steered.gate_values(prompt["input_ids"])
    steered.alpha = 0.0
    feature = steered.record_activations(prompt["input_ids"], last_k=8)
    probes = steered.continuation_probes
    heads = probes.top_heads(steered.gate.heads)
    expected = torch.stack([torch.sigmoid(feature[0, la, h] @ probes.coef[la, h] + probes.intercept[la, h])
                            for la, h in heads]).mean()
    torch.testing.assert_close(score[0, -1], expected, rtol=0, atol=1e-6)


def test_a_rerun_reuses_the_continuations_and_fits_the_same_probes(continuation_gated, tmp_path):
    folder, out, run = continuation_gated
    stored = (run / "alpha_0" / "generations.jsonl").read_bytes()
    again = gate(str(folder / "tiny.ckpt"), str(tmp_path / "again.safetensors"), [str(RTP100)], n=40,
                 output_dir=str(run), options=ContinuationProbeOptions(
                     sampling=SamplingSettings(num_samples=3, max_new_tokens=6), toxic_at=0.1))
    assert (run / "alpha_0" / "generations.jsonl").read_bytes() == stored
    first, second = read_checkpoint(out)[0], read_checkpoint(again)[0]
    assert torch.equal(first["probes.continuation_probe_coef"], second["continuation_probe_coef"])


def test_exclude_and_pairs_choose_the_prompts(tmp_path):
    rtp = read_prompts(RTP100)
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"id": p.id, "text": p.text}) + "\n" for p in rtp[:30]))
    renamed = tmp_path / "renamed.jsonl"  # the same texts under other ids are left out too
    renamed.write_text("".join(json.dumps({"id": f"x{i}", "text": p.text}) + "\n" for i, p in enumerate(rtp[30:40])))
    chosen = gate_prompts([str(RTP100)], [str(held), str(renamed)], None, None, 0)
    assert [p.id for p in chosen] == [p.id for p in rtp[40:]]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"toxic": f"bad {i}", "nontoxic": f"good {i}"}) + "\n" for i in range(5)))
    with_pairs = gate_prompts([str(RTP100)], [], PairsConfig(str(pairs), m=3, seed=0), None, 0)
    added = [p for p in with_pairs if p.id.startswith("pairs:")]
    assert len(added) == 6 and {p.text.split()[0] for p in added} == {"bad", "good"}
    assert len(gate_prompts([str(RTP100)], [], None, 25, 1)) == 25


def test_gate_refuses_to_replace_its_input_or_an_existing_file(calibrated, capsys, tmp_path):
    _, folder = calibrated
    ckpt = str(folder / "tiny.ckpt")
    assert "belongs to the input checkpoint" in refusal(capsys, "gate", "--ckpt_path", ckpt, "--out",
                                                        str(folder / "tiny.safetensors"), str(RTP100))
    (tmp_path / "taken.ckpt").write_text("mine")
    assert "taken.ckpt exists" in refusal(capsys, "gate", "--ckpt_path", ckpt, "--out", str(tmp_path / "taken.ckpt"),
                                          str(RTP100))
    assert (tmp_path / "taken.ckpt").read_text() == "mine"
    assert "only a .ckpt input gives" in refusal(capsys, "gate", "--ckpt_path", str(folder / "tiny.safetensors"),
                                                 "--out", str(tmp_path / "x.ckpt"), str(RTP100))
    assert "give --threshold instead" in refusal(capsys, "gate", "--ckpt_path", ckpt, "--out",
                                                 str(tmp_path / "y.ckpt"), str(RTP100), "--gate.mode", "smooth",
                                                 "--gate.threshold", "0.2")
    assert "too few" in refusal(capsys, "gate", "--ckpt_path", ckpt, "--out", str(tmp_path / "z.ckpt"), str(RTP100),
                                "--n", "5", "--output_dir", str(tmp_path / "run"))
    assert not list(tmp_path.glob("[xyz].*"))


def test_the_gate_verb_takes_a_given_threshold_floor_and_alpha(calibrated, tmp_path):
    _, folder = calibrated
    options = ContinuationProbeOptions(sampling=SamplingSettings(num_samples=2, max_new_tokens=4), toxic_at=0.1)
    for suffix in (".safetensors", ".ckpt"):
        out = gate(str(folder / "tiny.ckpt"), str(tmp_path / f"floored-{suffix[1:]}{suffix}"), [str(RTP100)], n=20,
                   output_dir=str(tmp_path / "run"), gate=GateSettings("hard", floor=0.3, heads=4), threshold=0.2,
                   temperature=0.07, alpha=0.8, options=options)
        steered = SteeredCausalLM.from_checkpoint(out)
        assert steered.gate == GateSettings("hard", threshold=0.2, temperature=0.07, floor=0.3, heads=4,
                                            probes="continuation")
        assert steered.alpha == pytest.approx(0.8) and read_checkpoint(out)[1]["alpha"] == 0.8


@pytest.mark.slow
def test_the_shipped_checkpoint_is_the_gated_steering_with_the_forward_gate_chosen_on_the_frontier():
    """`checkpoints/smollm2-135m-forward-gated.*`: the 1,000-pair steering of the gated checkpoint, gated by its
    continuation probes at the frontier's chosen setting (`forward-floor-a1.8` of benchmarks/frontier.py)."""
    from benchmarks.frontier import FLOOR, SMOLLM2, setting_name

    chosen = next(s for s in SMOLLM2.sweep if setting_name(s) == SMOLLM2.reference)
    shipped, steering = (SMOLLM2.checkpoints[k] for k in ("shipped", SMOLLM2.steering))
    tensors, meta = read_checkpoint(shipped.with_suffix(".safetensors"))
    source, _ = read_checkpoint(steering.with_suffix(".safetensors"))
    for name in ("vectors", "head_weights", "probe_coef", "gate_probe_coef"):
        assert torch.equal(tensors[name], source[name])
    assert meta["continuation_probes"]["prompts"] == 2000
    for suffix in (".ckpt", ".safetensors"):
        steered = SteeredCausalLM.from_checkpoint(shipped.with_suffix(suffix))
        assert steered.alpha == pytest.approx(chosen["alpha"])
        assert steered.gate.probes == "continuation" and steered.gate.floor == chosen["floor"] == FLOOR
        assert torch.equal(steered.continuation_probes.coef, tensors["continuation_probe_coef"])
    batch = steered.tokenizer(["You are a stupid idiot and I hate you, you", "The weather today is sunny and the"],
                              return_tensors="pt", padding=True)
    gate, _ = steered.gate_values(batch["input_ids"], batch["attention_mask"])
    assert gate[0, -1] > 0.5 > gate[1, -1] >= FLOOR  # steers the insult; the weather gets about the floor


def test_gate_refuses_continuations_of_one_kind_saying_how_many_toxic_ones_it_needs(calibrated, capsys, tmp_path):
    _, folder = calibrated
    benign = tmp_path / "benign.txt"
    benign.write_text("".join(f"The weather on day {i} was\n" for i in range(12)))
    args = ["gate", "--ckpt_path", str(folder / "tiny.ckpt"), "--out", str(tmp_path / "gated.ckpt"), str(benign),
            "--output_dir", str(tmp_path / "run"), "--options.sampling.num_samples", "2",
            "--options.sampling.max_new_tokens", "3", "--options.toxic_at", "1"]
    expected = ("0 of the 24 continuations of the 12 prompts are toxic (score >= toxic_at 1), in 0 of the 10 "
                "training prompts and 0 of the 2 validation prompts; a gate needs a toxic continuation in at least 1 "
                "training prompt and 1 validation prompt, and at least 1 validation prompt with none")
    assert refusal(capsys, *args).startswith(expected)
    assert refusal(capsys, *args, "--threshold", "0.3").startswith(expected)
    assert not list(tmp_path.glob("gated.*"))
