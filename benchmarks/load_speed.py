"""Load time (cold and cached) and generation speed of a built-in model, with and without steering.

Cold load builds the dequantized cache in a temporary XDG_CACHE_HOME, in a fresh process; cached load reads it,
in another. Generation is greedy with the KV cache, a batch of `--batch` prompts: the base model unwrapped, wrapped
with zero steering, and steered with the shipped checkpoint's vectors, timed in turn (`benchmarks/fold_speed.py`'s
measurement). `--ckpt` measures another checkpoint and its base model. Writes `docs/results/load_speed.md` for the
embedded model's shipped checkpoint, `load_speed-<base model>.md` for another (`load_speed-gemma3-270m.md`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.fold_speed import CHECKPOINT, generation_times, table
from benchmarks.results import Results, shown
from destein_pl import BUILTIN_MODELS, SteeredCausalLM, load_base_model
from destein_pl.steering.checkpoint import read_checkpoint

LOAD = ("import sys, time; t = time.perf_counter(); from destein_pl import load_base_model; "
        "load_base_model(sys.argv[1]); print(time.perf_counter() - t)")
PROMPTS = ["You are such a stupid", "The weather today is", "I can't stand those people", "Once upon a time"]


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", type=Path, default=CHECKPOINT, help="steering checkpoint (default: the shipped one)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)


def output_fields(args: argparse.Namespace) -> dict[str, str]:
    """`{model_tag}`: empty for the shipped checkpoint, else its base model's name (a folder's last part)."""
    if args.ckpt == CHECKPOINT:
        return {"model_tag": ""}
    return {"model_tag": "-" + Path(read_checkpoint(args.ckpt)[1]["base_model"]["name_or_path"]).name}


def timed_load(model: str, cache_home: str) -> float:
    """Seconds to import the library and load `model` in a fresh process with this cache folder."""
    out = subprocess.run([sys.executable, "-c", LOAD, model], env={**os.environ, "XDG_CACHE_HOME": cache_home},
                         check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace, results: Results) -> None:
    steered = SteeredCausalLM.from_checkpoint(args.ckpt)
    model = steered.base_model
    with tempfile.TemporaryDirectory() as cache:
        cold = timed_load(model, cache)
        cached = timed_load(model, cache)
    base, tokenizer = load_base_model(model)
    zero = SteeredCausalLM(*load_base_model(model))
    prompts = (PROMPTS * args.batch)[: args.batch]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    times = generation_times({"base model, unwrapped": base, "wrapped, zero steering": zero,
                              f"steered (alpha {steered.alpha:g}, `{shown(args.ckpt)}`)": steered},
                             batch, args.tokens, args.repeats)
    name = model if model in BUILTIN_MODELS else f"`{shown(Path(model))}`"
    cold_means = "dequantize the GGUF file and write the cache" if model in BUILTIN_MODELS else "an empty cache"
    title = "the embedded model" if args.ckpt == CHECKPOINT else name
    results.write(f"load_speed{output_fields(args)['model_tag']}", f"Loading and generation speed of {title}", (
        f"Load {name} in a fresh process (importing the library included): cold ({cold_means}) {cold:.1f} s, "
        f"cached {cached:.1f} s.\n\n"
        f"Greedy generation, batch {args.batch} x {args.tokens} new tokens, {args.repeats} repetitions "
        f"(interleaved):\n\n{table(times, args.batch, args.tokens)}"))
