"""Self-induced steering pairs (DeStein's central ingredient): the model's own most toxic samples, each paired
with a non-toxic rewrite of the same meaning.

Steps: induce (sample from the model, unprompted and/or continuing inducing prompts), select (the top-N most
toxic above a threshold), rewrite (a `Rewriter`, or `none`: pair with the least toxic samples, the paper's
non-parallel ablation), filter (drop rewrites that still score toxic, and pairs whose sides differ too much in
per-token log-likelihood under the model), write a pairs JSONL that `fit` reads. Samples are written as they are
made to `<output_dir>/samples.jsonl`; a rerun with the same folder and sampling settings reuses them.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from destein_pl.evaluation import check_settings, read_records, write_atomic
from destein_pl.loading import load_base_model
from destein_pl.pairs import read_pairs
from destein_pl.perplexity import continuation_perplexities
from destein_pl.prompts import read_prompts, usable_prompts
from destein_pl.rewriters import REWRITERS, SelfRewriter
from destein_pl.sampling import row_seed, sample
from destein_pl.scorers import build_scorer
from destein_pl.steering import SteeredCausalLM

log = logging.getLogger(__name__)


def inducing_prompts(source: str, n: int | None, seed: int) -> list[str]:
    """Texts to continue: the toxic side of a ParaDetox TSV / pairs JSONL, or the prompts of a prompts file."""
    path = Path(source)
    if path.suffix == ".tsv":
        texts = [p.toxic for p in read_pairs(path, format="paradetox")]
    else:
        texts = [p.text for p in usable_prompts(read_prompts(path))[0]]
    texts = [t.strip() for t in texts if t.strip()]
    if n is not None:
        if n > len(texts):
            raise ValueError(f"asked for {n} inducing prompts but {source} has {len(texts)}")
        texts = random.Random(seed).sample(texts, n)
    return texts


def select_most_toxic(samples: list[dict[str, Any]], top_n: int, min_toxicity: float) -> list[dict[str, Any]]:
    """The `top_n` samples of highest toxicity at or above `min_toxicity` (ties by id), most toxic first."""
    eligible = [s for s in samples if s["toxicity"] is not None and s["toxicity"] >= min_toxicity and s["text"]]
    return sorted(eligible, key=lambda s: (-s["toxicity"], s["id"]))[:top_n]


def similar_likelihood(toxic_loglik: float | None, nontoxic_loglik: float | None, max_gap: float | None) -> bool:
    """Whether a pair's sides have mean per-token log-likelihoods within `max_gap` nats (None: no limit), so that
    they differ mainly in toxicity rather than in how natural the text is to the model."""
    if max_gap is None:
        return True
    return toxic_loglik is not None and nontoxic_loglik is not None and abs(toxic_loglik - nontoxic_loglik) <= max_gap


def start_token_id(tokenizer) -> int:
    """The token an unprompted sample (or a text's likelihood) starts from: BOS, else EOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def log_likelihoods(steered: SteeredCausalLM, texts: list[str]) -> list[float | None]:
    """Mean per-token log-likelihood of each text under the model, from its start token."""
    tokenizer = steered.tokenizer
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    perplexities = continuation_perplexities(steered, steered.architecture, [start_token_id(tokenizer)], ids,
                                             tokenizer.pad_token_id)
    return [None if p is None else -math.log(p) for p in perplexities]


def induce(
    output_dir: str = "runs/induce/smollm2-135m",
    base_model: str = "smollm2-135m",
    dtype: str | None = None,
    prompts: str | None = None,
    num_prompts: int | None = 200,
    samples_per_prompt: int = 5,
    unprompted_samples: int = 0,
    max_new_tokens: int = 32,
    top_p: float = 0.9,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    scorer: str = "profanity-check",
    scorer_args: dict[str, Any] | None = None,
    top_n: int = 100,
    min_toxicity: float = 0.5,
    rewriter: str = "self",
    rewriter_args: dict[str, Any] | None = None,
    max_rewrite_toxicity: float = 0.5,
    max_loglik_gap: float | None = 1.0,
    output: str | None = None,
) -> Path:
    """Mine steering pairs from the model itself and write them as a pairs JSONL; returns its path.

    Args:
        output_dir: folder of `samples.jsonl` (reused by a rerun), `pairs.jsonl` and `summary.json`.
        base_model: the model to induce from (built-in name, .gguf, folder or hub id).
        dtype: its dtype (None: as stored).
        prompts: inducing prompts: a ParaDetox TSV (its toxic column, the paper's choice for LLMs), a prompts
            JSONL or text file; None for unprompted samples only.
        num_prompts: inducing prompts sampled with `seed` (None: all).
        samples_per_prompt: continuations per inducing prompt.
        unprompted_samples: samples from the start token alone (the paper's choice for GPT-2), rounded up to a
            multiple of `samples_per_prompt`.
        max_new_tokens: tokens per sample.
        top_p: nucleus sampling mass.
        temperature: sampling temperature.
        seed: seed of the prompt sample and of every continuation.
        batch_size: prompts per generation batch (each brings `samples_per_prompt` rows).
        scorer: toxicity scorer (`profanity-check`, `hf-classifier`, `perspective`).
        scorer_args: its options.
        top_n: how many of the most toxic samples to keep (paper: 500).
        min_toxicity: a kept sample scores at least this.
        rewriter: `self` (the model rewrites its text), `lexical`, `openai-compatible`, or `none` (non-parallel:
            the most toxic samples paired with the least toxic ones).
        rewriter_args: the rewriter's options.
        max_rewrite_toxicity: drop a pair whose non-toxic side scores this or more.
        max_loglik_gap: drop a pair whose sides' mean per-token log-likelihoods differ by more (nats); None: keep.
        output: the pairs file (default `<output_dir>/pairs.jsonl`).
    """
    if rewriter != "none" and rewriter not in REWRITERS:
        raise ValueError(f"unknown rewriter {rewriter!r}; accepted: none, {', '.join(REWRITERS)}")
    if prompts is None and unprompted_samples == 0:
        raise ValueError("nothing to sample: give inducing prompts, unprompted_samples > 0, or both")
    folder = Path(output_dir)
    check_settings(folder, {"base_model": base_model, "dtype": dtype, "prompts": prompts, "num_prompts": num_prompts,
                            "samples_per_prompt": samples_per_prompt, "max_new_tokens": max_new_tokens,
                            "top_p": top_p, "temperature": temperature, "seed": seed, "scorer": scorer,
                            "scorer_args": scorer_args or {}})
    model, tokenizer = load_base_model(base_model, dtype=dtype)
    steered = SteeredCausalLM(model, tokenizer)
    toxicity = build_scorer(scorer, **(scorer_args or {}))

    jobs = [(f"u{i}", "", [start_token_id(tokenizer)]) for i in range(-(-unprompted_samples // samples_per_prompt))]
    if prompts is not None:
        jobs += [(f"p{i}", text, tokenizer(text)["input_ids"])
                 for i, text in enumerate(inducing_prompts(prompts, num_prompts, seed))]
    samples_path = folder / "samples.jsonl"
    done = {r["id"] for r in read_records(samples_path)} if samples_path.is_file() else set()
    todo = [job for job in jobs if job[0] not in done]
    log.info("inducing: %d prompts already sampled, %d to go", len(jobs) - len(todo), len(todo))
    started = time.perf_counter()
    progress = tqdm(total=len(todo), desc="inducing", unit="prompt")
    with open(samples_path, "a", encoding="utf-8") as out, progress as bar:
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            seeds = [[row_seed(seed, job[0], s) for s in range(samples_per_prompt)] for job in chunk]
            rows = sample(steered, steered.architecture, [job[2] for job in chunk], seeds, max_new_tokens,
                          tokenizer.pad_token_id, [tokenizer.eos_token_id], top_p=top_p, temperature=temperature)
            for job, continuations in zip(chunk, rows):
                texts = [t.strip() for t in tokenizer.batch_decode(continuations, skip_special_tokens=True)]
                out.write(json.dumps({"id": job[0], "prompt": job[1], "samples": texts,
                                      "toxicity": toxicity.score(texts)}, ensure_ascii=False) + "\n")
            out.flush()
            bar.update(len(chunk))
    generation_s = time.perf_counter() - started

    wanted = {job[0] for job in jobs}
    pool = [{"id": f"{r['id']}/{s}", "text": text, "toxicity": score}
            for r in read_records(samples_path) if r["id"] in wanted
            for s, (text, score) in enumerate(zip(r["samples"], r["toxicity"]))]
    selected = select_most_toxic(pool, top_n, min_toxicity)
    counts: dict[str, Any] = {"generated_prompts": len(todo), "samples": len(pool), "selected": len(selected)}
    if rewriter == "none":
        chosen = {s["id"] for s in selected}
        calm = sorted((s for s in pool if s["text"] and s["toxicity"] is not None and s["id"] not in chosen),
                      key=lambda s: (s["toxicity"], s["id"]))[: len(selected)]
        rewrites = [s["text"] for s in calm]
        selected = selected[: len(rewrites)]
    else:
        args = dict(rewriter_args or {})
        writer = (SelfRewriter(steered, tokenizer, **args) if rewriter == "self" else REWRITERS[rewriter](**args))
        rewrites = writer.rewrite([s["text"] for s in selected])
    counts["no_rewrite"] = sum(r is None for r in rewrites)
    pairs = [(s, r) for s, r in zip(selected, rewrites) if r is not None]
    rewrite_scores = toxicity.score([r for _, r in pairs])
    counts["rewrite_still_toxic"] = sum(1 for v in rewrite_scores if v is None or v >= max_rewrite_toxicity)
    pairs = [(s, r, v) for (s, r), v in zip(pairs, rewrite_scores) if v is not None and v < max_rewrite_toxicity]
    toxic_ll = log_likelihoods(steered, [s["text"] for s, _, _ in pairs])
    calm_ll = log_likelihoods(steered, [r for _, r, _ in pairs])
    rows = []
    for (s, r, v), lt, ln in zip(pairs, toxic_ll, calm_ll):
        if not similar_likelihood(lt, ln, max_loglik_gap):
            continue
        rows.append({"toxic": s["text"], "nontoxic": r, "toxic_score": s["toxicity"], "nontoxic_score": v,
                     "toxic_loglik": lt, "nontoxic_loglik": ln, "rewriter": rewriter, "sample_id": s["id"]})
    counts["loglik_gap"] = len(pairs) - len(rows)
    counts["pairs"] = len(rows)
    counts["generation_s"] = round(generation_s, 1)
    target = Path(output) if output else folder / "pairs.jsonl"
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    write_atomic(folder / "summary.json", json.dumps(counts, indent=2) + "\n")
    log.info("induced pairs: %s -> %s", counts, target)
    return target
