"""Several processes, as a user runs them (`destein fit|test --trainer.devices 2 --trainer.strategy ...`, gloo on the
CPU): DDP replicas and `destein_fsdp` shards give what one process gives, with a sharded perplexity model of
another size, on an uneven split, and after a kill."""

import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy
from safetensors.torch import load_file

from destein_pl.lightning.module import DeSteinModule
from tests.conftest import (
    RTP100,
    SHARED_DATA,
    assert_same_generations,
    assert_same_metrics,
    generations,
    metrics,
    save_tiny_model_dir,
)

STRATEGIES = ["ddp", "destein_fsdp"]
CLI = [sys.executable, "-m", "destein_pl.lightning.cli"]


def _trainer_args(devices: int, strategy: str) -> list[str]:
    return ["--trainer.accelerator", "cpu", "--trainer.devices", str(devices), "--trainer.logger", "false",
            "--trainer.strategy", strategy if devices > 1 else "auto"]


def _fit(model_dir, out, devices=1, strategy="auto"):
    cmd = [*CLI, "fit", "--model.base_model", str(model_dir),
           "--data.pairs.source", str(SHARED_DATA / "paradetox" / "paradetox.tsv"),
           "--data.pairs.m", "9", "--data.pairs.batch_size", "2", *_trainer_args(devices, strategy),
           "--trainer.callbacks", "destein_pl.lightning.callbacks.SteeringCheckpoint",
           "--trainer.callbacks.dirpath", str(out), "--trainer.callbacks.filename", "tiny"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=out.parent, timeout=600)
    return out / "tiny.ckpt"


def _test_cmd(model_dir, judge_dir, ckpt, out, devices=1, strategy="auto"):
    """7 prompts in batches of 2: over 2 processes one gets 4 prompts, the other 3 plus a repeated one."""
    return [*CLI, "test", "--model.base_model", str(model_dir), "--ckpt_path", str(ckpt),
            "--model.evaluation.output_dir", str(out), "--model.evaluation.sampling.num_samples", "3",
            "--model.evaluation.sampling.max_new_tokens", "6", "--model.evaluation.perplexity_model", str(judge_dir),
            "--model.evaluation.shard_perplexity_model", "true",
            "--data.prompts.source", str(RTP100), "--data.prompts.n", "7", "--data.prompts.batch_size", "2",
            *_trainer_args(devices, strategy)]


@pytest.fixture(scope="module")
def setup(tiny_llama_dir, tmp_path_factory):
    """A checkpoint calibrated in one process, a perplexity model of another family and size, and the one-process
    evaluation everything is compared with."""
    tmp = tmp_path_factory.mktemp("strategies")
    judge = save_tiny_model_dir("gpt2", tmp / "tiny-gpt2")
    ckpt = _fit(tiny_llama_dir, tmp / "fit-1")
    subprocess.run(_test_cmd(tiny_llama_dir, judge, ckpt, tmp / "test-1"), check=True, capture_output=True,
                   cwd=tmp, timeout=600)
    return SimpleNamespace(tmp=tmp, judge=judge, ckpt=ckpt, one=tmp / "test-1")


def _results(out):
    return json.loads((out / "results.json").read_text())


def _same_as_one_process(setup, out):
    one, two = _results(setup.one), _results(out)
    assert list(metrics(one)) == [0.0, 0.4]
    assert_same_metrics(metrics(two), metrics(one))
    for alpha in (0.0, 0.4):
        assert_same_generations(generations(out, alpha), generations(setup.one, alpha))
    assert two["runs"][0]["counts"]["prompts"]["all"] == 7
    assert not list((out / "alpha_0").glob("generations.rank*"))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_processes_evaluate_as_one(setup, tiny_llama_dir, strategy):
    out = setup.tmp / f"test-{strategy}"
    subprocess.run(_test_cmd(tiny_llama_dir, setup.judge, setup.ckpt, out, 2, strategy), check=True,
                   capture_output=True, cwd=setup.tmp, timeout=600)
    _same_as_one_process(setup, out)


@pytest.mark.slow
def test_two_processes_evaluate_a_gemma3_as_one(tmp_path):
    """Gemma 3's layout (one key/value head, sliding-window layers with a window shorter than the prompts), sharded
    over 2 processes, as the steered model and as its own sharded perplexity model."""
    model_dir = save_tiny_model_dir("gemma3", tmp_path / "tiny-gemma3")
    ckpt = _fit(model_dir, tmp_path / "fit")
    runs = {}
    for devices, strategy in ((1, "auto"), (2, "destein_fsdp")):
        runs[devices] = tmp_path / f"test-{devices}"
        subprocess.run(_test_cmd(model_dir, model_dir, ckpt, runs[devices], devices, strategy), check=True,
                       capture_output=True, cwd=tmp_path, timeout=600)
    one, two = metrics(_results(runs[1])), metrics(_results(runs[2]))
    assert_same_metrics(two, one)
    for alpha in one:
        assert_same_generations(generations(runs[2], alpha), generations(runs[1], alpha))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_processes_calibrate_as_one(setup, tiny_llama_dir, strategy):
    """m=9 pairs over 2 processes: the distributed sampler repeats one pair, which must count once."""
    one = load_file(setup.ckpt.with_suffix(".safetensors"))
    two = load_file(_fit(tiny_llama_dir, setup.tmp / f"fit-{strategy}", 2, strategy).with_suffix(".safetensors"))
    assert one.keys() == two.keys()
    torch.testing.assert_close(two["vectors"], one["vectors"], rtol=0, atol=1e-6)
    assert torch.equal(two["head_weights"], one["head_weights"])
    assert json.loads((setup.tmp / f"fit-{strategy}" / "tiny.json").read_text())["pairs"]["m"] == 9


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_to_the_same_results(setup, tiny_llama_dir):
    """Killed (SIGKILL, both processes) once the first generations are on disk, then run again: the sharded model
    and perplexity model keep in step although one process finds more of its prompts done than the other."""
    out = setup.tmp / "test-killed"
    cmd = _test_cmd(tiny_llama_dir, setup.judge, setup.ckpt, out, 2, "destein_fsdp")
    run = subprocess.Popen(cmd, cwd=setup.tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    deadline = time.monotonic() + 300
    while not any(p.stat().st_size for p in out.glob("alpha_0/generations.rank*.jsonl")):
        assert run.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    assert not (out / "results.json").exists()
    stored = sum(len(p.read_text().splitlines()) for p in out.glob("alpha_*/generations.rank*.jsonl"))
    assert 0 < stored < 16  # at most 8 prompts (one repeated) per alpha
    subprocess.run(cmd, check=True, capture_output=True, cwd=setup.tmp, timeout=600)
    _same_as_one_process(setup, out)
    assert _results(out)["runs"][0]["resumed_prompts"] > 0


def test_ddp_is_told_not_to_broadcast_the_frozen_weights(tiny_llama_dir):
    module = DeSteinModule(base_model=str(tiny_llama_dir))
    module.configure_model()
    ignored = set(module._ddp_params_and_buffers_to_ignore)
    assert "ddp_anchor" not in ignored
    names = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
    assert ignored == names - {"ddp_anchor"}
    assert any(n.endswith("steer_vectors") for n in ignored)


def test_lightnings_fsdp_strategy_is_refused_with_the_alternative(tiny_llama_dir):
    module = DeSteinModule(base_model=str(tiny_llama_dir))
    module._trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(ValueError, match="destein_fsdp"):
        module.configure_model()
