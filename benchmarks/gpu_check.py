"""What a GPU changes, checked in one run of a few minutes on a machine with a CUDA GPU.

    python -m benchmarks gpu_check [--prompts PATH/rtp_test_100.jsonl] [--device cuda] [--out runs/gpu_check]

1. Steering on the device, float32 and bfloat16, for every supported family (tiny random models, the test suite's
   configs): zero steering gives the base model's logits bit for bit; the steered logits against an independent
   computation (plain hooks adding alpha * w * v); the folded model against the live-steered one.
2. A short `destein test` of the shipped checkpoint on the embedded model in bfloat16 (`--test-prompts`, 10).
   (`--ckpt` takes another checkpoint, on its own base model, for this part and the next two.)
3. The evaluation sampler's tokens/s against `generate(num_return_sequences=25)` on the same prompts.
4. Whether a prompt's continuations are the same in a batch of 1 and of 4 on this device (CPU kernels keep it;
   GPU kernels may not: reported, not assumed).

Writes `docs/results/gpu_check.md` (with the device's name); `--device cpu` runs the same checks on the CPU.
"""

from __future__ import annotations

import argparse
import copy
import platform
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from benchmarks.evaluation import PROTOCOL_SAMPLES, PROTOCOL_TOKENS, destein_test_options, sampling
from benchmarks.evaluation_cost import sampler_speed  # the evaluation sampler against generate, timed in turn
from benchmarks.results import DATA, ROOT, Results, shown
from benchmarks.timing import timed
from destein_pl import SteeredCausalLM, architecture_for
from destein_pl.evaluation.prompts import PromptsConfig, load_prompts
from destein_pl.evaluation.sampling import PromptSampler
from destein_pl.steering.checkpoint import read_checkpoint
from destein_pl.steering.folding import fold
from tests.conftest import TINY_CONFIGS  # the tiny configs of the test suite (the repository root is on the path)

CHECKPOINT = ROOT / "checkpoints" / "smollm2-135m-paradetox.ckpt"
PROMPTS = DATA / "rtp" / "rtp_test_100.jsonl"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", type=Path, default=PROMPTS, help="RealToxicityPrompts JSONL (default: the "
                        "100-prompt test sample)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--ckpt", type=Path, default=CHECKPOINT, help="steering checkpoint (default: the shipped one)")
    parser.add_argument("--out", type=Path, default=None, help="folder of the `destein test` run (default: "
                        "runs/gpu_check)")
    parser.add_argument("--samples", type=int, default=PROTOCOL_SAMPLES)
    parser.add_argument("--tokens", type=int, default=PROTOCOL_TOKENS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--test-prompts", type=int, default=10, help="prompts of the `destein test` run")
    parser.add_argument("--skip-test", action="store_true", help="skip the `destein test` run")


def hand_steered_logits(model, vectors, weights, alpha, batch) -> torch.Tensor:
    """Logits of an unwrapped copy with a plain pre-hook adding alpha * w * v at each output projection."""
    arch = architecture_for(model.config)
    hooks = []
    for projection, v, w in zip(arch.projections(model), vectors, weights):
        offset = (alpha * w[:, None] * v).reshape(-1)
        hooks.append(projection.register_forward_pre_hook(
            lambda m, args, o=offset: (args[0] + o.to(args[0]), *args[1:])))
    try:
        return model(**batch).logits
    finally:
        for hook in hooks:
            hook.remove()


@torch.no_grad()
def steering_checks(device: str) -> list[str]:
    lines = ["| family | dtype | zero steering = base | max abs(steered - hand) | max abs(folded - live) |",
             "|---|---|---|---:|---:|"]
    for family, make_config in TINY_CONFIGS.items():
        for dtype_name, dtype in DTYPES.items():
            torch.manual_seed(0)
            config = make_config()
            base = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval().to(device, dtype)
            ids = torch.randint(3, config.vocab_size, (4, 12), device=device)
            mask = torch.ones_like(ids)
            mask[0, :5] = mask[1, :2] = 0  # left padding
            batch = architecture_for(config).padded_inputs(ids, mask)
            expected_base = base(**batch).logits
            steered = SteeredCausalLM(copy.deepcopy(base))
            zero_equal = torch.equal(steered(**batch).logits, expected_base)
            vectors = torch.randn(steered.num_layers, steered.num_heads, steered.head_dim)
            weights = torch.rand(steered.num_layers, steered.num_heads)
            steered.set_steering(vectors, weights, alpha=0.7)
            live = steered(**batch).logits
            hand = hand_steered_logits(base, vectors.to(device), weights.to(device), 0.7, batch)
            real = mask.bool()
            folded = fold(steered)(**batch).logits
            lines.append(f"| {family} | {dtype_name} | {zero_equal} | {(live - hand)[real].abs().max().item():.2e} | "
                         f"{(folded - live)[real].abs().max().item():.2e} |")
    return lines


def destein_test(device: str, ckpt: Path, prompts: Path, n: int, samples: int, tokens: int, out: Path) -> list[str]:
    """`destein test` of a checkpoint on its base model in bfloat16 on `n` prompts: its time and results table."""
    accelerator = "gpu" if device.startswith("cuda") else "cpu"
    base_model = read_checkpoint(ckpt)[1]["base_model"]["name_or_path"]
    cmd = [sys.executable, "-m", "destein_pl.lightning.cli", "test", "--config",
           str(ROOT / "configs" / "smollm2-135m.yaml"), "--ckpt_path", str(ckpt), "--model.base_model", base_model,
           "--model.dtype", "bfloat16",
           "--data.prompts.source", str(prompts), "--data.prompts.n", str(n), *destein_test_options(samples, tokens),
           "--model.evaluation.output_dir", str(out / "test"), "--trainer.accelerator", accelerator,
           "--trainer.devices", "1", "--trainer.logger", "false"]
    done = timed(lambda: subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT))
    if done.value.returncode:
        raise RuntimeError(f"`destein test` failed ({done.value.returncode}):\n{done.value.stderr[-3000:]}")
    return [f"`destein test`, {n} prompts x {samples} samples of {tokens} tokens, bfloat16: {done.seconds:.0f} s "
            f"in all", "", (out / "test" / "results.md").read_text()]


@torch.no_grad()
def batch_invariance(steered, prompts, samples: int, tokens: int) -> str:
    sampler = PromptSampler(steered, sampling(samples, tokens))
    sampler.fix_width(prompts)
    together = sampler(prompts).texts
    alone = [sampler([p]).texts[0] for p in prompts]
    same = sum(a == b for a, b in zip(together, alone))
    return f"{same} of {len(prompts)} prompts have the same {samples} continuations in a batch of 1 and of 4"


def run(args: argparse.Namespace, results: Results) -> None:
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    sections = ["### Steering on the device", "", *steering_checks(args.device)]
    if not args.skip_test:
        sections += ["", f"### `destein test` of `{shown(args.ckpt)}`, bfloat16", "",
                     *destein_test(args.device, args.ckpt, args.prompts, args.test_prompts, args.samples, args.tokens,
                                   args.out or results.runs / "gpu_check")]
    prompts = load_prompts(PromptsConfig(str(args.prompts), n=4, seed=0))
    for dtype_name in DTYPES:
        steered = SteeredCausalLM.from_checkpoint(args.ckpt, dtype=dtype_name, device_map={"": device})
        steered.model.set_attn_implementation("eager")
        sections += ["", f"### Sampler speed, {dtype_name}, {len(prompts)} prompts x {args.samples} samples x "
                     f"{args.tokens} tokens", "", *sampler_speed(steered, prompts, args.samples, args.tokens,
                                                                 args.repeats),
                     "", f"### Batch 1 vs 4, {dtype_name}", "",
                     batch_invariance(steered, prompts, args.samples, args.tokens)]
        del steered
    results.write("gpu_check", f"GPU check on {name} ({args.device})", "\n".join(sections))
