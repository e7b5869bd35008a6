"""Evaluation as a Lightning test: split invariance, resume, and a metric that moves with steering."""

import json
import subprocess
import sys

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM

from destein_pl.evaluation.config import EvaluationConfig
from destein_pl.evaluation.prompts import PromptsConfig
from destein_pl.evaluation.scorers import ToxicityScorer
from destein_pl.files import read_jsonl as read_records
from destein_pl.lightning.datamodule import DeSteinDataModule
from destein_pl.lightning.module import DeSteinModule
from tests.conftest import SHARED_DATA
from tests.test_module import calibrated  # noqa: F401  (module-scoped fixture)

RTP100 = SHARED_DATA / "rtp" / "rtp_test_100.jsonl"
SMALL = dict(num_samples=3, max_new_tokens=6)


def run_test(model_dir, out, *, batch_size=4, n=6, alphas=(0.0, 1.0), ckpt=None, scorer=None, callbacks=(),
             steering=None, **evaluation):
    if scorer is not None:
        evaluation["scorer"] = scorer
    module = DeSteinModule(base_model=str(model_dir), evaluation=EvaluationConfig(
        output_dir=str(out), alphas=list(alphas), **{**SMALL, **evaluation}))
    if steering is not None:
        module.configure_model()
        module.steered.set_steering(*steering)
    data = DeSteinDataModule(prompts=PromptsConfig(str(RTP100), n=n, seed=0, batch_size=batch_size))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=list(callbacks))
    trainer.test(module, data, ckpt_path=ckpt, verbose=False)
    return json.loads((out / "results.json").read_text())


def generations(out, alpha):
    return (out / f"alpha_{alpha:g}" / "generations.jsonl").read_text()


def metrics(results):
    return {r["alpha"]: r["metrics"] for r in results["runs"]}


def test_results_do_not_depend_on_batch_size(calibrated, tiny_llama_dir, tmp_path):
    _, ckpt_dir = calibrated
    ckpt = ckpt_dir / "tiny.ckpt"
    one = run_test(tiny_llama_dir, tmp_path / "b1", batch_size=1, ckpt=ckpt)
    four = run_test(tiny_llama_dir, tmp_path / "b4", batch_size=4, ckpt=ckpt)
    for alpha in (0.0, 1.0):
        assert generations(tmp_path / "b1", alpha) == generations(tmp_path / "b4", alpha)
    assert metrics(one) == metrics(four)
    records = read_records(tmp_path / "b4" / "alpha_1" / "generations.jsonl")
    assert [r["index"] for r in records] == list(range(6))
    assert all(len(r["continuations"]) == len(r["toxicity"]) == len(r["perplexity"]) == 3 for r in records)
    assert one["runs"][0]["counts"]["prompts"]["all"] == 6
    # the steered continuations differ from the base ones: the checkpoint's steering is applied
    assert generations(tmp_path / "b1", 0.0) != generations(tmp_path / "b1", 1.0)


class Interrupt(L.Callback):
    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 1:
            raise RuntimeError("interrupted")


def test_resume_after_an_interruption_gives_the_same_results(calibrated, tiny_llama_dir, tmp_path):
    _, ckpt_dir = calibrated
    ckpt = ckpt_dir / "tiny.ckpt"
    whole = run_test(tiny_llama_dir, tmp_path / "whole", batch_size=2, ckpt=ckpt)
    with pytest.raises(RuntimeError, match="interrupted"):
        run_test(tiny_llama_dir, tmp_path / "cut", batch_size=2, ckpt=ckpt, callbacks=[Interrupt()])
    assert len(read_records(tmp_path / "cut" / "alpha_0" / "generations.jsonl")) == 4
    resumed = run_test(tiny_llama_dir, tmp_path / "cut", batch_size=2, ckpt=ckpt)
    assert [(r["resumed_prompts"], r["generated_prompts"]) for r in resumed["runs"]] == [(4, 2), (4, 2)]
    assert metrics(resumed) == metrics(whole)
    for alpha in (0.0, 1.0):
        assert generations(tmp_path / "cut", alpha) == generations(tmp_path / "whole", alpha)
    with pytest.raises(ValueError, match="other settings"):
        run_test(tiny_llama_dir, tmp_path / "cut", batch_size=2, ckpt=ckpt, max_new_tokens=7)


@pytest.mark.slow
def test_one_and_two_processes_give_the_same_generations(calibrated, tiny_llama_dir, tmp_path):
    """5 prompts over 2 processes: the distributed sampler repeats one, which must count once."""
    _, ckpt_dir = calibrated

    def run(devices, out):
        cmd = [
            sys.executable, "-m", "destein_pl.lightning.cli", "test", "--model.base_model", str(tiny_llama_dir),
            "--ckpt_path", str(ckpt_dir / "tiny.ckpt"), "--model.evaluation.output_dir", str(out),
            "--model.evaluation.num_samples", "3", "--model.evaluation.max_new_tokens", "6",
            "--data.prompts.source", str(RTP100), "--data.prompts.n", "5", "--data.prompts.batch_size", "2",
            "--trainer.accelerator", "cpu", "--trainer.devices", str(devices), "--trainer.logger", "false",
            "--trainer.strategy", "ddp" if devices > 1 else "auto",
        ]
        subprocess.run(cmd, check=True, capture_output=True, cwd=tmp_path, timeout=600)
        return json.loads((out / "results.json").read_text())

    one, two = run(1, tmp_path / "one"), run(2, tmp_path / "two")
    assert list(metrics(one)) == [0.0, 0.5]  # by default: the base model and the checkpoint's alpha
    assert metrics(one) == metrics(two)
    for alpha in (0.0, 0.5):
        assert generations(tmp_path / "one", alpha) == generations(tmp_path / "two", alpha)
    assert two["runs"][0]["counts"]["prompts"]["all"] == 5
    assert not list((tmp_path / "two" / "alpha_0").glob("generations.rank*"))


class FlagToken(ToxicityScorer):
    """Toxicity 1 for a text containing the chosen token, else 0."""

    name = "flag-token"

    def __init__(self, tokenizer, token_id):
        self.tokenizer, self.token_id = tokenizer, token_id

    def _score(self, texts):
        return [float(self.token_id in self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


def test_steering_away_from_a_flagged_token_lowers_emt(tiny_llama_dir, tmp_path):
    """A tiny model made to like token X, and a vector that lowers X's logit: the whole pipeline
    (sampling, scoring, metrics) must show lower EMT when steered."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    x = tokenizer(" hello", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        batch = tokenizer(["a b c", "the cat", "you are", "one two three four"], return_tensors="pt", padding=True)
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1][:, -1]  # after the final norm
        direction = hidden.mean(0)
        model.lm_head.weight[x] = 12 * direction / direction.norm() ** 2  # logit of X near 12: sampled often
    liking = tmp_path / "likes-x"
    model.save_pretrained(liking)
    tokenizer.save_pretrained(liking)

    w_o = model.model.layers[-1].self_attn.o_proj.weight  # [hidden, heads * head_dim]
    push = -(w_o.T @ model.lm_head.weight[x]).detach()  # lowers X's logit through the last layer's projection
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    vectors = torch.zeros(layers, heads, push.numel() // heads)
    vectors[-1] = (push / push.norm()).view(heads, -1)
    steering = (vectors, torch.ones(layers, heads))

    results = run_test(liking, tmp_path / "eval", alphas=(0.0, 30.0), steering=steering, n=8, num_samples=5,
                       scorer=FlagToken(tokenizer, x))
    emt = {r["alpha"]: r["metrics"]["all"]["emt"] for r in results["runs"]}
    assert emt[0.0] >= 0.5
    assert emt[30.0] < emt[0.0] - 0.3
