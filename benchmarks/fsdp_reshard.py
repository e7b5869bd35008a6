"""`destein_fsdp`'s `reshard_after_forward`: generation speed and peak memory of the embedded model sharded over 2
CPU processes (gloo), with each layer freed after its forward pass (True) or kept gathered (False), against the
same sampling in one process.

    python -m benchmarks fsdp_reshard [--prompts 4] [--samples 5] [--tokens 20] [--repeats 3]

Each setting runs in fresh processes. Peak memory is the maximum resident set size of process 1, which never
holds the whole model while loading (process 0 reads the weights for everyone). The sampled
tokens must be the same in every setting (checked). `--model` shards another model (a folder or a built-in
name). Writes `docs/results/fsdp_reshard.md`.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.evaluation import sampling
from benchmarks.results import Results, shown
from benchmarks.timing import in_turn
from destein_pl import SteeredCausalLM, load_base_model
from destein_pl.evaluation.prompts import Prompt
from destein_pl.evaluation.sampling import PromptSampler
from destein_pl.steering.sharding import drain, load_sharded, world_mesh

MODEL = "smollm2-135m"
TEXTS = ["You are such a stupid", "The weather today is", "I can't stand those people, they are all",
         "Once upon a time", "My neighbour said that", "The best thing about this city is"]


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=MODEL, help=f"the model sharded (default {MODEL})")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)


def measure(steered, args) -> tuple[list[float], list]:
    """Seconds of each of `args.repeats` samplings of the prompts (after an untimed one), and their tokens."""
    prompts = [Prompt(str(i), TEXTS[i % len(TEXTS)]) for i in range(args.prompts)]
    sampler = PromptSampler(steered, sampling(args.samples, args.tokens))
    sampler.fix_width(prompts)

    def sample() -> list:
        tokens = sampler(prompts).tokens
        drain(steered.model)
        return tokens

    with torch.inference_mode():
        timings = in_turn({"sample": sample}, args.repeats)["sample"]
    return [t.seconds for t in timings], timings[-1].value


def _worker(rank: int, init_file: str, reshard: bool, args, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model, tokenizer = load_sharded(args.model, world_mesh("cpu"), "cpu", "float32", reshard)
        seconds, tokens = measure(SteeredCausalLM(model, tokenizer), args)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
        torch.save({"seconds": seconds, "tokens": tokens, "rss_mib": rss}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run(args: argparse.Namespace, results: Results) -> None:
    torch.set_num_threads(1)
    model, tokenizer = load_base_model(args.model, dtype="float32")
    one_seconds, expected = measure(SteeredCausalLM(model, tokenizer), args)
    one_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    del model
    rows = [("1 process, whole model", one_seconds, one_rss, True)]
    for reshard in (True, False):
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_worker, args=(os.path.join(tmp, "store"), reshard, args, tmp), nprocs=2, join=True)
            ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True) for r in range(2)]
        seconds = [max(a, b) for a, b in zip(ranks[0]["seconds"], ranks[1]["seconds"])]
        same = all(r["tokens"] == expected for r in ranks)
        rows.append((f"2 processes, reshard_after_forward={reshard}", seconds, ranks[1]["rss_mib"], same))
    count = args.prompts * args.samples * args.tokens
    lines = ["| setting | median s | spread | tokens/s | peak RSS of process 1 (MiB) | same tokens as 1 process |",
             "|---|---:|---|---:|---:|---|"]
    for name, seconds, rss, same in rows:
        median = statistics.median(seconds)
        lines.append(f"| {name} | {median:.2f} | {min(seconds):.2f} - {max(seconds):.2f} | {count / median:.0f} | "
                     f"{rss:.0f} | {same} |")
    name = "SmolLM2-135M" if args.model == MODEL else f"`{shown(Path(args.model))}`"
    results.write("fsdp_reshard", "FSDP on CPU: reshard_after_forward against one process", (
        f"{name} float32, {args.prompts} prompts x {args.samples} samples x {args.tokens} tokens, one thread "
        f"per process.\n\n" + "\n".join(lines)))
