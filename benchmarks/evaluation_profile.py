"""Where one evaluation's time goes, by phase and by operator: `evaluate` of the embedded SmolLM2-135M steered
with `--ckpt` (default: the shipped 40-pair checkpoint; the gated one with
`--ckpt checkpoints/smollm2-135m-gated.ckpt`) at its alpha, on the first `--prompts` prompts of the mixed
toxic/non-toxic shuffle that `evaluation_cost` uses, `--samples` continuations of 20 tokens each, under
`torch.profiler` (CPU, no shapes or stacks recorded).

Three tables:
- by phase: the timing `results.json` records (generation, perplexity, scoring, the rest);
- by region: operator time attributed to the innermost labelled call (the prefill, the decode steps, the
  perplexity measurement's forward calls, the nucleus choice, the gate's shadow pass), from `record_function`
  labels this benchmark adds around those calls for the profiled run only;
- by operator: the `--top` operators by self CPU time, with their share of all operator time.

Writes `docs/results/evaluation_profile-<name of the checkpoint>-<now or before>.md`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from pathlib import Path
from unittest import mock

from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks.evaluation import evaluation_config
from benchmarks.evaluation_cost import CHECKPOINT, first, mixed_prompts
from benchmarks.results import Results, shown
from destein_pl import SteeredCausalLM, evaluate
from destein_pl.evaluation import perplexity, sampling
from destein_pl.steering import gating

LABELS = ("model:", "sampler:", "gate:")
BEFORE = ("The sampler as it was before the throughput work (`--sampler before`, the same tokens): the nucleus "
          "chosen by sorting the whole vocabulary, and every step's log-softmax computed whether read or not.")
PHASES = (("generate_s", "generation"), ("perplexity_s", "perplexity"), ("score_s", "scoring"))


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", type=Path, default=CHECKPOINT, help="steering checkpoint (default: the shipped one)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts evaluated")
    parser.add_argument("--samples", type=int, default=10, help="continuations per prompt")
    parser.add_argument("--tokens", type=int, default=20, help="new tokens per continuation")
    parser.add_argument("--top", type=int, default=15, help="operators listed")
    parser.add_argument("--sampler", choices=("now", "before"), default="now",
                        help="the sampler as it is, or as it was before the throughput work: the nucleus chosen by "
                             "sorting the whole vocabulary, and every step's log-softmax computed whether read or not")


def labelled(function, label: str):
    """`function` run inside a profiler region called `label`."""
    def wrapper(*args, **kwargs):
        with record_function(label):
            return function(*args, **kwargs)
    return wrapper


@contextmanager
def as_before():
    """The sampler as it was before the throughput work (same tokens, more work): a full sort for every nucleus
    choice, and the log-probabilities computed at every alpha."""
    draw = sampling.sample

    def sample(*args, **kwargs):
        return draw(*args, **{**kwargs, "log_probs": True})

    with mock.patch.object(sampling, "nucleus_choice", sampling.full_nucleus_choice), \
            mock.patch.object(sampling, "sample", sample):
        yield


@contextmanager
def regions(steered: SteeredCausalLM):
    """Profiler labels around the calls whose cost is in question, for this run only: the model's forward calls
    (prefill, decode step, or within the perplexity measurement), the nucleus choice and the gate's shadow pass."""
    model, forward, judging = steered.model, steered.model.forward, []

    def model_forward(*args, **kwargs):
        prompt = kwargs.get("logits_to_keep") == 1
        if judging:
            phase = "perplexity, prompt" if prompt else "perplexity, continuations"
        else:
            phase = "prefill" if prompt else "decode step"
        with record_function(f"model: {phase}"):
            return forward(*args, **kwargs)

    measure = perplexity.continuation_nll

    def continuation_nll(*args, **kwargs):
        judging.append(True)
        try:
            return measure(*args, **kwargs)
        finally:
            judging.pop()

    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(model, "forward", model_forward))
        stack.enter_context(mock.patch.object(perplexity, "continuation_nll", continuation_nll))
        stack.enter_context(mock.patch.object(sampling, "nucleus_choice",
                                              labelled(sampling.nucleus_choice, "sampler: nucleus choice")))
        stack.enter_context(mock.patch.object(gating.ProbeGate, "_probe_logits",
                                              labelled(gating.ProbeGate._probe_logits, "gate: shadow pass")))
        yield


def by_region(events) -> dict[str, float]:
    """Self CPU time (s) of every operator, attributed to the innermost labelled region holding it."""
    totals: dict[str, float] = defaultdict(float)
    for event in events:
        if event.name.startswith((*LABELS, "ProfilerStep")):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith(LABELS):
            parent = parent.cpu_parent
        totals["elsewhere" if parent is None else parent.name] += event.self_cpu_time_total / 1e6
    return dict(totals)


def run(args: argparse.Namespace, results: Results) -> None:
    steered = SteeredCausalLM.from_checkpoint(args.ckpt)
    prompts = first(mixed_prompts(), args.prompts)
    with tempfile.TemporaryDirectory(prefix="evaluation_profile-") as folder:
        warm = evaluation_config(Path(folder) / "warm", [steered.alpha], 1, 2)
        evaluate(steered, prompts[:2], warm, progress=False, verbose=False)
        config = evaluation_config(Path(folder) / "run", [steered.alpha], args.samples, args.tokens)
        with ExitStack() as stack:
            if args.sampler == "before":
                stack.enter_context(as_before())
            stack.enter_context(regions(steered))
            prof = stack.enter_context(profile(activities=[ProfilerActivity.CPU]))
            evaluate(steered, prompts, config, batch_size=4, progress=False, verbose=False)
        timing = json.loads((Path(folder) / "run" / "results.json").read_text())["timing"]
    events = prof.events()
    operators = [e for e in prof.key_averages() if not e.key.startswith((*LABELS, "ProfilerStep"))]
    all_ops = sum(e.self_cpu_time_total for e in operators) / 1e6
    total = timing["total_s"]
    phase_rows = [f"| {title} | {timing[key]:.2f} | {timing[key] / total:.1%} |" for key, title in PHASES]
    other = total - sum(timing[key] for key, _ in PHASES)
    phase_rows.append(f"| the rest (writing, metrics) | {other:.2f} | {other / total:.1%} |")
    regions_ = sorted(by_region(events).items(), key=lambda kv: -kv[1])
    region_rows = [f"| {name} | {seconds:.2f} | {seconds / all_ops:.1%} |" for name, seconds in regions_]
    top = sorted(operators, key=lambda e: -e.self_cpu_time_total)[: args.top]
    op_rows = [f"| `{e.key}` | {e.count} | {e.self_cpu_time_total / 1e6:.2f} | "
               f"{e.self_cpu_time_total / 1e6 / all_ops:.1%} |" for e in top]
    gate = steered.gate.mode
    before = args.sampler == "before"
    results.write(f"evaluation_profile-{args.ckpt.stem}-{args.sampler}",
                  f"Profile of one evaluation ({args.ckpt.stem}, the sampler {'before' if before else 'now'})", (
        f"`evaluate` of {steered.base_model} steered with `{shown(args.ckpt)}` (alpha {steered.alpha:g}, fusion "
        f"{steered.fusion}, gate {gate}) on {args.prompts} prompts x {args.samples} continuations of "
        f"{args.tokens} tokens, 4 prompts per step, under `torch.profiler` (which slows it down; the shares are "
        f"what to read). {BEFORE if before else 'The sampler as it is now.'} {total:.1f} s recorded, {all_ops:.1f} s of operator time.\n\n"
        "**By phase** (the timing `results.json` records):\n\n| phase | s | share |\n|---|---:|---:|\n"
        + "\n".join(phase_rows)
        + "\n\n**By region** (operator self time, attributed to the innermost labelled call):\n\n"
        "| region | s | share of operator time |\n|---|---:|---:|\n" + "\n".join(region_rows)
        + f"\n\n**By operator** (the {args.top} largest by self time):\n\n"
        "| operator | calls | self s | share of operator time |\n|---|---:|---:|---:|\n" + "\n".join(op_rows)))
