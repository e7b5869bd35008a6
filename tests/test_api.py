"""The plain-Python API end to end on the embedded model, as the README shows it: calibrate -> steer -> generate
-> evaluate, with no Trainer; then `destein test` on the saved steering gives the same metrics."""

import json
from pathlib import Path

import pytest
import torch

from destein_pl import (
    CalibrationOptions,
    EvaluationConfig,
    PairsConfig,
    PromptsConfig,
    SteeredCausalLM,
    calibrate,
    evaluate,
    load_base_model,
    load_pairs,
    load_prompts,
)
from destein_pl.calibration.pairs import pairs_provenance
from destein_pl.lightning.cli import main
from destein_pl.steering.checkpoint import read_checkpoint
from tests.conftest import RTP100, SHARED_DATA, small_sampling

REPO = Path(__file__).resolve().parents[1]
PARADETOX = SHARED_DATA / "paradetox" / "paradetox.tsv"
SETTINGS = {"sampling": small_sampling(max_new_tokens=8), "alphas": [0.0, 1.3]}


@pytest.mark.slow
def test_calibrate_generate_evaluate_without_a_trainer_equals_destein_test(tmp_path):
    # calibrate: the shipped checkpoint's pairs and options, so the result must reproduce it
    model, tokenizer = load_base_model("smollm2-135m")
    steered = SteeredCausalLM(model, tokenizer)
    pairs_config = PairsConfig(source=str(PARADETOX), m=40, seed=0)
    calibration = calibrate(steered, load_pairs(pairs_config), CalibrationOptions(alpha=1.3),
                            provenance=pairs_provenance(pairs_config), progress=False)
    shipped, metadata = read_checkpoint(REPO / "checkpoints" / "smollm2-135m-paradetox.safetensors")
    torch.testing.assert_close(calibration.vectors, shipped["vectors"], rtol=0, atol=1e-5)
    torch.testing.assert_close(calibration.head_weights, shipped["head_weights"], rtol=0, atol=1e-5)
    assert calibration.pairs["sha256"] == metadata["pairs"]["sha256"]
    saved = calibration.save(tmp_path / "notebook", steered)

    # steer and generate: the steering is on the model, alpha 0 is the base model
    batch = tokenizer(["You are such a stupid"], return_tensors="pt", padding=True)
    steered_ids = steered.generate(**batch, max_new_tokens=10, do_sample=False)
    steered.alpha = 0.0
    base_ids = steered.generate(**batch, max_new_tokens=10, do_sample=False)
    steered.alpha = calibration.alpha
    assert not torch.equal(steered_ids, base_ids)

    # evaluate in this process
    prompts = load_prompts(PromptsConfig(source=str(RTP100), n=3, seed=0))
    ours = evaluate(steered, prompts, EvaluationConfig(output_dir=str(tmp_path / "notebook-eval"), **SETTINGS),
                    progress=False, verbose=False)

    # the same steering, prompts and settings through the command line
    main(["test", "--config", str(REPO / "configs" / "smollm2-135m.yaml"), "--ckpt_path", str(saved),
          "--data.prompts.source", str(RTP100), "--data.prompts.n", "3", "--trainer.logger", "false",
          "--model.evaluation.output_dir", str(tmp_path / "cli-eval"),
          "--model.evaluation.sampling.num_samples", "3", "--model.evaluation.sampling.max_new_tokens", "8",
          "--model.evaluation.alphas", "[0, 1.3]", "--trainer.enable_progress_bar", "false"])
    cli = json.loads((tmp_path / "cli-eval" / "results.json").read_text())
    assert [r["metrics"] for r in cli["runs"]] == [r["metrics"] for r in ours["runs"]]
    assert [r["counts"] for r in cli["runs"]] == [r["counts"] for r in ours["runs"]]
    for alpha in ("0", "1.3"):
        assert ((tmp_path / "cli-eval" / f"alpha_{alpha}" / "generations.jsonl").read_text()
                == (tmp_path / "notebook-eval" / f"alpha_{alpha}" / "generations.jsonl").read_text())
