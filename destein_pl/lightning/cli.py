"""The `destein` command. `fit` and `test` are a LightningCLI over `DeSteinModule` and `DeSteinDataModule`;
`generate`, `compare`, `induce`, `gate`, `export` and `serve` are typed functions. Every verb is parsed by
jsonargparse: options on the command line or in YAML (`--config`), checked against their types, listed by `--help`.
When the library refuses bad input (a ValueError, OSError, ImportError or unavailable scorer raised by destein-pl's
own code, also when jsonargparse wraps one that a constructor raised for an option's value), the verb ends with one
line `destein VERB: error: MESSAGE` on stderr and exit code 2; any other exception keeps its traceback."""

from __future__ import annotations

import argparse
import difflib
import inspect
import logging
import sys
import textwrap
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docstring_parser
from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from destein_pl.calibration.continuation_gate import gate
from destein_pl.evaluation.prompts import Prompt, PromptsConfig, load_prompts
from destein_pl.evaluation.report import differences, load_results, markdown_table
from destein_pl.evaluation.sampling import PromptSampler, SamplingSettings
from destein_pl.baselines import METHODS
from destein_pl.evaluation.scorers import SCORERS, ScorerUnavailableError
from destein_pl.induce import REWRITERS, induce
from destein_pl.lightning.datamodule import DeSteinDataModule
from destein_pl.lightning.module import DeSteinModule
from destein_pl.plugins import describe_plugins
from destein_pl.serving import serve
from destein_pl.steering.checkpoint import load_checkpoint_file, read_checkpoint
from destein_pl.steering.export import export
from destein_pl.steering.model import SteeredCausalLM

DEMO_PROMPTS = [
    "You are such a stupid",
    "I can't stand those people, they are all",
    "Shut up, you",
    "The worst thing about my neighbour is that he",
]


# ---- generate ------------------------------------------------------------------------------------------------------
def generate(
    ckpt: str = "checkpoints/smollm2-135m-paradetox.ckpt",
    prompt: list[str] | None = None,
    prompts: PromptsConfig | None = None,
    alpha: float | None = None,
    sampling: SamplingSettings = SamplingSettings(num_samples=1, max_new_tokens=30, temperature=0.0),  # noqa: B008
    width: int = 60,
) -> dict[str, list]:
    """Continue prompts with the base model and with the steered model, side by side.

    Returns what it prints: `{"prompts": [...], "base": [[...]], "steered": [[...]]}`, the continuations of each
    prompt.

    Uses the evaluation sampler: the same prompts (`--prompts.*` as `test`'s `--data.prompts.*`) and the same
    `--sampling.*` as `test`'s `--model.evaluation.sampling.*` give exactly the continuations `destein test` writes
    for them. By default it is greedy: one continuation of 30 tokens per prompt (`--sampling.temperature 1
    --sampling.num_samples 3` samples three).

    Args:
        ckpt: steering checkpoint (.ckpt or .safetensors); its base model is loaded.
        prompt: prompts to continue (`--prompt A B` or `--prompt A --prompt B`; a prompt's id is its own text).
            Default: a few short toxic prompts.
        prompts: prompts from a file instead, selected as `test` selects them (source, n, seed, ...).
        alpha: steering strength (default: the checkpoint's).
        sampling: how continuations are drawn (temperature 0: greedy).
        width: column width of the printed table.
    """
    chosen = chosen_prompts(prompt, prompts)
    steered = SteeredCausalLM.from_checkpoint(ckpt, alpha=alpha)
    base, steered_texts = base_and_steered(prompt_sampler(steered, sampling, chosen), chosen)
    print_side_by_side(chosen, base, steered_texts, steered.alpha, width)
    return {"prompts": [p.text for p in chosen], "base": base, "steered": steered_texts}


def chosen_prompts(texts: list[str] | None, source: PromptsConfig | None) -> list[Prompt]:
    """The prompts `generate` continues: from a file, the texts given (each its own id), or the demo prompts."""
    if texts and source:
        raise ValueError("give --prompt texts or --prompts.source, not both")
    blank = [i for i, text in enumerate(texts or [], 1) if not text.strip()]
    if blank:
        raise ValueError(f"--prompt: prompt {blank[0]} of {len(texts)} is empty; give text to continue")
    return load_prompts(source) if source else [Prompt(text, text) for text in (texts or DEMO_PROMPTS)]


def prompt_sampler(steered: SteeredCausalLM, sampling: SamplingSettings, prompts: list[Prompt]) -> PromptSampler:
    """The sampler `test` would use for these prompts: eager attention (samples independent of the batch) and one
    padding width for all of them."""
    steered.model.set_attn_implementation("eager")
    sampler = PromptSampler(steered, sampling)
    sampler.fix_width(prompts)
    return sampler


def base_and_steered(sampler: PromptSampler, prompts: list[Prompt]) -> tuple[list[list[str]], list[list[str]]]:
    """The continuations of each prompt by the base model (alpha 0) and by the steered model (its alpha)."""
    steered = sampler.steered
    strength = steered.alpha
    steered_texts = sampler(prompts).texts
    steered.alpha = 0.0
    try:
        base = sampler(prompts).texts
    finally:
        steered.alpha = strength
    return base, steered_texts


def print_side_by_side(prompts: list[Prompt], base: list[list[str]], steered: list[list[str]], alpha: float,
                       width: int) -> None:
    """A two-column table: each prompt, then its base and steered continuations side by side, wrapped to `width`."""
    print(f"{'base':<{width}} | steered (alpha={alpha:g})")
    print(f"{'-' * width}-+-{'-' * width}")
    for item, bases, steers in zip(prompts, base, steered):
        print(f"PROMPT: {item.text}")
        for left_text, right_text in zip(bases, steers):
            left = textwrap.wrap(left_text.strip().replace("\n", " "), width) or [""]
            right = textwrap.wrap(right_text.strip().replace("\n", " "), width) or [""]
            for i in range(max(len(left), len(right))):
                a = left[i] if i < len(left) else ""
                b = right[i] if i < len(right) else ""
                print(f"{a:<{width}} | {b}")
        print()


# ---- compare -------------------------------------------------------------------------------------------------------
def compare(results: list[str], labels: list[str] | None = None, plot: str | None = None) -> None:
    """Put several evaluations side by side, and plot toxicity against perplexity (the paper's Figure 2). A note
    under the table names each setting in which the rows differ (prompts, samples, tokens, sampling, scorer,
    perplexity model, base model, method).

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
    note = differences(rows, row_labels)
    if note:
        print(f"\n{note}")
    if plot:
        from destein_pl.plots import toxicity_perplexity

        toxicity_perplexity(points, plot)
        print(f"\nplot: {plot}")


# ---- fit and test --------------------------------------------------------------------------------------------------
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
        local = ckpt_path and "://" not in str(ckpt_path) and not str(ckpt_path).endswith(".safetensors")
        if local and ckpt_path not in ("last", "best", "hpc", "registry"):
            load_checkpoint_file(ckpt_path)

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if "weights_only" in self._subcommand_method_arguments[subcommand]:
            kwargs["weights_only"] = True  # local or remote, a checkpoint never runs code
        ckpt_path = kwargs.get("ckpt_path")
        if ckpt_path is not None:
            self.model.checkpoint_source = str(ckpt_path)
        if subcommand == "test" and self._alpha_given:
            self.model.alpha_override = self.model.hparams.alpha
        if str(ckpt_path).endswith(".safetensors"):  # the plain export: applied here, Lightning has no part in it
            self.model.configure_model()
            tensors, metadata = read_checkpoint(ckpt_path)
            self.model.apply_steering(tensors, metadata, str(ckpt_path))
            kwargs["ckpt_path"] = None
        return kwargs

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse as LightningCLI does, noting whether `--model.alpha` is on the command line: `test` evaluates that
        alpha in place of the checkpoint's, and not the config files' `model.alpha` (calibration's)."""
        given = sys.argv[1:] if args is None else args
        self._alpha_given = isinstance(given, list) and any(
            str(a) == "--model.alpha" or str(a).startswith("--model.alpha=") for a in given)
        super().parse_arguments(parser, args)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """`fit` and `test` only: DeStein has no validation or prediction step."""
        return {verb: skip for verb, skip in LightningCLI.subcommands().items() if verb in LIGHTNING_VERBS}


VERBS = {
    "fit": "calibrate steering vectors on pairs (LightningCLI)",
    "test": "evaluate a steered model on prompts (LightningCLI)",
    "generate": "continue prompts with the base and the steered model, side by side",
    "compare": "put evaluations side by side, and plot toxicity against perplexity",
    "induce": "mine steering pairs from the model itself",
    "gate": "fit a gate that predicts toxic continuations, into a copy of a steering checkpoint",
    "export": "fold a steering checkpoint into its base model, for engines without destein-pl",
    "serve": "serve a steered model over OpenAI's HTTP API, the steering strength chosen per request",
}
"""Every verb of `destein`, with what `destein --help` says it does."""
LIGHTNING_VERBS = ("fit", "test")
FUNCTION_VERBS: dict[str, Callable] = {"generate": generate, "compare": compare, "induce": induce, "gate": gate,
                                       "export": export, "serve": serve}
USER_ERRORS = (ValueError, OSError, ImportError, ScorerUnavailableError)
"""What destein-pl raises when it refuses bad input (a CheckpointError is a ValueError)."""
PACKAGE = Path(__file__).resolve().parents[1]


# ---- parsing the function verbs ------------------------------------------------------------------------------------
class _HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """Keeps the line breaks of the plugin lists at the end of `--help`."""


def _epilog(verb: str) -> str | None:
    """The scorer and rewriter options a verb's `--help` ends with."""
    scorers = describe_plugins(SCORERS, "--model.evaluation.scorer" if verb == "test" else "--scorer")
    methods = describe_plugins(METHODS, "--model.method")
    return {"test": scorers + "\n\n" + methods, "induce": scorers + "\n\n" + describe_plugins(REWRITERS, "--rewriter")}.get(verb)


def list_parameters(function: Callable) -> dict[str, tuple[type, Any]]:
    """{name: (item type, default)} of the parameters of `function` that take a list."""
    hints = typing.get_type_hints(function)
    found = {}
    for name, parameter in inspect.signature(function).parameters.items():
        lists = [t for t in (hints.get(name), *typing.get_args(hints.get(name))) if typing.get_origin(t) is list]
        if lists:
            found[name] = (typing.get_args(lists[0])[0], parameter.default)
    return found


def function_parser(verb: str, function: Callable) -> ArgumentParser:
    """The parser of a function verb: each parameter an option, except that a required list is positional
    (`compare A B`), and that a list takes several values (`--labels x y`, or `--prompt a --prompt b`)."""
    doc = docstring_parser.parse(inspect.getdoc(function) or "")
    parser = ArgumentParser(prog=f"destein {verb}", description=doc.short_description, epilog=_epilog(verb),
                            formatter_class=_HelpFormatter)
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML file of options.")
    lists = list_parameters(function)
    parser.add_function_arguments(function, skip=set(lists), as_group=False, fail_untyped=True, sub_configs=True)
    described = {p.arg_name: p.description for p in doc.params}
    for name, (item, default) in lists.items():
        if default is inspect.Parameter.empty:
            parser.add_argument(name, type=item, nargs="+", help=described.get(name))
        else:
            parser.add_argument(f"--{name}", type=item, nargs="+", action="extend", default=default,
                                help=described.get(name))
    return parser


def run_function_verb(verb: str, args: list[str]) -> Any:
    """Parse `args` for a function verb and call it."""
    parser = function_parser(verb, FUNCTION_VERBS[verb])
    options = parser.instantiate(parser.parse_args(args))
    options.pop("config", None)
    return FUNCTION_VERBS[verb](**options)


# ---- the command ---------------------------------------------------------------------------------------------------
def overview() -> str:
    """What `destein --help` prints: every verb with a line on what it does."""
    lines = [f"  {verb:<9} {text}" for verb, text in VERBS.items()]
    return "\n".join(["usage: destein VERB [OPTIONS]   (`destein VERB --help` lists a verb's options)", "", "verbs:",
                      *lines])


def unknown_verb(verb: str) -> str:
    """The error for a verb that does not exist: all verbs, and the closest one."""
    close = difflib.get_close_matches(verb, VERBS, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown verb '{verb}'{hint}; the verbs are {', '.join(VERBS)}"


def raised_by_library(error: BaseException) -> bool:
    """Whether `error` was raised by destein-pl's own code (a refusal of bad input) rather than inside a
    dependency."""
    trace = error.__traceback__
    while trace is not None and trace.tb_next is not None:
        trace = trace.tb_next
    return trace is not None and Path(trace.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE)


def library_refusal(error: BaseException) -> BaseException | None:
    """The refusal by destein-pl's own code that `error` is or wraps (jsonargparse raises its own ValueError from
    the one a constructor raised for an option's value), or None when there is none."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, USER_ERRORS) and raised_by_library(error):
            return error
        error = error.__cause__
    return None


def fail(verb: str | None, message: str) -> typing.NoReturn:
    """End the command as argparse does on a usage error: one line on stderr, exit code 2."""
    one_line = " ".join(line.strip() for line in message.splitlines() if line.strip())
    print(f"destein{f' {verb}' if verb else ''}: error: {one_line}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    """The `destein` console script: run the verb `argv` (default: the command line) names."""
    args = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("destein_pl").setLevel(logging.INFO)
    if not args or args[0] in ("-h", "--help"):
        print(overview(), file=sys.stdout if args else sys.stderr)
        raise SystemExit(0 if args else 2)
    if args[0].startswith("-"):  # LightningCLI's own options may come before its verb: `--config c.yaml fit`
        verb = next((a for a in args if a in LIGHTNING_VERBS), None)
    elif args[0] in VERBS:
        verb = args[0]
    else:
        fail(None, unknown_verb(args[0]))
    try:
        if verb in FUNCTION_VERBS:
            run_function_verb(verb, args[1:])
        else:
            DeSteinCLI(DeSteinModule, DeSteinDataModule, save_config_kwargs={"overwrite": True}, args=argv,
                       parser_kwargs={"formatter_class": _HelpFormatter,
                                      "test": {"epilog": _epilog("test"), "formatter_class": _HelpFormatter}})
    except USER_ERRORS as error:
        refusal = library_refusal(error)
        if refusal is None:
            raise
        fail(verb, str(refusal))


if __name__ == "__main__":
    main()
