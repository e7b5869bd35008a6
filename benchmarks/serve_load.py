"""`destein serve` under load: many concurrent requests at mixed steering strengths, against the same prompts
decoded offline in one batch.

The server runs in this process on a free 127.0.0.1 port (`destein_pl.serving.server.running`); the official
`openai` client sends `--requests` greedy completions at once, each at one of `--alphas` in turn (0 is the base
model), `--tokens` new tokens each. The offline side decodes the same prompts at the same alphas in one batch with
the server's own decoder (no HTTP, no waiting for a batch to fill) and, for correctness, each prompt alone with
transformers' `generate`. The two timed sides alternate `--repeats` times. Writes `docs/results/serve_load.md`:
requests/s and tokens/s of each side with their spread, their ratio, how the server batched the requests, and how
many served texts equal the offline ones. Needs the `serve` and `test` extras (fastapi, uvicorn, openai).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import torch

from benchmarks.results import DATA, ROOT, Results, shown
from benchmarks.timing import spread
from destein_pl.evaluation.prompts import PromptsConfig, load_prompts
from destein_pl.evaluation.sampling import end_token_ids
from destein_pl.serving.app import ServeSettings, create_app
from destein_pl.serving.decoding import Decoder, Row
from destein_pl.serving.server import running
from destein_pl.steering.model import SteeredCausalLM

CHECKPOINT = ROOT / "checkpoints" / "smollm2-135m-forward-gated.ckpt"
PROMPTS = DATA / "rtp" / "rtp_test_100.jsonl"
MODEL = "served"


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", default=str(CHECKPOINT), help="steering checkpoint to serve (default: the shipped "
                        "forward-gated SmolLM2-135M one, the case a folded export cannot serve)")
    parser.add_argument("--prompts", default=str(PROMPTS), help="RealToxicityPrompts JSONL")
    parser.add_argument("--requests", type=int, default=64, help="concurrent requests (one prompt each)")
    parser.add_argument("--alphas", type=float, nargs="+", default=None,
                        help="the requests' alphas, in turn (default: 0, half the checkpoint's, its own, 1.5x)")
    parser.add_argument("--tokens", type=int, default=20, help="new tokens per request (greedy, no early end)")
    parser.add_argument("--max-batch-rows", type=int, default=64, help="the server's --max_batch_rows")
    parser.add_argument("--batch-wait-ms", type=float, default=50.0, help="the server's --batch_wait_ms")
    parser.add_argument("--repeats", type=int, default=3)


async def _served(url: str, prompts: list[str], alphas: list[float], tokens: int) -> list:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=3600)
    try:
        return await asyncio.gather(*(client.completions.create(
            model=MODEL, prompt=p, max_tokens=tokens, temperature=0, extra_body={"destein": {"alpha": a}})
            for p, a in zip(prompts, alphas)))
    finally:
        await client.close()


def served(url: str, prompts: list[str], alphas: list[float], tokens: int) -> tuple[float, list[str], int]:
    """Seconds until every concurrent request was answered, the texts, and the completion tokens."""
    started = time.perf_counter()
    responses = asyncio.run(_served(url, prompts, alphas, tokens))
    seconds = time.perf_counter() - started
    return seconds, [r.choices[0].text for r in responses], sum(r.usage.completion_tokens for r in responses)


def offline_batch(decoder: Decoder, ids: list[list[int]], alphas: list[float], tokens: int
                  ) -> tuple[float, list[str], int]:
    """Seconds to decode every prompt in one batch with the server's decoder, the texts, and the new tokens."""
    rows = [Row(p, a, tokens, temperature=0.0) for p, a in zip(ids, alphas)]
    started = time.perf_counter()
    for _ in decoder.steps(rows):
        pass
    return time.perf_counter() - started, [r.text for r in rows], sum(len(r.tokens) for r in rows)


def alone(steered: SteeredCausalLM, ids: list[int], alpha: float, tokens: int, ends: list[int]) -> str:
    """A prompt's greedy continuation by transformers' `generate`, as a batch of one at `alpha`."""
    steered.alpha = alpha
    with torch.no_grad():
        out = steered.generate(input_ids=torch.tensor([ids]), max_new_tokens=tokens, do_sample=False,
                               eos_token_id=ends, pad_token_id=steered.tokenizer.pad_token_id)
    new = out[0, len(ids):].tolist()
    new = new[: next((i for i, t in enumerate(new) if t in ends), len(new))]
    return steered.tokenizer.decode(new, skip_special_tokens=True)


def cpu_flags() -> str:
    """The CPU's vector extensions that matter to these kernels, from /proc/cpuinfo (where it exists)."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return ", ".join(f for f in wanted if f in flags) or "none of AVX2, AVX-512, AMX"


def run(args: argparse.Namespace, results: Results) -> None:
    steered = SteeredCausalLM.from_checkpoint(args.ckpt)
    default = float(f"{steered.alpha:.6g}")
    cycle = args.alphas or [0.0, default / 2, default, 1.5 * default]
    prompts = [p.text for p in load_prompts(PromptsConfig(args.prompts, n=args.requests, seed=0))]
    alphas = [cycle[i % len(cycle)] for i in range(len(prompts))]
    app = create_app(steered, ServeSettings(model_name=MODEL, max_alpha=max(cycle),
                                            max_batch_rows=args.max_batch_rows, batch_wait_ms=args.batch_wait_ms,
                                            timeout_s=3600, max_queued=max(256, len(prompts))))
    engine, tokenizer = app.state.served.engine, steered.tokenizer
    ends = end_token_ids(steered.generation_config, tokenizer)
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    decoder = Decoder(steered, ends)  # the server's own; it runs only while no request is in flight
    times: dict[str, list[float]] = {"served": [], "offline": []}
    with running(app) as url:
        served(url, prompts[:2], alphas[:2], 2)  # warm-up
        warm = dict(engine.stats)
        for _ in range(args.repeats):
            seconds, texts, tokens = served(url, prompts, alphas, args.tokens)
            times["served"].append(seconds)
            seconds, batch_texts, batch_tokens = offline_batch(decoder, ids, alphas, args.tokens)
            times["offline"].append(seconds)
        stats = {key: engine.stats[key] - warm[key] for key in ("batches", "rows")}
        largest = engine.stats["largest_batch"]
    reference = SteeredCausalLM.from_checkpoint(args.ckpt)
    reference.model.set_attn_implementation("eager")
    expected = [alone(reference, p, a, args.tokens, ends) for p, a in zip(ids, alphas)]
    n = len(prompts)
    equal = [sum(map(str.__eq__, side, expected)) for side in (texts, batch_texts)]
    lines = ["| side | median s (min - max) | requests/s | tokens/s | time vs offline (median) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    base = statistics.median(times["offline"])
    for (name, values), new_tokens in zip(times.items(), (tokens, batch_tokens)):
        median = statistics.median(values)
        lines.append(f"| {name} | {spread(values, 2)} | {n / median:.1f} | {new_tokens / median:.0f} "
                     f"| {median / base:.2f} |")
    body = (
        f"Checkpoint `{shown(args.ckpt)}` (gate {steered.gate.mode}, alpha {default:g}); {n} concurrent greedy "
        f"requests of at most {args.tokens} tokens through the `openai` client, at alphas "
        f"{', '.join(f'{a:g}' for a in cycle)} in turn; server `--max_batch_rows {args.max_batch_rows} "
        f"--batch_wait_ms {args.batch_wait_ms:g}`; offline: the same prompts and alphas in one batch of the "
        f"server's decoder, without HTTP; {args.repeats} repetitions, the two sides in turn. CPU vector extensions: "
        f"{cpu_flags()}.\n\n"
        + "\n".join(lines)
        + f"\n\nThe server decoded {stats['rows']} rows in {stats['batches']} batches (largest {largest}). Texts "
        f"equal to each prompt decoded alone by transformers' `generate` at its alpha: served {equal[0]} of {n}, "
        f"offline one batch {equal[1]} of {n} (a difference would be float "
        f"rounding between batch shapes deciding a near tie).")
    results.write("serve_load", "Serving under load: concurrent requests at mixed alphas", body)
