from pathlib import Path

import jsonargparse
import pytest

from destein_pl.lightning.cli import DeSteinCLI, main
from destein_pl.lightning.callbacks import SteeringCheckpoint
from destein_pl.lightning.datamodule import DeSteinDataModule
from destein_pl.induce import induce
from destein_pl.lightning.module import DeSteinModule
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
    assert parsed.rewriter in ("self", "lexical", "openai-compatible", "none") and parsed.top_n > 0


def test_generate_prints_base_and_steered_side_by_side(calibrated, capsys):
    _, out = calibrated
    main(["generate", "--ckpt", str(out / "tiny.ckpt"), "--prompt", "you are a", "--prompt", "hello",
          "--max_new_tokens", "5"])
    printed = capsys.readouterr().out
    assert "steered (alpha=0.5)" in printed
    assert "PROMPT: you are a" in printed and "PROMPT: hello" in printed
