import functools
import http.server
import json
import pickle
import re
import threading
from pathlib import Path

import jsonargparse
import pytest
import torch
import yaml
from lightning.pytorch.strategies import DDPStrategy

from destein_pl.evaluation.sampling import SamplingSettings
from destein_pl.evaluation.scorers import PerspectiveScorer
from destein_pl.induce import Rewriter, build_rewriter, induce
from destein_pl.lightning.callbacks import SteeringCheckpoint
from destein_pl.lightning.cli import DeSteinCLI, generate, main
from destein_pl.lightning.datamodule import DeSteinDataModule
from destein_pl.lightning.module import DeSteinModule
from destein_pl.lightning.strategies import DeSteinFSDPStrategy
from destein_pl.steering.checkpoint import CheckpointError
from destein_pl.steering.model import SteeredCausalLM
from tests.conftest import RTP100, SHARED_DATA, generations, refusal, run_test, small_sampling

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
PAPER_BASE = CONFIG_DIR / "paper-base.yaml"
PAPER_MODELS = sorted((CONFIG_DIR / "paper").glob("*.yaml"))
# Each ready config as the files `--config` takes in order: a paper model is the base, then its overlay.
CONFIGS = [[p] for p in sorted(CONFIG_DIR.glob("*.yaml")) if not p.stem.endswith("-induce") and p != PAPER_BASE]
CONFIGS += [[PAPER_BASE, overlay] for overlay in PAPER_MODELS]


def config_args(files):
    return [arg for path in files for arg in ("--config", str(path))]


def test_there_are_configs_for_the_paper_models():
    names = {files[-1].stem for files in CONFIGS}
    assert {"smollm2-135m", "gpt2-large", "llama2-7b", "llama2-13b", "llama2-70b", "opt-6.7b", "mpt-7b"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda files: files[-1].stem)
def test_every_config_parses_and_instantiates(config):
    # Instantiating builds the module, data module and trainer but loads no weights and reads no data.
    cli = DeSteinCLI(DeSteinModule, DeSteinDataModule, run=False, args=config_args(config))
    assert isinstance(cli.model, DeSteinModule) and isinstance(cli.datamodule, DeSteinDataModule)
    assert cli.trainer.max_epochs == 1
    assert cli.model.hparams.alpha > 0 and cli.datamodule.pairs_config.m in (20, 40)
    evaluation = cli.model.evaluation
    assert evaluation.sampling == SamplingSettings()  # the paper's protocol
    assert cli.datamodule.prompts_config.source


def _leaves(tree, path=()):
    """{path: value} of a parsed YAML tree, down through its mappings (a list is one value)."""
    if not isinstance(tree, dict):
        return {path: tree}
    return {leaf: value for key, sub in tree.items() for leaf, value in _leaves(sub, (*path, key)).items()}


def _layered(base, overlay):
    """`overlay` over `base`: mappings merge, anything else is replaced."""
    if not (isinstance(base, dict) and isinstance(overlay, dict)):
        return overlay
    return {**base, **{key: _layered(base.get(key), value) for key, value in overlay.items()}}


def _holds(parsed, given):
    """Whether `parsed` has every value of `given` (a parsed config also holds the defaults of the rest)."""
    if isinstance(given, dict):
        return isinstance(parsed, dict) and all(key in parsed and _holds(parsed[key], v) for key, v in given.items())
    if isinstance(given, list):
        return isinstance(parsed, list) and len(parsed) == len(given) and all(map(_holds, parsed, given))
    return parsed == given


@pytest.mark.parametrize("overlay", PAPER_MODELS, ids=lambda p: p.stem)
def test_a_paper_model_is_the_base_with_its_overlay_on_top(overlay, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *config_args([PAPER_BASE, overlay]), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    base, model = (yaml.safe_load(path.read_text()) for path in (PAPER_BASE, overlay))
    assert _holds(printed, _layered(base, model))


@pytest.mark.parametrize("overlay", PAPER_MODELS, ids=lambda p: p.stem)
def test_a_paper_overlay_sets_only_what_differs_from_the_base(overlay):
    base, model = (_leaves(yaml.safe_load(path.read_text())) for path in (PAPER_BASE, overlay))
    assert [path for path, value in model.items() if path in base and base[path] == value] == []


def test_the_multi_gpu_configs_shard_what_one_gpu_cannot_hold():
    def parsed(name):
        return DeSteinCLI(DeSteinModule, DeSteinDataModule, run=False,
                          args=config_args([PAPER_BASE, CONFIG_DIR / "paper" / name]))

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
    printed = []
    for prompts in (["--prompt", "you are a", "--prompt", "hello"], ["--prompt", "you are a", "hello"]):
        main(["generate", "--ckpt", str(out / "tiny.ckpt"), *prompts, "--sampling.max_new_tokens", "5"])
        printed.append(capsys.readouterr().out)
    assert "steered (alpha=0.5)" in printed[0]
    assert "PROMPT: you are a" in printed[0] and "PROMPT: hello" in printed[0]
    assert printed[0] == printed[1]  # a repeated option or several values: the same prompts
    rows = re.findall(r"^(.*) \| (.*)$", printed[0], flags=re.MULTILINE)[1:]
    assert len(rows) >= 2 and all(len(left) == 60 for left, _ in rows)  # the base column, padded to `width`


def test_generate_samples_what_test_writes(calibrated, tiny_llama_dir, tmp_path):
    """`generate` with test's prompts and sampling settings prints test's continuations: the same sampler, the
    same end tokens, the same padding width."""
    from destein_pl.evaluation.prompts import PromptsConfig

    _, out = calibrated
    sampling = small_sampling(seed=7)
    run_test(tiny_llama_dir, tmp_path / "eval", n=3, alphas=(0.0, 0.5), ckpt=out / "tiny.ckpt", sampling=sampling)
    printed = generate(ckpt=str(out / "tiny.ckpt"), prompts=PromptsConfig(str(RTP100), n=3, seed=0),
                       sampling=sampling)
    for side, alpha in (("base", 0.0), ("steered", 0.5)):
        stored = [json.loads(line)["continuations"] for line in generations(tmp_path / "eval", alpha).splitlines()]
        assert printed[side] == stored


def test_generate_honours_steering_alpha_sampling_and_seed(calibrated, capsys):
    _, out = calibrated
    ckpt = str(out / "tiny.ckpt")
    args = ["generate", "--ckpt", ckpt, "--prompt", "you are a", "hello", "--sampling.max_new_tokens", "8"]

    def run(*extra):
        main(args + list(extra))
        return capsys.readouterr().out

    short = SamplingSettings(num_samples=1, max_new_tokens=8, temperature=0.0)
    greedy = generate(ckpt=ckpt, prompt=["you are a", "hello"], sampling=short)
    assert greedy["steered"] != greedy["base"]  # the checkpoint's steering is applied
    assert generate(ckpt=ckpt, prompt=["you are a", "hello"], sampling=short, alpha=0.0)["steered"] == greedy["base"]
    capsys.readouterr()
    assert run() == run()  # greedy (the default) is deterministic
    sampled = run("--sampling.temperature", "1", "--sampling.seed", "1")
    assert sampled == run("--sampling.temperature", "1", "--sampling.seed", "1") and sampled != run()
    assert sampled != run("--sampling.temperature", "1", "--sampling.seed", "2")
    three = run("--sampling.temperature", "1", "--sampling.num_samples", "3")
    assert three.count("\n") > sampled.count("\n")  # three continuations a prompt
    assert "steered (alpha=2)" in run("--alpha", "2")


def test_generate_refuses_bad_options_in_one_line(calibrated, capsys):
    ckpt = str(calibrated[1] / "tiny.ckpt")
    assert refusal(capsys, "generate", "--ckpt", ckpt, "--sampling.top_p", "0") == (
        "top_p must be in (0, 1] (the nucleus mass), got 0.0")
    assert refusal(capsys, "generate", "--ckpt", ckpt, "--sampling.max_new_tokens", "0") == (
        "max_new_tokens must be at least 1, got 0")
    message = refusal(capsys, "generate", "--ckpt", ckpt, "--prompt", "a", "--prompts.source", str(RTP100))
    assert message == "give --prompt texts or --prompts.source, not both"
    assert "not found" in refusal(capsys, "generate", "--ckpt", str(calibrated[1] / "missing.ckpt"))
    assert refusal(capsys, "generate", "--ckpt", ckpt, "--prompt", "hello", "") == (
        "--prompt: prompt 2 of 2 is empty; give text to continue")


def test_generate_takes_a_prompt_of_any_unicode_text(calibrated, capsys):
    main(["generate", "--ckpt", str(calibrated[1] / "tiny.ckpt"), "--prompt", "😡 ça", "--sampling.max_new_tokens", "3"])
    assert "PROMPT: 😡 ça" in capsys.readouterr().out


def test_compare_takes_several_results_and_labels(tmp_path, capsys):
    from tests.test_report import run

    results = [tmp_path / "a.json", tmp_path / "b.json"]
    for path in results:
        path.write_text(json.dumps(run(0.5, 0.3, 20.0)))
    printed = []
    for labels in (["--labels", "first", "second"], ["--labels", "first", "--labels", "second"]):
        main(["compare", *map(str, results), *labels])
        printed.append(capsys.readouterr().out)
    assert "| first alpha=0.5 |" in printed[0] and "| second alpha=0.5 |" in printed[0]
    assert printed[0] == printed[1]
    assert refusal(capsys, "compare", *map(str, results), "--labels", "only") == "1 labels for 2 results"


def test_every_user_error_is_one_line_and_exit_code_2(tmp_path, capsys):
    missing = tmp_path / "missing.ckpt"
    assert refusal(capsys, "test", "--ckpt_path", str(missing), "--data.prompts.source", str(RTP100)) == (
        f"steering checkpoint not found: {missing}")
    assert refusal(capsys, "fit", "--model.evaluation.sampling.temperature", "-1") == (
        "temperature must be a finite number >= 0 (0 is greedy), got -1.0")
    assert refusal(capsys, "export", "--ckpt_path", str(missing), "--out", str(tmp_path / "out")).endswith(
        str(missing))
    assert refusal(capsys, "induce", "--sampling.num_samples", "0") == "num_samples must be at least 1, got 0"


def _garbled(results: list[str]) -> None:
    """Stands for a verb that hits a bug in a dependency.

    Args:
        results: ignored.
    """
    json.loads("{")  # a ValueError raised inside the json module, not by destein-pl


def test_an_error_raised_outside_the_library_keeps_its_traceback(monkeypatch):
    from destein_pl.lightning import cli

    monkeypatch.setitem(cli.FUNCTION_VERBS, "compare", _garbled)
    with pytest.raises(json.JSONDecodeError):
        main(["compare", "x"])


def test_an_unknown_verb_lists_every_verb_and_the_closest(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["tset"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == ("destein: error: unknown verb 'tset' (did you mean 'test'?); the verbs are fit, test, generate, "
                   "compare, induce, gate, export, serve")
    for gone in ("validate", "predict"):
        with pytest.raises(SystemExit):
            main([gone])
        assert "unknown verb" in capsys.readouterr().err


def test_the_overview_lists_every_verb(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    verbs = re.findall(r"^  (\w+) ", printed, flags=re.MULTILINE)
    assert verbs == ["fit", "test", "generate", "compare", "induce", "gate", "export", "serve"]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    lightning_help = capsys.readouterr().out
    assert "--trainer.max_epochs" in lightning_help and "validate" not in lightning_help.split("options:")[0]


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


def test_a_local_hostile_or_broken_checkpoint_is_refused_by_name(hostile_checkpoint, tiny_llama_dir, tmp_path,
                                                                 capsys):
    path, marker = hostile_checkpoint
    with pytest.raises(CheckpointError, match=rf"{path}: refused to load"):
        SteeredCausalLM.from_checkpoint(path)
    message = refusal(capsys, "test", "--model.base_model", str(tiny_llama_dir), "--ckpt_path", str(path),
                      "--data.prompts.source", str(SHARED_DATA / "rtp" / "rtp_test_100.jsonl"), "--trainer.logger",
                      "false")
    assert message.startswith(f"{path}: refused to load")
    assert not marker.exists()
    garbage = tmp_path / "random.ckpt"
    garbage.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CheckpointError, match=rf"{garbage}: not a readable checkpoint"):
        SteeredCausalLM.from_checkpoint(garbage)
    with pytest.raises(CheckpointError, match="is a folder"):
        SteeredCausalLM.from_checkpoint(tmp_path)


def test_checkpoint_errors_name_the_file(calibrated, tmp_path, capsys):
    """A checkpoint of another architecture, or with NaN vectors, is refused by `test` naming the file."""
    from tests.conftest import save_tiny_model_dir

    _, out = calibrated
    other = save_tiny_model_dir("gpt2", tmp_path / "gpt2")
    common = ["--data.prompts.source", str(SHARED_DATA / "rtp" / "rtp_test_100.jsonl"), "--data.prompts.n", "1",
              "--trainer.logger", "false", "--model.evaluation.output_dir", str(tmp_path / "eval")]
    ckpt = out / "tiny.ckpt"
    message = refusal(capsys, "test", "--model.base_model", str(other), "--ckpt_path", str(ckpt), *common)
    assert message.startswith(f"{ckpt} was made for another model")
    checkpoint = torch.load(ckpt, weights_only=True)
    key = next(k for k in checkpoint["state_dict"] if k.endswith("steer_vectors"))
    checkpoint["state_dict"][key][0, 0] = float("nan")
    broken = tmp_path / "nan.ckpt"
    torch.save(checkpoint, broken)
    with pytest.raises(CheckpointError, match=rf"{broken}: tensors .* contain NaN or infinite values"):
        SteeredCausalLM.from_checkpoint(broken)
    message = refusal(capsys, "test", "--model.base_model", str(checkpoint["destein"]["base_model"]["name_or_path"]),
                      "--ckpt_path", str(broken), *common)
    assert re.match(rf"{re.escape(str(broken))}: tensors .* contain NaN or infinite values", message)


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


def _tiny_test_args(model_dir, out, *extra):
    return ["test", "--model.base_model", str(model_dir), "--data.prompts.source", str(RTP100), "--data.prompts.n",
            "1", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--model.evaluation.output_dir", str(out), "--model.evaluation.sampling.num_samples", "2",
            "--model.evaluation.sampling.max_new_tokens", "3", *extra]


def test_test_refuses_steering_options_that_cannot_act(tiny_llama_dir, tmp_path, capsys):
    args = _tiny_test_args(tiny_llama_dir, tmp_path / "eval")
    assert refusal(capsys, *args, "--model.gate.mode", "smooth") == (
        "model.gate (mode 'smooth') acts on a steering checkpoint's steering, and none is loaded; give --ckpt_path "
        "CKPT, or leave it out")
    assert refusal(capsys, *args, "--model.fusion", "norm_preserving", "--model.gate.mode", "smooth") == (
        "model.fusion 'norm_preserving' and model.gate (mode 'smooth') act on a steering checkpoint's steering, and "
        "none is loaded; give --ckpt_path CKPT, or leave them out")
    assert refusal(capsys, *args, "--model.method", "prompting", "--model.gate.mode", "smooth") == (
        "model.gate (mode 'smooth') shapes DeStein's steering, which model.method replaces; leave it out")
    for alpha in (["--model.evaluation.alphas", "[0, 1.3]"], ["--model.alpha", "1.3"]):
        assert "alpha 1.3 would steer by all-zero steering vectors (no --ckpt_path given)" in refusal(
            capsys, *args, *alpha)
    assert not (tmp_path / "eval").exists()


def test_test_applies_fusion_and_gate_over_either_checkpoint_file(calibrated, tiny_llama_dir, tmp_path):
    _, out = calibrated
    for ckpt in ("tiny.ckpt", "tiny.safetensors"):
        folder = tmp_path / ckpt
        main(_tiny_test_args(tiny_llama_dir, folder, "--ckpt_path", str(out / ckpt), "--model.fusion",
                             "norm_preserving", "--model.gate.mode", "smooth"))
        steering = json.loads((folder / "results.json").read_text())["steering"]
        assert (steering["fusion"], steering["gate"]["mode"], steering["alpha"]) == ("norm_preserving", "smooth", 0.5)
        assert "zero_steering" not in steering


def test_test_evaluates_an_alpha_given_on_the_command_line_not_the_configs(calibrated, tiny_llama_dir, tmp_path,
                                                                           capsys):
    _, out = calibrated
    config = tmp_path / "config.yaml"
    config.write_text("model:\n  alpha: 1.3\n")
    ckpt = ["--ckpt_path", str(out / "tiny.ckpt")]
    main(_tiny_test_args(tiny_llama_dir, tmp_path / "config", *ckpt, "--config", str(config)))
    main(_tiny_test_args(tiny_llama_dir, tmp_path / "given", *ckpt, "--config", str(config), "--model.alpha", "0.8"))
    from_config, given = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("config", "given"))
    assert [r["alpha"] for r in from_config["runs"]] == [0.0, 0.5] and from_config["steering"]["alpha"] == 0.5
    assert [r["alpha"] for r in given["runs"]] == [0.0, 0.8] and given["steering"]["alpha"] == 0.8
    assert refusal(capsys, *_tiny_test_args(tiny_llama_dir, tmp_path / "both", *ckpt, "--model.alpha", "0.8",
                                            "--model.evaluation.alphas", "[0, 1]")) == (
        "model.alpha 0.8 is not among model.evaluation.alphas [0.0, 1.0]; give one of the two")


def test_a_value_a_constructor_refuses_is_one_line_and_exit_code_2(capsys):
    pairs = str(SHARED_DATA / "paradetox" / "paradetox.tsv")
    args = ["test", "--config", str(CONFIG_DIR / "smollm2-135m.yaml"), "--trainer.logger", "false"]
    cases = {
        ("--model.method", "ActAdd", "--model.method.pairs", pairs, "--model.method.m", "1"):
            "pairs.m must be at least 2",
        ("--model.method", "ITI", "--model.method.pairs", pairs, "--model.method.heads", "0"):
            "iti: heads and last_k must be at least 1, got 0 and 8",
        ("--model.method", "ITI", "--model.method.pairs", pairs, "--model.method.val_fraction", "1.5"):
            "iti: val_fraction must be a finite number in (0, 1), got 1.5",
        ("--model.val_fraction", "1.5",): "val_fraction must be strictly between 0 and 1, got 1.5",
        ("--model.method", "WordFilter"): "word_filter: give exactly one of words",
        ("--model.method", "Prompting", "--model.method.prefix", ""):
            "prompting: the prefix (or system message) it would use is empty",
        ("--model.gate.threshold", "2"): "gate threshold must be in [0, 1] (a mean toxic probability), got 2.0",
        ("--model.gate.mode", "smooth", "--model.gate.window", "1000000000"): "gate window must be an integer from 1",
        ("--data.prompts.n", "0"): "prompts.n must be at least 1 (or None for all prompts), got 0",
    }
    for extra, message in cases.items():
        assert refusal(capsys, *args, *extra).startswith(message)
    ckpt = str(CONFIG_DIR.parent / "checkpoints" / "smollm2-135m-paradetox.ckpt")
    assert refusal(capsys, "gate", "--ckpt_path", ckpt, "--out", "x.ckpt",
                   str(RTP100), "--gate.window", "1000000000").startswith("gate window must be an integer from 1")
