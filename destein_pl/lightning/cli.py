"""The `destein` command. `fit`, `test` (and Lightning's other verbs) are a LightningCLI over `DeSteinModule` and
`DeSteinDataModule`; `generate`, `compare`, `induce` and `export` are typed functions. Every verb is parsed by
jsonargparse: options on the command line or in YAML (`--config`), checked against their types, listed by `--help`."""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys
import textwrap
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonargparse
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningCLI

from destein_pl.evaluation.prompts import Prompt, PromptsConfig, load_prompts
from destein_pl.evaluation.report import load_results, markdown_table
from destein_pl.evaluation.sampling import PromptSampler
from destein_pl.evaluation.scorers import SCORERS
from destein_pl.induce import REWRITERS, induce
from destein_pl.lightning.datamodule import DeSteinDataModule
from destein_pl.lightning.module import DeSteinModule
from destein_pl.plugins import describe_plugins
from destein_pl.steering.checkpoint import apply_checkpoint_state, load_checkpoint_file, read_checkpoint
from destein_pl.steering.export import export
from destein_pl.steering.model import SteeredCausalLM

DEMO_PROMPTS = [
    "You are such a stupid",
    "I can't stand those people, they are all",
    "Shut up, you",
    "The worst thing about my neighbour is that he",
]


def generate(
    ckpt: str = "checkpoints/smollm2-135m-paradetox.ckpt",
    prompt: list[str] | None = None,
    prompts: PromptsConfig | None = None,
    alpha: float | None = None,
    max_new_tokens: int = 30,
    sample: bool = False,
    num_samples: int = 1,
    top_p: float = 0.9,
    temperature: float = 1.0,
    seed: int = 0,
    max_prompt_tokens: int = 512,
    width: int = 60,
) -> dict[str, list]:
    """Continue prompts with the base model and with the steered model, side by side.

    Returns what it prints: `{"prompts": [...], "base": [[...]], "steered": [[...]]}`, the continuations of each
    prompt.

    Uses the evaluation sampler: with `--sample true`, the same prompts (`--prompts.*` as `test`'s `--data.prompts.*`),
    seed, `top_p`, `temperature`, `max_new_tokens` and `max_prompt_tokens` give exactly the continuations `destein
    test` writes for them.

    Args:
        ckpt: steering checkpoint (.ckpt or .safetensors); its base model is loaded.
        prompt: a prompt to continue (repeat the option for several; its id is its own text). Default: a few
            short toxic prompts.
        prompts: prompts from a file instead, selected as `test` selects them (source, n, seed, ...).
        alpha: steering strength (default: the checkpoint's).
        max_new_tokens: tokens per continuation.
        sample: nucleus sampling instead of greedy decoding.
        num_samples: continuations per prompt when sampling.
        top_p: nucleus mass when sampling, in (0, 1].
        temperature: sampling temperature, > 0.
        seed: sampling seed (a continuation depends only on seed, prompt id and sample index).
        max_prompt_tokens: prompts longer than this are cut from the left.
        width: column width of the printed table.
    """
    if prompt and prompts:
        raise ValueError("give --prompt texts or --prompts.source, not both")
    if num_samples < 1 or max_new_tokens < 1:
        raise ValueError(f"num_samples and max_new_tokens must be at least 1, got {num_samples}, {max_new_tokens}")
    if sample and not (0 < top_p <= 1 and temperature > 0):
        raise ValueError(f"sampling needs top_p in (0, 1] and temperature > 0, got {top_p}, {temperature}")
    chosen = load_prompts(prompts) if prompts else [Prompt(text, text) for text in (prompt or DEMO_PROMPTS)]
    steered = SteeredCausalLM.from_checkpoint(ckpt, alpha=alpha)
    steered.model.set_attn_implementation("eager")  # as `test` does: samples independent of the batch
    sampler = PromptSampler(steered, num_samples if sample else 1, max_new_tokens, top_p,
                            temperature if sample else 0.0, seed, max_prompt_tokens)
    sampler.fix_width(chosen)
    strength = steered.alpha
    steered_out = sampler(chosen).texts
    steered.alpha = 0.0
    base_out = sampler(chosen).texts
    print(f"{'base':<{width}} | steered (alpha={strength:g})")
    print(f"{'-' * width}-+-{'-' * width}")
    for item, bases, steers in zip(chosen, base_out, steered_out):
        print(f"PROMPT: {item.text}")
        for base, steer in zip(bases, steers):
            left = textwrap.wrap(base.strip().replace("\n", " "), width) or [""]
            right = textwrap.wrap(steer.strip().replace("\n", " "), width) or [""]
            for i in range(max(len(left), len(right))):
                a = left[i] if i < len(left) else ""
                b = right[i] if i < len(right) else ""
                print(f"{a:<{width}} | {b}")
        print()
    return {"prompts": [p.text for p in chosen], "base": base_out, "steered": steered_out}


def compare(results: list[str], labels: list[str] | None = None, plot: str | None = None) -> None:
    """Put several evaluations side by side, and plot toxicity against perplexity (the paper's Figure 2).

    Args:
        results: `results.json` files or evaluation folders (each may hold several alphas).
        labels: a name per entry of `results` for the table and plot (default: the folder names).
        plot: write a PNG of EMT against perplexity over all prompts, one line per entry of `results`.
    """
    if labels is not None and len(labels) != len(results):
        raise ValueError(f"{len(labels)} labels for {len(results)} results")
    names = labels or [Path(r).parent.name if Path(r).is_file() else Path(r).name for r in results]
    rows, row_labels, points = [], [], []
    for name, path in zip(names, results):
        for run in load_results([path]):
            rows.append(run)
            row_labels.append(f"{name} alpha={run['alpha']:g}")
            points.append((name, run["alpha"], run["metrics"]["all"]["emt"], run["metrics"]["all"]["ppl"]))
    print(markdown_table(rows, row_labels))
    if plot:
        from destein_pl.plots import toxicity_perplexity

        toxicity_perplexity(points, plot)
        print(f"\nplot: {plot}")


class DeSteinCLI(LightningCLI):
    """LightningCLI with calibration's defaults, and checkpoints that are only ever loaded as tensors."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({
            "trainer.max_epochs": 1, "trainer.enable_checkpointing": False, "trainer.log_every_n_steps": 1,
            "trainer.default_root_dir": "runs",  # where the run's config.yaml goes when there is no logger
        })

    def _parse_ckpt_path(self) -> None:
        """Check a local checkpoint before anything loads it, with errors naming the file. Unlike LightningCLI,
        the checkpoint's hyperparameters do not replace the config's: `model.base_model` and `model.dtype` are
        what the config and command line say (a base model other than the checkpoint's is named in a warning, and
        its architecture must match)."""
        if not self.config.get("subcommand"):
            return
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
        if ckpt_path and "://" not in str(ckpt_path) and not str(ckpt_path).endswith(".safetensors"):
            if ckpt_path not in ("last", "best", "hpc", "registry"):
                load_checkpoint_file(ckpt_path)

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if "weights_only" in self._subcommand_method_arguments[subcommand]:
            kwargs["weights_only"] = True  # local or remote, a checkpoint never runs code
        ckpt_path = kwargs.get("ckpt_path")
        if ckpt_path is not None:
            self.model.checkpoint_source = str(ckpt_path)
        if str(ckpt_path).endswith(".safetensors"):  # the plain export: applied here, Lightning has no part in it
            self.model.configure_model()
            tensors, metadata = read_checkpoint(ckpt_path)
            apply_checkpoint_state(self.model.steered, tensors, metadata, ckpt_path)
            kwargs["ckpt_path"] = None
        return kwargs


EXTRA_COMMANDS = {"generate": generate, "compare": compare, "induce": induce, "export": export}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """Keeps the line breaks of the plugin lists at the end of `--help`."""


def _epilog(command: str) -> str | None:
    """The scorer and rewriter options a command's `--help` ends with."""
    scorers = describe_plugins(SCORERS, "--model.evaluation.scorer" if command == "test" else "--scorer")
    return {"test": scorers, "induce": scorers + "\n\n" + describe_plugins(REWRITERS, "--rewriter")}.get(command)


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) is list or any(typing.get_origin(a) is list
                                                         for a in typing.get_args(annotation))


def gather_lists(function: Callable, args: list[str]) -> list[str]:
    """Let a list parameter take several values, as a shell user writes them: leading words for the first
    parameter (`compare A B`), `--labels x y`, or a repeated option (`--prompt a --prompt b`); they are handed to
    jsonargparse as one JSON list. A value already written as a JSON list passes unchanged."""
    hints = typing.get_type_hints(function)
    params = list(inspect.signature(function).parameters)
    lists = {name for name in params if _is_list(hints.get(name))}
    gathered: dict[str, list[str]] = {}
    rest: list[str] = []
    current = params[0] if params and params[0] in lists else None
    for arg in args:
        name = arg[2:].split("=", 1)[0] if arg.startswith("--") else None
        if name is not None:
            current = name if name in lists and "=" not in arg else None
            if current is None:
                rest.append(arg)
            continue
        if current is not None and not arg.startswith("["):
            gathered.setdefault(current, []).append(arg)
        else:
            rest.append(arg)
    lead = [json.dumps(gathered.pop(params[0]))] if params and params[0] in gathered else []
    return lead + rest + [item for name, values in gathered.items() for item in (f"--{name}", json.dumps(values))]


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("destein_pl").setLevel(logging.INFO)
    if not args or args[0] in ("-h", "--help"):
        print("destein: fit (calibrate), test (evaluate), validate, predict (LightningCLI); generate, compare, induce, "
              "export (see `destein VERB --help`)\n")
    if args and args[0] in EXTRA_COMMANDS:
        command = EXTRA_COMMANDS[args[0]]
        jsonargparse.CLI(command, args=gather_lists(command, args[1:]), prog=f"destein {args[0]}",
                         as_positional=command is compare,  # `compare A B`; elsewhere `--name value`
                         epilog=_epilog(args[0]), formatter_class=_HelpFormatter)
        return
    DeSteinCLI(DeSteinModule, DeSteinDataModule, save_config_kwargs={"overwrite": True}, args=argv,
               parser_kwargs={"formatter_class": _HelpFormatter,
                              "test": {"epilog": _epilog("test"), "formatter_class": _HelpFormatter}})


if __name__ == "__main__":
    main()
