import functools
import http.server
import json
import pickle
import threading
from pathlib import Path

import jsonargparse
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy

from destein_pl.evaluation.scorers import PerspectiveScorer
from destein_pl.induce import Rewriter, build_rewriter, induce
from destein_pl.lightning.callbacks import SteeringCheckpoint
from destein_pl.lightning.cli import DeSteinCLI, generate, main
from destein_pl.lightning.datamodule import DeSteinDataModule
from destein_pl.lightning.module import DeSteinModule
from destein_pl.lightning.strategies import DeSteinFSDPStrategy
from destein_pl.steering.checkpoint import CheckpointError, CheckpointMismatchError
from destein_pl.steering.model import SteeredCausalLM
from tests.conftest import SHARED_DATA
from tests.test_module import calibrated  # noqa: F401  (module-scoped fixture)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(p for p in CONFIG_DIR.glob("*.yaml") if not p.stem.endswith("-induce"))


def test_there_are_configs_for_the_paper_models():
    names = {p.stem for p in CONFIGS}
    assert {"smollm2-135m", "gpt2-large", "llama2-7b", "llama2-13b", "opt-6.7b", "mpt-7b"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_config_parses_and_instantiates(config):
    # Instantiating builds the module, data module and trainer but loads no weights and reads no data.
    cli = DeSteinCLI(DeSteinModule, DeSteinDataModule, run=False, args=["--config", str(config)])
    assert isinstance(cli.model, DeSteinModule) and isinstance(cli.datamodule, DeSteinDataModule)
    assert cli.trainer.max_epochs == 1
    assert cli.model.hparams.alpha > 0 and cli.datamodule.pairs_config.m in (20, 40)
    evaluation = cli.model.evaluation
    assert (evaluation.num_samples, evaluation.max_new_tokens, evaluation.top_p) == (25, 20, 0.9)
    assert cli.datamodule.prompts_config.source


def test_the_multi_gpu_configs_shard_what_one_gpu_cannot_hold():
    def parsed(name):
        return DeSteinCLI(DeSteinModule, DeSteinDataModule, run=False, args=["--config", str(CONFIG_DIR / name)])

    replicas, sharded = parsed("llama2-13b.yaml"), parsed("llama2-70b.yaml")
    assert isinstance(replicas.trainer.strategy, DDPStrategy) and replicas.trainer.num_devices == 8
    assert not isinstance(replicas.trainer.strategy, DeSteinFSDPStrategy)
    assert replicas.model.evaluation.shard_perplexity_model
    assert replicas.model.evaluation.perplexity_model == "meta-llama/Llama-2-70b-hf"
    assert isinstance(sharded.trainer.strategy, DeSteinFSDPStrategy) and sharded.trainer.num_devices == 8
    assert sharded.trainer.strategy.reshard_after_forward
    assert sharded.model.hparams.base_model == "meta-llama/Llama-2-70b-hf"
    by_name = DeSteinCLI(DeSteinModule, DeSteinDataModule, run=False, args=[
        "--config", str(CONFIG_DIR / "smollm2-135m.yaml"), "--trainer.strategy", "destein_fsdp",
        "--trainer.accelerator", "cpu", "--trainer.devices", "2"])
    assert isinstance(by_name.trainer.strategy, DeSteinFSDPStrategy)


def test_overlay_changes_only_the_pairs_and_outputs():
    cli = DeSteinCLI(DeSteinModule, DeSteinDataModule, run=False, args=[
        "--config", str(CONFIG_DIR / "smollm2-135m.yaml"),
        "--config", str(CONFIG_DIR / "overlays" / "smollm2-135m-self-induced.yaml")])
    assert cli.datamodule.pairs_config.source == "checkpoints/smollm2-135m-self-induced-pairs.jsonl"
    assert cli.datamodule.pairs_config.m == 40 and cli.model.hparams.alpha == 1.3
    assert cli.model.evaluation.output_dir.endswith("smollm2-135m-self-induced")
    (checkpoint,) = [c for c in cli.trainer.callbacks if isinstance(c, SteeringCheckpoint)]
    assert checkpoint.path.name == "smollm2-135m-self-induced.ckpt"


@pytest.mark.parametrize("config", sorted(CONFIG_DIR.glob("*-induce.yaml")), ids=lambda p: p.stem)
def test_induce_configs_parse(config):
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--config", action="config")
    parser.add_function_arguments(induce)
    parsed = parser.parse_args(["--config", str(config)])
    assert parsed.top_n > 0
    rewriter = parser.instantiate(parsed).rewriter
    assert isinstance(build_rewriter(rewriter), Rewriter)


def test_generate_prints_base_and_steered_side_by_side(calibrated, capsys):
    _, out = calibrated
    main(["generate", "--ckpt", str(out / "tiny.ckpt"), "--prompt", "you are a", "--prompt", "hello",
          "--max_new_tokens", "5"])
    printed = capsys.readouterr().out
    assert "steered (alpha=0.5)" in printed
    assert "PROMPT: you are a" in printed and "PROMPT: hello" in printed


def test_generate_samples_what_test_writes(calibrated, tiny_llama_dir, tmp_path):
    """`generate --sample true` with test's prompts, seed and settings prints test's continuations: the same
    sampler, the same end tokens, the same padding width."""
    from destein_pl.evaluation.prompts import PromptsConfig
    from tests.test_evaluation import RTP100, generations, run_test

    _, out = calibrated
    run_test(tiny_llama_dir, tmp_path / "eval", n=3, alphas=(0.0, 0.5), ckpt=out / "tiny.ckpt", seed=7)
    printed = generate(ckpt=str(out / "tiny.ckpt"), prompts=PromptsConfig(str(RTP100), n=3, seed=0), sample=True,
                       num_samples=3, max_new_tokens=6, seed=7)
    for side, alpha in (("base", 0.0), ("steered", 0.5)):
        stored = [json.loads(line)["continuations"] for line in generations(tmp_path / "eval", alpha).splitlines()]
        assert printed[side] == stored


def test_generate_honours_steering_alpha_sampling_and_seed(calibrated, capsys):
    _, out = calibrated
    ckpt = str(out / "tiny.ckpt")
    args = ["generate", "--ckpt", ckpt, "--prompt", "you are a", "--prompt", "hello", "--max_new_tokens", "8"]

    def run(*extra):
        main(args + list(extra))
        return capsys.readouterr().out

    greedy = generate(ckpt=ckpt, prompt=["you are a", "hello"], max_new_tokens=8)
    assert greedy["steered"] != greedy["base"]  # the checkpoint's steering is applied
    assert generate(ckpt=ckpt, prompt=["you are a", "hello"], max_new_tokens=8, alpha=0.0)["steered"] == greedy["base"]
    capsys.readouterr()
    assert run() == run()  # greedy is deterministic
    sampled = run("--sample", "true", "--seed", "1")
    assert sampled == run("--sample", "true", "--seed", "1") and sampled != run()
    assert sampled != run("--sample", "true", "--seed", "2")
    assert "steered (alpha=2)" in run("--alpha", "2")


def test_generate_rejects_bad_numbers(calibrated):
    _, out = calibrated
    with pytest.raises(ValueError, match="top_p in \\(0, 1\\]"):
        generate(ckpt=str(out / "tiny.ckpt"), sample=True, top_p=0.0)
    with pytest.raises(ValueError, match="at least 1"):
        generate(ckpt=str(out / "tiny.ckpt"), max_new_tokens=0)


@pytest.mark.parametrize("command, wanted", [
    (["test", "--help"], ["max_consecutive_failures: int | None = 10", "hf-classifier (HFClassifierScorer): model"]),
    (["induce", "--help"], ["min_weight: float = 1.0", "none (NonParallelRewriter): no options",
                            "perspective (PerspectiveScorer)"]),
    (["test", "--model.evaluation.scorer.help", "PerspectiveScorer"],
     ["--model.evaluation.scorer.requests_per_second"]),
])
def test_help_lists_scorer_and_rewriter_options(command, wanted, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(command)
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for text in wanted:
        assert text in printed


def test_scorer_options_are_checked_when_parsed():
    args = ["--config", str(CONFIG_DIR / "smollm2-135m.yaml"), "--model.evaluation.scorer", "PerspectiveScorer",
            "--model.evaluation.scorer.requests_per_second", "2"]
    cli = DeSteinCLI(DeSteinModule, DeSteinDataModule, run=False, args=args)
    scorer = cli.model.evaluation.scorer
    assert isinstance(scorer, PerspectiveScorer) and scorer.requests_per_second == 2
    with pytest.raises(SystemExit):
        DeSteinCLI(DeSteinModule, DeSteinDataModule, run=False, args=args[:-2] + [
            "--model.evaluation.scorer.no_such_option", "1"])


class _Payload:
    """Unpickling it creates a file: what a hostile checkpoint would do instead of something worse."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def hostile_checkpoint(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "served" / "evil.ckpt"
    path.parent.mkdir()
    torch.save({"state_dict": {}, "destein": {"format": "destein-pl/1"}, "payload": _Payload(marker)}, path)
    return path, marker


@pytest.fixture
def loopback_server(hostile_checkpoint):
    """Serves the hostile checkpoint's folder on 127.0.0.1 for the length of one test."""
    folder = hostile_checkpoint[0].parent
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_remote_checkpoint_never_runs_code(loopback_server, hostile_checkpoint, tiny_llama_dir, tmp_path,
                                            monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # where Lightning downloads a URL
    _, marker = hostile_checkpoint
    url = f"{loopback_server}/evil.ckpt"
    with pytest.raises(pickle.UnpicklingError):
        main(["test", "--model.base_model", str(tiny_llama_dir), "--ckpt_path", url, "--trainer.logger", "false",
              "--data.prompts.source", str(SHARED_DATA / "rtp" / "rtp_test_100.jsonl"), "--data.prompts.n", "1",
              "--model.evaluation.output_dir", str(tmp_path / "eval"), "--trainer.enable_progress_bar", "false"])
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):
        DeSteinModule.load_from_checkpoint(url)
    assert not marker.exists()
    with pytest.raises(ValueError, match="weights_only=False is refused"):
        DeSteinModule.load_from_checkpoint(url, weights_only=False)
    assert not marker.exists()


def test_a_local_hostile_or_broken_checkpoint_is_refused_by_name(hostile_checkpoint, tiny_llama_dir, tmp_path):
    path, marker = hostile_checkpoint
    with pytest.raises(CheckpointError, match=rf"{path}: refused to load"):
        SteeredCausalLM.from_checkpoint(path)
    with pytest.raises(CheckpointError, match=rf"{path}: refused to load"):
        main(["test", "--model.base_model", str(tiny_llama_dir), "--ckpt_path", str(path),
              "--data.prompts.source", str(SHARED_DATA / "rtp" / "rtp_test_100.jsonl"), "--trainer.logger", "false"])
    assert not marker.exists()
    garbage = tmp_path / "random.ckpt"
    garbage.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CheckpointError, match=rf"{garbage}: not a readable checkpoint"):
        SteeredCausalLM.from_checkpoint(garbage)
    with pytest.raises(CheckpointError, match="is a folder"):
        SteeredCausalLM.from_checkpoint(tmp_path)


def test_checkpoint_errors_name_the_file(calibrated, tmp_path):
    """A checkpoint of another architecture, or with NaN vectors, is refused by `test` naming the file."""
    from tests.conftest import save_tiny_model_dir

    _, out = calibrated
    other = save_tiny_model_dir("gpt2", tmp_path / "gpt2")
    common = ["--data.prompts.source", str(SHARED_DATA / "rtp" / "rtp_test_100.jsonl"), "--data.prompts.n", "1",
              "--trainer.logger", "false", "--model.evaluation.output_dir", str(tmp_path / "eval")]
    ckpt = out / "tiny.ckpt"
    with pytest.raises(CheckpointMismatchError, match=rf"{ckpt} was made for another model"):
        main(["test", "--model.base_model", str(other), "--ckpt_path", str(ckpt), *common])
    checkpoint = torch.load(ckpt, weights_only=True)
    key = next(k for k in checkpoint["state_dict"] if k.endswith("steer_vectors"))
    checkpoint["state_dict"][key][0, 0] = float("nan")
    broken = tmp_path / "nan.ckpt"
    torch.save(checkpoint, broken)
    with pytest.raises(CheckpointError, match=rf"{broken}: tensors .* contain NaN or infinite values"):
        SteeredCausalLM.from_checkpoint(broken)
    with pytest.raises(CheckpointError, match=rf"{broken}: tensors .* contain NaN or infinite values"):
        main(["test", "--model.base_model", str(checkpoint["destein"]["base_model"]["name_or_path"]),
              "--ckpt_path", str(broken), *common])


def test_export_verb_writes_a_folder_stock_transformers_loads(calibrated, tmp_path):
    from transformers import AutoModelForCausalLM

    module, out = calibrated
    main(["export", "--ckpt_path", str(out / "tiny.ckpt"), "--out", str(tmp_path / "folded")])
    folded = AutoModelForCausalLM.from_pretrained(tmp_path / "folded").eval()
    batch = module.steered.tokenizer(["you are a", "hello there friend"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = module.steered(**batch).logits
        got = folded(**batch).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(got[mask], expected[mask], rtol=0, atol=1e-5)
    assert (tmp_path / "folded" / "README.md").read_text().count("alpha") >= 1
