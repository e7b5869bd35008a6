"""Load time (cold and cached) and generation speed of the embedded model, with and without steering.

    python benchmarks/core.py [--tokens 64] [--batch 4] [--repeats 3]

Cold load builds the dequantized cache in a temporary XDG_CACHE_HOME (in a fresh process); cached load reads it.
Generation is greedy with the KV cache; steering uses the shipped checkpoint's vectors.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "smollm2-135m-paradetox.ckpt"
LOAD = (
    "import time; t = time.perf_counter(); from destein_pl import load_base_model; "
    "load_base_model('smollm2-135m'); print(time.perf_counter() - t)"
)


def timed_load(cache_home: str) -> float:
    out = subprocess.run([sys.executable, "-c", LOAD], env={**os.environ, "XDG_CACHE_HOME": cache_home},
                         check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def generation_speed(model, batch, tokens: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        best = min(best, time.perf_counter() - start)
    return len(batch["input_ids"]) * tokens / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as cache:
        cold = timed_load(cache)
        cached = timed_load(cache)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"load smollm2-135m: cold (dequantize + cache) {cold:.1f} s, cached {cached:.1f} s (fresh processes)")

    from destein_pl import SteeredCausalLM, load_base_model
    from destein_pl.steering.checkpoint import apply_checkpoint_state, read_checkpoint

    model, tokenizer = load_base_model("smollm2-135m")
    prompts = ["You are such a stupid", "The weather today is", "I can't stand those people", "Once upon a time"]
    prompts = (prompts * args.batch)[: args.batch]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    speed = lambda m: generation_speed(m, batch, args.tokens, args.repeats)  # noqa: E731
    base = speed(model)
    steered = SteeredCausalLM(model, tokenizer)
    zero = speed(steered)
    apply_checkpoint_state(steered, *read_checkpoint(CHECKPOINT), CHECKPOINT)
    on = speed(steered)
    print(f"greedy generation, batch {args.batch} x {args.tokens} new tokens, best of {args.repeats}:")
    print(f"  base model, unwrapped:          {base:.0f} tokens/s")
    print(f"  wrapped, zero steering:         {zero:.0f} tokens/s ({100 * (base / zero - 1):+.1f}% time)")
    print(f"  steered (alpha {steered.alpha:g}, shipped ckpt): {on:.0f} tokens/s ({100 * (base / on - 1):+.1f}% time)")


if __name__ == "__main__":
    main()
