"""Self-induced steering pairs (DeStein's central ingredient): the model's own most toxic samples, each paired
with a non-toxic rewrite of the same meaning.

Steps: induce (sample from the model, unprompted and/or continuing inducing prompts), select (the top-N most
toxic above a threshold), rewrite (a `Rewriter`; `none` pairs them with the least toxic samples, the paper's
non-parallel ablation), filter (drop rewrites that still score toxic, and pairs whose sides differ too much in
per-token log-likelihood under the model), write a pairs JSONL that `fit` reads. Samples are appended as they are
made to `<output_dir>/samples.jsonl`; a rerun with the same folder and sampling settings reuses them.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from tqdm.auto import tqdm

from destein_pl.calibration.pairs import read_pairs
from destein_pl.evaluation.perplexity import continuation_nll
from destein_pl.evaluation.prompts import read_prompts, usable_prompts
from destein_pl.evaluation.sampling import SamplingSettings, end_token_ids, prompt_limit, sample
from destein_pl.evaluation.scorers import ToxicityScorer, build_scorer
from destein_pl.files import append_jsonl, ensure_settings, read_jsonl, write_atomic
from destein_pl.induce.rewriters import RewriteContext, Rewriter, build_rewriter
from destein_pl.steering.loading import load_base_model
from destein_pl.steering.model import SteeredCausalLM

log = logging.getLogger(__name__)

Sample = dict[str, Any]
"""One scored sample of the pool: `id` (`<job id>/<index>`), `text`, `toxicity` (None: unscored)."""


class Job(NamedTuple):
    """One thing to continue: an inducing prompt (`p<i>`) or the start token alone (`u<i>`)."""

    id: str
    prompt: str
    token_ids: list[int]


@dataclass
class Pair:
    """A selected toxic sample, its non-toxic side, and what the filters measured."""

    sample: Sample
    rewrite: str
    rewrite_score: float | None = None
    toxic_loglik: float | None = None
    nontoxic_loglik: float | None = None


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


def select_most_toxic(samples: list[Sample], top_n: int, min_toxicity: float) -> list[Sample]:
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


def log_likelihoods(steered: SteeredCausalLM, texts: list[str], batch_size: int = 32) -> list[float | None]:
    """Mean per-token log-likelihood of each text under the model, from its start token (None: an empty text)."""
    tokenizer = steered.tokenizer
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    nll = continuation_nll(steered, steered.architecture, [start_token_id(tokenizer)], ids, tokenizer.pad_token_id,
                           batch_size)
    return [None if v is None else -v for v in nll]


def check_options(
    prompts: str | None, num_prompts: int | None, unprompted_samples: int, batch_size: int, top_n: int,
    min_toxicity: float, max_rewrite_toxicity: float, max_loglik_gap: float | None,
) -> None:
    """Refuse out-of-range options before anything is loaded, naming the option and its range (the sampling
    options are checked by `SamplingSettings`)."""
    problems = []
    if prompts is None and unprompted_samples == 0:
        raise ValueError("nothing to sample: give inducing prompts, unprompted_samples > 0, or both")
    for name, value in {"batch_size": batch_size, "top_n": top_n}.items():
        if value < 1:
            problems.append(f"{name} must be at least 1, got {value}")
    if num_prompts is not None and num_prompts < 1:
        problems.append(f"num_prompts must be at least 1 (or null: all), got {num_prompts}")
    if unprompted_samples < 0:
        problems.append(f"unprompted_samples must be at least 0, got {unprompted_samples}")
    if not 0 <= min_toxicity <= 1:
        problems.append(f"min_toxicity must be in [0, 1], got {min_toxicity}")
    if not max_rewrite_toxicity > 0:
        problems.append(f"max_rewrite_toxicity must be > 0 (above 1: keep every rewrite), got {max_rewrite_toxicity}")
    if max_loglik_gap is not None and not max_loglik_gap >= 0:
        problems.append(f"max_loglik_gap must be at least 0 (or null: no limit), got {max_loglik_gap}")
    if problems:
        raise ValueError("invalid induce options: " + "; ".join(problems))


def sampling_jobs(steered: SteeredCausalLM, prompts: str | None, num_prompts: int | None, unprompted_samples: int,
                  sampling: SamplingSettings) -> list[Job]:
    """Unprompted jobs (enough for `unprompted_samples`, rounded up) followed by the inducing prompts, each cut from
    the left to `sampling.max_prompt_tokens` (and to the room the model's context leaves)."""
    tokenizer, limit = steered.tokenizer, prompt_limit(steered, sampling)
    unprompted = -(-unprompted_samples // sampling.num_samples)
    jobs = [Job(f"u{i}", "", [start_token_id(tokenizer)]) for i in range(unprompted)]
    texts = inducing_prompts(prompts, num_prompts, sampling.seed) if prompts is not None else []
    ids = [tokenizer(text)["input_ids"] for text in texts]
    jobs += [Job(f"p{i}", text, token_ids[-limit:]) for i, (text, token_ids) in enumerate(zip(texts, ids))]
    cut = sum(len(token_ids) > limit for token_ids in ids)
    if cut:
        log.warning("%d inducing prompts cut from the left to %d tokens (max_prompt_tokens)", cut, limit)
    return jobs


def sample_jobs(steered: SteeredCausalLM, jobs: list[Job], samples_path: Path, scorer: ToxicityScorer,
                sampling: SamplingSettings, batch_size: int) -> None:
    """Continue and score each job, `batch_size` jobs per generation batch, appending one line per job to
    `samples_path` batch by batch, so that an interruption loses at most the batch in progress."""
    tokenizer = steered.tokenizer
    eos = end_token_ids(steered.generation_config, tokenizer)
    with tqdm(total=len(jobs), desc="inducing", unit="prompt") as bar:
        for i in range(0, len(jobs), batch_size):
            chunk = jobs[i : i + batch_size]
            result = sample(steered, steered.architecture, [job.token_ids for job in chunk], [job.id for job in chunk],
                            sampling, tokenizer.pad_token_id, eos)
            texts = [[t.strip() for t in tokenizer.batch_decode(job_tokens, skip_special_tokens=True)]
                     for job_tokens in result.tokens]
            scores = scorer.score([t for job_texts in texts for t in job_texts])  # one call: the scorer batches them
            n = sampling.num_samples
            append_jsonl(samples_path, [{"id": job.id, "prompt": job.prompt, "samples": job_texts,
                                         "toxicity": scores[k * n : (k + 1) * n]}
                                        for k, (job, job_texts) in enumerate(zip(chunk, texts))])
            bar.update(len(chunk))


def scored_pool(samples_path: Path, jobs: list[Job], scorer: ToxicityScorer) -> list[Sample]:
    """Every sample of these jobs from `samples_path`; samples left unscored when they were made (e.g. a remote
    scorer's failures) are scored again."""
    wanted = {job.id for job in jobs}
    rows = read_jsonl(samples_path, "samples file") if samples_path.is_file() else []
    pool = [{"id": f"{r['id']}/{s}", "text": text, "toxicity": score}
            for r in rows if r["id"] in wanted
            for s, (text, score) in enumerate(zip(r["samples"], r["toxicity"]))]
    unscored = [s for s in pool if s["toxicity"] is None and s["text"]]
    if unscored:
        log.info("scoring again %d samples that got no score when they were made", len(unscored))
        for s, score in zip(unscored, scorer.score([s["text"] for s in unscored])):
            s["toxicity"] = score
    return pool


RUN_FILES = ("samples.jsonl", "settings.json", "summary.json")
"""The files of `output_dir` besides the pairs file: the sample pool, what it was made with, and the counts."""


def _same_path(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same path once links are resolved, or hard links to one file."""
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output(output: Path, output_dir: Path, base_model: str, inputs: list[str]) -> None:
    """Refuse a pairs file path that would replace something the run reads or writes besides it: one of `inputs`
    (the inducing prompts, a rewriter's files), a file in or the base model itself where it is a local path, or a
    file of `output_dir` (`RUN_FILES`); and one that is a folder. Checked before anything is loaded."""
    if output.is_dir() or _same_path(output, output_dir):
        raise IsADirectoryError(f"output: {output} is a folder; expected the pairs file to write (a .jsonl path)")
    for name in inputs:
        if _same_path(output, Path(name).expanduser()):
            raise ValueError(f"output: {output} is an input of this run ({name}); write the pairs to another file")
    model = Path(base_model).expanduser()
    if model.exists() and (_same_path(output, model) or model.resolve() in output.resolve().parents):
        raise ValueError(f"output: {output} would write into the base model ({base_model}); write the pairs to "
                         f"another file")
    for name in RUN_FILES:
        if _same_path(output, output_dir / name):
            raise ValueError(f"output: {output} is the run's {name} in output_dir; write the pairs to another file "
                             f"(default: {output_dir / 'pairs.jsonl'})")


class InduceError(ValueError):
    """A run that produced no pairs; the pairs file of an earlier run is left as it was."""


def rewrite_selected(selected: list[Sample], rewriter: Rewriter, context: RewriteContext) -> tuple[list[Pair], int]:
    """Each selected sample with its rewrite, and how many rewrites were too long: samples the rewriter gave none
    are dropped, and so are rewrites longer than the model's context (in tokens), which no likelihood can be
    measured for (logged with the rewriter and the text). An error when the rewriter gave no rewrite at all."""
    rewrites = rewriter.rewrite([s["text"] for s in selected], context)
    if selected and all(r is None for r in rewrites):
        raise InduceError(f"every rewrite failed: the {rewriter.name!r} rewriter gave none for the {len(selected)} "
                          f"selected samples (for a remote rewriter: is its endpoint up?)")
    steered = context.steered
    room = steered.architecture.context_length(steered.config) - 1  # after the start token
    pairs, too_long = [], 0
    for sample_, rewrite in zip(selected, rewrites):
        if rewrite is None:
            continue
        length = len(steered.tokenizer(rewrite, add_special_tokens=False)["input_ids"])
        if length > room:
            log.warning("dropped a rewrite by the %r rewriter of %d tokens, longer than the model's context (%d): "
                        "%.80r...", rewriter.name, length, room, rewrite)
            too_long += 1
            continue
        pairs.append(Pair(sample_, rewrite))
    return pairs, too_long


def drop_toxic_rewrites(pairs: list[Pair], scorer: ToxicityScorer, max_toxicity: float) -> list[Pair]:
    """The pairs whose non-toxic side scores below `max_toxicity` (recording the score); unscored ones are dropped
    too."""
    for pair, score in zip(pairs, scorer.score([p.rewrite for p in pairs])):
        pair.rewrite_score = score
    return [p for p in pairs if p.rewrite_score is not None and p.rewrite_score < max_toxicity]


def drop_unlike_pairs(pairs: list[Pair], steered: SteeredCausalLM, max_gap: float | None, batch_size: int
                      ) -> list[Pair]:
    """The pairs whose sides' mean per-token log-likelihoods differ by at most `max_gap` (recording both)."""
    toxic = log_likelihoods(steered, [p.sample["text"] for p in pairs], batch_size)
    calm = log_likelihoods(steered, [p.rewrite for p in pairs], batch_size)
    for pair, lt, ln in zip(pairs, toxic, calm):
        pair.toxic_loglik, pair.nontoxic_loglik = lt, ln
    return [p for p in pairs if similar_likelihood(p.toxic_loglik, p.nontoxic_loglik, max_gap)]


def pair_row(pair: Pair, rewriter: str) -> dict[str, Any]:
    """A line of the pairs JSONL (`toxic`/`nontoxic` are what `fit` reads; the rest is provenance)."""
    return {"toxic": pair.sample["text"], "nontoxic": pair.rewrite, "toxic_score": pair.sample["toxicity"],
            "nontoxic_score": pair.rewrite_score, "toxic_loglik": pair.toxic_loglik,
            "nontoxic_loglik": pair.nontoxic_loglik, "rewriter": rewriter, "sample_id": pair.sample["id"]}


def induce(
    output_dir: str = "runs/induce/smollm2-135m",
    base_model: str = "smollm2-135m",
    dtype: str | None = None,
    prompts: str | None = None,
    num_prompts: int | None = 200,
    unprompted_samples: int = 0,
    sampling: SamplingSettings = SamplingSettings(  # noqa: B008 (frozen, never mutated)
        num_samples=5, max_new_tokens=32, max_prompt_tokens=None),
    batch_size: int = 8,
    scorer: ToxicityScorer | str = "profanity-check",
    top_n: int = 100,
    min_toxicity: float = 0.5,
    rewriter: Rewriter | str = "self",
    max_rewrite_toxicity: float = 0.5,
    max_loglik_gap: float | None = 1.0,
    output: str | None = None,
) -> Path:
    """Mine steering pairs from the model itself and write them as a pairs JSONL; returns its path.

    Args:
        output_dir: folder of `samples.jsonl` (reused by a rerun with the same sampling settings), `settings.json`,
            `pairs.jsonl` and `summary.json`.
        base_model: the model to induce from (built-in name, .gguf, folder or hub id).
        dtype: its dtype (None: as stored).
        prompts: inducing prompts: a ParaDetox TSV (its toxic column, the paper's choice for LLMs), a prompts
            JSONL or text file; None for unprompted samples only.
        num_prompts: inducing prompts sampled with `sampling.seed`, at least 1 (None: all).
        unprompted_samples: samples from the start token alone (the paper's choice for GPT-2), rounded up to a
            multiple of `sampling.num_samples`; at least 0.
        sampling: how each prompt is continued: `num_samples` continuations per inducing prompt of
            `max_new_tokens` tokens, nucleus `top_p` at `temperature`; `seed` draws the inducing prompts and seeds
            every continuation; `max_prompt_tokens` cuts longer prompts from the left (None: only to the room the
            context leaves).
        batch_size: prompts per generation batch (each brings `sampling.num_samples` rows), at least 1.
        scorer: toxicity scorer: a short name (`profanity-check`, `hf-classifier`, `perspective`) or
            `class_path`/`init_args` (`--scorer.help PerspectiveScorer` lists its options).
        top_n: how many of the most toxic samples to keep (paper: 500), at least 1.
        min_toxicity: a kept sample scores at least this, in [0, 1].
        rewriter: a short name: `self` (the model rewrites its text), `lexical`, `openai-compatible`, or `none`
            (non-parallel: the most toxic samples paired with the least toxic ones); or `class_path`/`init_args`
            (`--rewriter.help LexicalRewriter` lists its options).
        max_rewrite_toxicity: drop a pair whose non-toxic side scores this or more (> 0; above 1: keep all).
        max_loglik_gap: drop a pair whose sides' mean per-token log-likelihoods differ by more (nats, at least 0);
            None: keep.
        output: the pairs file (default `<output_dir>/pairs.jsonl`); refused when it is one of the run's inputs
            (`prompts`, a rewriter's files, the base model), a file of `output_dir` it keeps, or a folder.
    """
    check_options(prompts, num_prompts, unprompted_samples, batch_size, top_n, min_toxicity, max_rewrite_toxicity,
                  max_loglik_gap)
    toxicity, writer = build_scorer(scorer), build_rewriter(rewriter)
    folder = Path(output_dir)
    target = Path(output) if output else folder / "pairs.jsonl"
    check_output(target, folder, base_model, ([prompts] if prompts is not None else []) + writer.inputs())
    toxicity.setup()  # a missing API key or classifier is an error now, not after the sampling
    writer.setup()
    # The keys `samples.jsonl` folders have always recorded; one recorded without `max_prompt_tokens` matches its
    # default (None), so it still resumes.
    ensure_settings(folder, {"base_model": base_model, "dtype": dtype, "prompts": prompts, "num_prompts": num_prompts,
                             "samples_per_prompt": sampling.num_samples, "max_new_tokens": sampling.max_new_tokens,
                             "top_p": sampling.top_p, "temperature": sampling.temperature, "seed": sampling.seed,
                             "max_prompt_tokens": sampling.max_prompt_tokens, "scorer": toxicity.fingerprint()})
    model, tokenizer = load_base_model(base_model, dtype=dtype)
    steered = SteeredCausalLM(model, tokenizer)

    jobs = sampling_jobs(steered, prompts, num_prompts, unprompted_samples, sampling)
    samples_path = folder / "samples.jsonl"
    done = {r["id"] for r in read_jsonl(samples_path, "samples file")} if samples_path.is_file() else set()
    todo = [job for job in jobs if job.id not in done]
    log.info("inducing: %d prompts already sampled, %d to go", len(jobs) - len(todo), len(todo))
    started = time.perf_counter()
    sample_jobs(steered, todo, samples_path, toxicity, sampling, batch_size)
    generation_s = time.perf_counter() - started

    pool = scored_pool(samples_path, jobs, toxicity)
    selected = select_most_toxic(pool, top_n, min_toxicity)
    rewritten, too_long = rewrite_selected(selected, writer, RewriteContext(steered, pool, [s["id"] for s in selected]))
    nontoxic = drop_toxic_rewrites(rewritten, toxicity, max_rewrite_toxicity)
    pairs = drop_unlike_pairs(nontoxic, steered, max_loglik_gap, batch_size * sampling.num_samples)
    counts = {"generated_prompts": len(todo), "samples": len(pool), "selected": len(selected),
              "no_rewrite": len(selected) - len(rewritten) - too_long, "rewrite_too_long": too_long,
              "rewrite_still_toxic": len(rewritten) - len(nontoxic),
              "loglik_gap": len(nontoxic) - len(pairs), "pairs": len(pairs), "generation_s": round(generation_s, 1)}

    if not pairs:
        kept = f"; {target} is left as it was" if target.exists() else ""
        raise InduceError(f"no pairs: {counts}{kept}. Loosen the filters (top_n, min_toxicity, max_rewrite_toxicity, "
                          f"max_loglik_gap) or check the rewriter")
    write_atomic(target, "".join(json.dumps(pair_row(p, writer.name), ensure_ascii=False) + "\n" for p in pairs))
    write_atomic(folder / "summary.json", json.dumps(counts, indent=2) + "\n")
    log.info("induced pairs: %s -> %s", counts, target)
    return target
