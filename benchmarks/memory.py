"""Memory of DeStein: the steering state the wrapper adds to a model, the size of the shipped checkpoints against the
paper's Table 8, and the peak resident memory of `destein fit` and `destein test` on the embedded SmolLM2-135M.

    python -m benchmarks memory [--prompts 4] [--samples 25] [--repeats 3] [--threads N] [--processes NAME...]

1. Steering state: the buffers `SteeredCausalLM` registers on SmolLM2-135M-Instruct (by name, dtype and shape), and
   the calibrated probes the model holds for the gate, loaded from the shipped gated checkpoint.
2. Checkpoint files: size on disk of the shipped `.ckpt` and `.safetensors` files, and the tensors they hold.
3. Against the paper's Table 8 (steering vectors of L layers x H heads x D head size in float32: 256 bytes a head for
   D = 64): the same buffers measured on each paper model, built from its public shape on the meta device (no
   weights, no download) and wrapped, next to the paper's figure.
4. Peak resident memory (`ru_maxrss`, read by a small launcher process) of fresh processes: importing the library,
   loading the base model, loading it and running one forward pass, `destein fit --config
   configs/smollm2-135m.yaml`, and `destein test` of the shipped checkpoint on `--prompts` prompts with `--samples`
   continuations each (the config's prompt batch of 4 with the paper's 25 continuations makes one full-size
   generation batch: peak memory follows batch shapes, not the number of prompts). Every output goes to a new
   temporary folder, removed afterwards; `checkpoints/` is hashed before and after to show it is untouched.
   `--processes` names the processes measured (default: all five; none: the first three parts only).

Writes `docs/results/memory.md`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PretrainedConfig

from benchmarks.evaluation import PROTOCOL_SAMPLES, destein_test_options
from benchmarks.memory_table import SHAPES
from benchmarks.results import DATA, ROOT, Results
from benchmarks.timing import spread, timed
from destein_pl import SteeredCausalLM
from destein_pl.steering.checkpoint import STEER_KEY_MARK, read_checkpoint

KIB, MIB = 1024, 2**20
CHECKPOINTS = ROOT / "checkpoints"
SHIPPED = [CHECKPOINTS / f"smollm2-135m-{name}.{ext}"
           for name in ("paradetox", "gated") for ext in ("ckpt", "safetensors")]
GATED = CHECKPOINTS / "smollm2-135m-gated.ckpt"

PAPER_MODELS: dict[str, tuple[PretrainedConfig, int]] = {
    "GPT2-large": (GPT2Config(n_embd=1280, n_layer=36, n_head=20), 180),
    "GPT2-XL": (GPT2Config(n_embd=1600, n_layer=48, n_head=25), 300),
    "LLaMA2-7B": (LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                              num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096), 512),
    "LLaMA2-13B": (LlamaConfig(**SHAPES["Llama-2-13b"]), 800),
}
"""Public shapes (the hub config.json of gpt2-large, gpt2-xl, Llama-2-7b-hf, Llama-2-13b-hf) and the steering-vector
size in KB that the paper's Table 8 gives for each."""


# ---- steering state --------------------------------------------------------------------------------------------

def nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def steering_buffers(steered: SteeredCausalLM) -> dict[str, list[Tensor]]:
    """The wrapper's buffers grouped by name with the layer index as `*` (works on meta tensors too)."""
    groups: dict[str, list[Tensor]] = defaultdict(list)
    for name, buffer in steered.named_buffers():
        if STEER_KEY_MARK in name:
            groups[re.sub(r"\.\d+\.", ".*.", name)].append(buffer)
    return dict(groups)


def state_table(steered: SteeredCausalLM) -> tuple[str, int]:
    """Every steering buffer and the gate's probes, with their bytes; and the total."""
    lines = ["| tensor | kind | dtype | shape (per layer) | count | bytes |", "| --- | --- | --- | --- | ---: | ---: |"]
    total = 0
    for name, buffers in steering_buffers(steered).items():
        size = sum(nbytes(b) for b in buffers)
        total += size
        lines.append(f"| `{name}` | buffer | {buffers[0].dtype} | {list(buffers[0].shape)} | {len(buffers)} | "
                     f"{size:,} |")
    if steered.gate_probes is not None:
        for name, tensor in steered.gate_probes.arrays("gate_probes.").items():
            total += nbytes(tensor)
            lines.append(f"| `{name}` | attribute (the gate's probes) | "
                         f"{tensor.dtype} | {list(tensor.shape)} (all layers) | 1 | {nbytes(tensor):,} |")
    lines.append(f"| **total** | | | | | **{total:,}** ({total / KIB:.1f} KiB) |")
    return "\n".join(lines), total


def checkpoint_table() -> str:
    """Size on disk of each shipped file, and the bytes of the tensors it holds."""
    lines = ["| file | bytes on disk | KiB | tensors | tensor bytes | rest (metadata, container) |",
             "| --- | ---: | ---: | --- | ---: | ---: |"]
    for path in SHIPPED:
        tensors, _ = read_checkpoint(path)  # .ckpt: torch.load(weights_only=True); never unpickles objects
        stacked: dict[str, int] = defaultdict(int)
        for name, tensor in tensors.items():
            stacked[re.sub(r"\.\d+\.", ".*.", name)] += nbytes(tensor)
        inside = sum(stacked.values())
        names = ", ".join(f"`{name}` {size:,}" for name, size in sorted(stacked.items()))
        size = path.stat().st_size
        lines.append(f"| `{path.relative_to(ROOT)}` | {size:,} | {size / KIB:.1f} | {names} | {inside:,} | "
                     f"{size - inside:,} |")
    return "\n".join(lines)


def wrapped_on_meta(config: PretrainedConfig) -> SteeredCausalLM:
    """A model of this shape on the meta device (no memory, no download), wrapped."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return SteeredCausalLM(model)


def paper_table(ours: PretrainedConfig) -> str:
    """Steering buffers measured on each paper model's wrapper, against Table 8."""
    header = ("| model | L x H x D | vectors: L H D x 4 B (KiB) | paper Table 8 (KB) | ours / paper | all steering "
              "buffers (KiB) | checkpoint tensors, ungated (KiB) |")
    lines = [header, "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    models = {**{name: shape for name, (shape, _) in PAPER_MODELS.items()}, "SmolLM2-135M (this repo)": ours}
    for name, config in models.items():
        steered = wrapped_on_meta(config)
        groups = {key.rsplit(".", 1)[-1]: sum(nbytes(b) for b in buffers)
                  for key, buffers in steering_buffers(steered).items()}
        vectors, weights = groups["steer_vectors"], groups["steer_head_weights"]
        assert vectors == steered.num_layers * steered.num_heads * steered.head_dim * 4
        buffers = sum(groups.values())
        # A checkpoint (ungated) adds the probes to the stacked buffers: coefficients shaped like the vectors,
        # accuracy and intercept like the head weights (see the shipped files above).
        checkpoint = 2 * vectors + 3 * weights + 4
        paper = PAPER_MODELS[name][1] if name in PAPER_MODELS else None
        ratio = f"{vectors / KIB / paper:.3f}" if paper else "-"
        lines.append(f"| {name} | {steered.num_layers} x {steered.num_heads} x {steered.head_dim} | "
                     f"{vectors / KIB:.1f} | {paper or '-'} | {ratio} | {buffers / KIB:.1f} | {checkpoint / KIB:.1f} |")
    return "\n".join(lines)


# ---- peak resident memory of processes -------------------------------------------------------------------------

@dataclass
class Command:
    """A command line with `{tmp}` standing for its own temporary folder."""

    name: str
    """What `--processes` calls it."""
    label: str
    argv: list[str]
    shown: str

    def resolved(self, tmp: Path) -> list[str]:
        return [arg.replace("{tmp}", str(tmp)) for arg in self.argv]


def commands(prompts: int, samples: int) -> list[Command]:
    """Imports only, the base model loaded, the base model loaded and run once (every weight paged in), `destein
    fit`, `destein test`; outputs redirected to the temporary folder."""
    python = [sys.executable, "-c"]
    cli = [sys.executable, "-m", "destein_pl.lightning.cli"]
    rtp = os.path.relpath(DATA / "rtp" / "rtp_test_100.jsonl", ROOT)
    redirect = ["--trainer.default_root_dir", "{tmp}", "--trainer.logger.init_args.save_dir", "{tmp}",
                "--trainer.callbacks", "destein_pl.lightning.callbacks.SteeringCheckpoint",
                "--trainer.callbacks.dirpath", "{tmp}/checkpoints", "--trainer.callbacks.filename",
                "smollm2-135m-paradetox"]
    fit = ["fit", "--config", "configs/smollm2-135m.yaml", *redirect]
    test = ["test", "--config", "configs/smollm2-135m.yaml", "--ckpt_path", "checkpoints/smollm2-135m-paradetox.ckpt",
            "--data.prompts.source", rtp, "--data.prompts.n", str(prompts), *destein_test_options(samples),
            "--model.evaluation.output_dir", "{tmp}/eval", *redirect]
    imports = "import destein_pl"
    load = "from destein_pl import load_base_model; load_base_model('smollm2-135m')"
    forward = ("from destein_pl import load_base_model; model, tokenizer = load_base_model('smollm2-135m'); "
               "model(**tokenizer(['You are such a stupid'], return_tensors='pt'))")

    def shown(argv: list[str]) -> str:
        """As typed in a shell; `$TMP` for the temporary folder."""
        return " ".join(f'"{arg}"' if " " in arg else arg for arg in argv).replace("{tmp}", "$TMP")

    return [
        Command("import", "import the library", [*python, imports], shown(["python", "-c", imports])),
        Command("load", "load the base model", [*python, load], shown(["python", "-c", load])),
        Command("forward", "load the base model, one forward pass", [*python, forward],
                shown(["python", "-c", forward])),
        Command("fit", "`destein fit` (40 pairs)", [*cli, *fit], shown(["destein", *fit])),
        Command("test", f"`destein test` ({prompts} prompts x {samples} continuations, alpha 0 and 1.3)",
                [*cli, *test], shown(["destein", *test])),
    ]


LAUNCHER = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[2:])
with open(sys.argv[1], "w") as out:
    out.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)
"""
"""Runs a command and writes its peak RSS (KiB on Linux). A small process of its own launches it because a child
started straight from this one (fork or vfork, then exec) inherits this process's high-water mark of resident memory,
a model loaded here included, as the floor of its own `ru_maxrss`."""


def peak_rss(argv: list[str], env: dict[str, str], tmp: Path) -> tuple[float, float]:
    """Run a command from the repository root; its peak resident memory in MiB and wall seconds. Output goes to a
    log file in `tmp` (a pipe could fill and block the child)."""
    log, peak = tmp / "output.log", tmp / "peak-rss"
    with open(log, "wb") as out:
        call = timed(lambda: subprocess.call([sys.executable, "-c", LAUNCHER, str(peak), *argv], cwd=ROOT, env=env,
                                             stdout=out, stderr=subprocess.STDOUT))
    code, seconds = call.value, call.seconds
    if code != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"exit status {code}: {shlex.join(argv)}\n{tail}")
    return int(peak.read_text()) / KIB, seconds


def digest(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())
            if path.is_file()}


def processes(prompts: int, samples: int, repeats: int, threads: int | None, names: list[str]) -> tuple[str, str]:
    """Peak RSS and wall time of the named commands, `repeats` times (the commands in turn); the table and the
    commands. Each row's difference is against the loaded and run base model when it is measured."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    todo = [c for c in commands(prompts, samples) if c.name in names]
    before = digest(CHECKPOINTS)
    peaks: dict[str, list[float]] = {c.label: [] for c in todo}
    walls: dict[str, list[float]] = {c.label: [] for c in todo}
    written: list[int] = []
    extra: list[str] = []
    for _ in range(repeats):
        for command in todo:
            with tempfile.TemporaryDirectory(prefix="destein-memory-") as folder:
                tmp = Path(folder)
                peak, seconds = peak_rss(command.resolved(tmp), env, tmp)
                peaks[command.label].append(peak)
                walls[command.label].append(seconds)
                made = tmp / "checkpoints" / "smollm2-135m-paradetox.ckpt"
                if made.is_file():
                    written.append(made.stat().st_size)
                    extra = sorted(set(read_checkpoint(made)[0]) - set(read_checkpoint(SHIPPED[0])[0]))
    if digest(CHECKPOINTS) != before:
        raise RuntimeError("checkpoints/ changed during the run")
    forward = next((statistics.median(peaks[c.label]) for c in todo if c.name == "forward"), None)
    lines = [("| process | peak RSS MiB, median (min - max) | against the loaded and run base model (MiB) | wall s, "
              "median (min - max) |"), "| --- | ---: | ---: | ---: |"]
    for command in todo:
        against = "-" if forward is None else f"{statistics.median(peaks[command.label]) - forward:+.0f}"
        lines.append(f"| {command.label} | {spread(peaks[command.label], 0)} | {against} | "
                     f"{spread(walls[command.label], 1)} |")
    if written:
        shipped = (CHECKPOINTS / "smollm2-135m-paradetox.ckpt").stat().st_size
        more = f"; it also holds {', '.join(f'`{name}`' for name in extra)}" if extra else ""
        lines += ["", (f"The `.ckpt` that `destein fit` wrote: {statistics.median(written):,.0f} bytes (the shipped "
                       f"`{SHIPPED[0].relative_to(ROOT)}`: {shipped:,}{more}). `checkpoints/` unchanged (sha256 "
                       "before and after).")]
    shown = "\n".join(f"- {c.label}: `{c.shown}`" for c in todo)
    return "\n".join(lines), shown


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", type=int, default=4, help="prompts of the `destein test` run")
    parser.add_argument("--samples", type=int, default=PROTOCOL_SAMPLES,
                        help="continuations per prompt of the `destein test` run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each process")
    names = [command.name for command in commands(1, 1)]
    parser.add_argument("--processes", nargs="*", choices=names, default=names,
                        help="the processes whose peak memory is measured (default: all; --threads also sets their "
                             "OMP_NUM_THREADS)")


def run(args: argparse.Namespace, results: Results) -> None:
    steered = SteeredCausalLM.from_checkpoint(GATED)
    state, total = state_table(steered)
    params = sum(nbytes(p) for p in steered.model.parameters())
    body = f"""
**Steering state** that `SteeredCausalLM` adds to `smollm2-135m` (SmolLM2-135M-Instruct, {steered.num_layers} layers x
{steered.num_heads} heads x {steered.head_dim}), loaded from `{GATED.relative_to(ROOT)}` (the gated one: it also
uses the gate's probes):

{state}

The base model's parameters: {params:,} bytes ({params / MIB:.0f} MiB, {steered.dtype}); the steering state is
{100 * total / params:.3f}% of that.

**Checkpoint files** shipped in `checkpoints/` (tensors listed with their bytes, per-layer buffers summed as `*`):

{checkpoint_table()}

**Against the paper's Table 8** (the steering vectors: L x H x D float32 values; 256 bytes a head for D = 64). Each
model is built from its public shape on the meta device and wrapped; the bytes are those of the buffers the wrapper
registers. "All steering buffers" adds the head weights (L x H) and alpha (one per layer); a checkpoint also holds the
probes (coefficients L x H x D, accuracy and intercept L x H; a gated one a second set).

{paper_table(steered.config)}
"""
    if args.processes:
        table, shown = processes(args.prompts, args.samples, args.repeats, args.threads, args.processes)
        threads = f"OMP_NUM_THREADS={args.threads}" if args.threads else "the default threads"
        body += f"""
**Peak resident memory** of fresh processes (`ru_maxrss`, read by a small launcher process: `getrusage` of its
children), runs: {args.repeats} of each, in turn, {threads}, from the repository root, each with a new temporary
folder as `$TMP`; the embedded model's cache was already built (this script loads the model first; a first load
dequantizes the GGUF file and may peak higher). Loading alone pages in only part of the weights (they are read from
the cached safetensors file as they are first used); one forward pass pages in all of them:

{table}

Commands (`destein` was run as `python -m destein_pl.lightning.cli`):

{shown}
"""
    results.write("memory", "Memory: steering state, checkpoint files, peak RSS of fit and test", body)
