"""The `destein` command: LightningCLI verbs (`fit`, `test`, ...) plus `generate`, `compare` and `induce`."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import jsonargparse
from lightning.pytorch.cli import LightningCLI

from destein_pl.datamodule import DeSteinDataModule
from destein_pl.generation import continue_prompts
from destein_pl.induce import induce
from destein_pl.module import DeSteinModule
from destein_pl.plots import toxicity_perplexity
from destein_pl.report import load_results, markdown_table
from destein_pl.steering import SteeredCausalLM

DEMO_PROMPTS = [
    "You are such a stupid",
    "I can't stand those people, they are all",
    "Shut up, you",
    "The worst thing about my neighbour is that he",
]


def generate(
    ckpt: str = "checkpoints/smollm2-135m-paradetox.ckpt",
    prompts: list[str] | None = None,
    alpha: float | None = None,
    max_new_tokens: int = 30,
    sample: bool = False,
    seed: int = 0,
    width: int = 60,
) -> None:
    """Continue prompts with the base model and with the steered model, side by side.

    Args:
        ckpt: steering checkpoint (.ckpt or .safetensors); its base model is loaded.
        prompts: prompts to continue (default: a few short toxic prompts).
        alpha: steering strength (default: the checkpoint's).
        max_new_tokens: tokens to generate per prompt.
        sample: nucleus sampling (p=0.9) instead of greedy decoding.
        seed: sampling seed.
        width: column width of the printed table.
    """
    steered = SteeredCausalLM.from_checkpoint(ckpt, alpha=alpha)
    prompts = prompts or DEMO_PROMPTS
    strength = steered.alpha
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=sample, seed=seed)
    steered_out = continue_prompts(steered, prompts, **kwargs)
    steered.alpha = 0.0
    base_out = continue_prompts(steered, prompts, **kwargs)
    print(f"{'base':<{width}} | steered (alpha={strength:g})")
    print(f"{'-' * width}-+-{'-' * width}")
    for prompt, base, steer in zip(prompts, base_out, steered_out):
        print(f"PROMPT: {prompt}")
        left = textwrap.wrap(base.strip().replace("\n", " "), width) or [""]
        right = textwrap.wrap(steer.strip().replace("\n", " "), width) or [""]
        for i in range(max(len(left), len(right))):
            a = left[i] if i < len(left) else ""
            b = right[i] if i < len(right) else ""
            print(f"{a:<{width}} | {b}")
        print()


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
        toxicity_perplexity(points, plot)
        print(f"\nplot: {plot}")


class DeSteinCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({
            "trainer.max_epochs": 1, "trainer.enable_checkpointing": False, "trainer.log_every_n_steps": 1,
            "trainer.default_root_dir": "runs",  # where the run's config.yaml goes when there is no logger
        })


def _generate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="destein generate", description=generate.__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default="checkpoints/smollm2-135m-paradetox.ckpt",
                        help="steering checkpoint, .ckpt or .safetensors (default: %(default)s)")
    parser.add_argument("--prompt", dest="prompts", action="append",
                        help="a prompt to continue; repeat for several (default: a few short toxic prompts)")
    parser.add_argument("--alpha", type=float, help="steering strength (default: the checkpoint's)")
    parser.add_argument("--max-new-tokens", type=int, default=30, help="tokens per continuation (default: 30)")
    parser.add_argument("--sample", action="store_true", help="nucleus sampling (p=0.9) instead of greedy")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument("--width", type=int, default=60, help="column width of the table (default: 60)")
    return parser


def _compare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="destein compare", description=compare.__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="results.json files or evaluation folders")
    parser.add_argument("--labels", nargs="+", help="a name per entry of RESULTS (default: folder names)")
    parser.add_argument("--plot", help="write a PNG of EMT against perplexity here")
    return parser


EXTRA_COMMANDS = {
    "generate": lambda args: generate(**vars(_generate_parser().parse_args(args))),
    "compare": lambda args: compare(**vars(_compare_parser().parse_args(args))),
    "induce": lambda args: jsonargparse.CLI(induce, args=args),  # options from a YAML `--config`, like fit
}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in EXTRA_COMMANDS:
        EXTRA_COMMANDS[args[0]](args[1:])
        return
    DeSteinCLI(DeSteinModule, DeSteinDataModule, save_config_kwargs={"overwrite": True}, args=argv)


if __name__ == "__main__":
    main()
