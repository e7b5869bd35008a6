"""`Evaluator`: the RealToxicityPrompts protocol in plain Python, for a notebook or for the Lightning `test` adapter.

For every alpha it generates `sampling.num_samples` continuations per prompt, scores their toxicity, measures their
perplexity, appends them to the alpha's folder as it goes (a rerun resumes), and aggregates EMT, TP, PPL and
Dist-n per subset with torchmetrics (synchronised across processes when several run). `evaluate()` does all of it
in one call.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh
from tqdm.auto import tqdm

from destein_pl.evaluation.config import EvaluationConfig
from destein_pl.evaluation.perplexity import PerplexityJudge, perplexity
from destein_pl.evaluation.prompts import Prompt
from destein_pl.evaluation.report import markdown_table
from destein_pl.evaluation.runs import AlphaRun, count_warnings, summary_counts
from destein_pl.evaluation.sampling import MIN_ROWS, PromptSampler
from destein_pl.files import jsonable, write_atomic, write_json
from destein_pl.steering.model import SteeredCausalLM
from destein_pl.steering.sharding import drain

log = logging.getLogger(__name__)


class Evaluator:
    """Evaluates a steered model at several alphas on a fixed list of prompts.

    Call `start(prompts)` once with every prompt of the run, `add(batch, keys)` for each batch this process
    handles (`keys`: the prompts' positions in that list), then `finish()` on every process; or `run(prompts)`
    for all three in one process.

    Args:
        steered: the model; its own alpha is restored after each batch.
        config: the protocol's settings.
        rank: this process's rank (0 writes the reports).
        world_size: how many processes share the prompts.
        barrier: waits for every process (e.g. `trainer.strategy.barrier`); needed when `world_size > 1`.
        mesh: the processes' device mesh, over which `config.shard_perplexity_model` shards the perplexity model.
        verbose: print the results table at the end.
    """

    def __init__(self, steered: SteeredCausalLM, config: EvaluationConfig | None = None, rank: int = 0,
                 world_size: int = 1, barrier: Callable[[str], None] | None = None, verbose: bool = True,
                 mesh: DeviceMesh | None = None) -> None:
        if world_size > 1 and barrier is None:
            raise ValueError("several processes need a barrier to wait for each other's generations")
        self.steered, self.config = steered, config or EvaluationConfig()
        self.rank, self.world_size, self.verbose = rank, world_size, verbose
        self.barrier = barrier or (lambda name: None)
        self.mesh = mesh
        self.scorer = self.config.build_scorer()
        self.runs: list[AlphaRun] = []
        self.prompts: list[Prompt] = []
        self.timing = {"generate_s": 0.0, "score_s": 0.0, "perplexity_s": 0.0}
        self.sampler: PromptSampler | None = None
        self.judge: PerplexityJudge | None = None
        self.steering: dict[str, Any] = {}
        self.settings: dict[float, dict[str, Any]] = {}
        self._started = 0.0

    def start(self, prompts: Sequence[Prompt]) -> None:
        """Load the scorer and the perplexity model, open (or resume) each alpha's folder."""
        cfg, steered = self.config, self.steered
        if not prompts:
            raise ValueError("no prompts to evaluate")
        if cfg.attn_implementation is not None:
            steered.model.set_attn_implementation(cfg.attn_implementation)
        self.scorer.setup()
        shard = cfg.shard_perplexity_model and self.world_size > 1
        if shard and self.mesh is None:
            raise ValueError("evaluation.shard_perplexity_model needs the processes' device mesh (Evaluator(mesh=))")
        self.judge = PerplexityJudge.load(steered, cfg.perplexity_model, cfg.perplexity_model_dtype,
                                          cfg.perplexity_batch_size, self.mesh if shard else None)
        self.sampler = PromptSampler(steered, cfg.sampling)
        self.sampler.fix_width(prompts)
        self.prompts = list(prompts)
        alphas = cfg.alphas if cfg.alphas is not None else sorted({0.0, round(steered.alpha, 6)})
        # alpha as the runs name it (the model holds it in float32: 0.800000011920929 for 0.8)
        self.steering = {**steered.steering_settings(), "alpha": round(steered.alpha, 6)}
        if any(alphas) and steered.method is None and not steered.vectors.any():
            self.steering["zero_steering"] = True
        steering = self.steering["digest"]
        self.settings = {alpha: {**cfg.fingerprint(alpha, steering if alpha else None, self.scorer.fingerprint()),
                                 "base_model": steered.base_model} for alpha in alphas}
        self.runs = [
            AlphaRun(alpha, Path(cfg.output_dir) / f"alpha_{alpha:g}", self.settings[alpha], self.prompts,
                     self.sampler.width, cfg.on_changed_prompts == "regenerate", self.rank, self.world_size,
                     steered.device)
            for alpha in alphas
        ]
        self.timing = {"generate_s": 0.0, "score_s": 0.0, "perplexity_s": 0.0}
        self._started = time.perf_counter()

    @torch.inference_mode()  # as under Lightning's `test`, so that both give the same numbers to the last bit
    def add(self, prompts: list[Prompt], keys: torch.Tensor | Sequence[int]) -> None:
        """Evaluate one batch of prompts at every alpha: generate what is not stored yet, score again what could
        not be scored before, and feed the metrics. With a sharded model every process must call `add` as many
        times (Lightning's distributed sampler pads the processes' shares to equal length)."""
        if self.sampler is None:
            raise RuntimeError("call start(prompts) before add()")
        keys = torch.as_tensor(keys)
        index_of = {p.id: int(i) for p, i in zip(prompts, keys.tolist())}
        calibrated_alpha = self.steered.alpha
        try:
            for run in self.runs:
                self.steered.alpha = run.alpha
                todo = [p for p in prompts if p.id not in run.records]
                records = self._generate(todo, index_of)  # also with nothing to do: a sharded model's calls
                if records:
                    run.add(records)
                stale = run.missing_scores(p.id for p in prompts if p not in todo)
                if stale:
                    run.add([self._rescore(record) for record in stale], rescored=True)
                run.update(keys, prompts)
        finally:
            self.steered.alpha = calibrated_alpha

    def _chunks(self, prompts: list[Prompt]) -> list[list[Prompt]]:
        """Prompts split so that a generation batch stays within `max_batch_tokens` (a prompt's samples together)."""
        cfg = self.config
        per_prompt = max(cfg.sampling.num_samples, MIN_ROWS) * (self.sampler.width + cfg.sampling.max_new_tokens)
        size = max(1, cfg.max_batch_tokens // per_prompt)
        return [prompts[i : i + size] for i in range(0, len(prompts), size)]

    def _score(self, texts: list[str]) -> list[float | None]:
        started = time.perf_counter()
        scores = self.scorer.score(texts)
        self.timing["score_s"] += time.perf_counter() - started
        return scores

    def _generate(self, prompts: list[Prompt], index_of: dict[str, int]) -> list[dict[str, Any]]:
        """Generate, measure and score the continuations of prompts, with the model's current alpha.

        All generation comes first, then all perplexity: each ends with every process's forward calls finished,
        so that the collective calls of two sharded models (generator, perplexity model) never interleave.
        """
        started = time.perf_counter()
        chunks = self._chunks(prompts)
        made = [self.sampler(chunk, log_probs=self.judge.reads_log_probs()) for chunk in chunks]
        drain(self.steered.model)
        self.timing["generate_s"] += time.perf_counter() - started
        started = time.perf_counter()
        nll = [[self.judge.mean_nll(ids, p.text, tokens, texts, log_probs)
                for p, ids, tokens, texts, log_probs in zip(chunk, m.prompt_ids, m.tokens, m.texts,
                                                            m.log_probs or [None] * len(chunk))]
               for chunk, m in zip(chunks, made)]
        self.judge.finish_calls()
        self.timing["perplexity_s"] += time.perf_counter() - started
        k, records = self.config.sampling.num_samples, []
        for chunk, m, values in zip(chunks, made, nll):
            scores = self._score([t for texts in m.texts for t in texts])
            records += [
                {"id": p.id, "index": index_of[p.id], "prompt": p.text, "prompt_toxicity": p.toxicity,
                 "continuations": texts, "toxicity": scores[j * k : (j + 1) * k],
                 "perplexity": [perplexity(v) for v in per_sample], "width": self.sampler.width}
                for j, (p, texts, per_sample) in enumerate(zip(chunk, m.texts, values))
            ]
        return records

    def _rescore(self, record: dict[str, Any]) -> dict[str, Any]:
        """A stored record with its missing toxicity scores asked for again (the others are kept)."""
        missing = [i for i, v in enumerate(record["toxicity"]) if v is None]
        toxicity = list(record["toxicity"])
        for i, value in zip(missing, self._score([record["continuations"][i] for i in missing])):
            toxicity[i] = value
        return {**record, "toxicity": toxicity}

    def finish(self) -> dict[str, Any]:
        """Metrics of every alpha (on every process: they synchronise); process 0 merges the generations and
        writes `results.json` per alpha and for the run, and `results.md`. Returns the run's results."""
        summary, steering = [], self.steering
        for run in self.runs:
            result: dict[str, Any] = {"alpha": run.alpha, "metrics": run.compute()}
            self.barrier("generations_written")
            if self.rank == 0:
                records = run.merge(self.prompts)
                counts = summary_counts(records)
                result.update(counts=counts, warnings=count_warnings(run.alpha, counts) + self._steering_warnings(run),
                              steering=steering, settings={**self.settings[run.alpha],
                                                           "prompts": prompts_record(self.prompts)},
                              generated_prompts=run.generated, resumed_prompts=run.resumed,
                              rescored_prompts=run.rescored)
                write_json(run.folder / "results.json", jsonable(result))
            summary.append(result)
        total = time.perf_counter() - self._started
        timing = {**{k: round(v, 3) for k, v in self.timing.items()}, "total_s": round(total, 3),
                  "outside_generate_share": round(1 - self.timing["generate_s"] / total, 4) if total else None,
                  "process": f"rank {self.rank}", "world_size": self.world_size}
        warnings = [w for result in summary for w in result.get("warnings", [])]
        output = jsonable({"base_model": self.steered.base_model, "steering": steering,
                           "scorer": self.scorer.fingerprint(), "cut_prompts": len(self.sampler.cut_prompts),
                           "timing": timing, "warnings": warnings, "runs": summary})
        if self.rank == 0:
            folder = Path(self.config.output_dir)
            write_json(folder / "results.json", output)
            table = markdown_table(output["runs"])
            notes = "".join(f"\n**Warning:** {w}\n" for w in warnings)
            write_atomic(folder / "results.md", table + "\n" + notes)
            if self.verbose:
                print(f"\n{table}\n\nresults: {folder / 'results.json'}")
            missing = sum(r["counts"]["missing_scores"] for r in output["runs"])
            said = list(warnings)
            if missing:
                said.append(f"{missing} toxicity scores are missing (the scorer gave none); their prompts count "
                            f"without them. Rerun with the same output_dir to score only those again.")
            for warning in said:
                log.warning(warning)
                if self.verbose:
                    print(f"WARNING: {warning}")
        return output

    def _steering_warnings(self, run: AlphaRun) -> list[str]:
        """What `results.json` flags about a steered alpha that did not steer: all-zero steering vectors."""
        if run.alpha and self.steering.get("zero_steering"):
            return [f"alpha={run.alpha:g}: the steering vectors are all zero (none set or loaded, and no method), so "
                    f"these are the base model's continuations, not a steered run"]
        return []

    def run(self, prompts: Sequence[Prompt], batch_size: int = 4, progress: bool = True) -> dict[str, Any]:
        """The whole evaluation in this process: `start`, `add` per batch of `batch_size` prompts, `finish`."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.start(prompts)
        starts = range(0, len(self.prompts), batch_size)
        for start in tqdm(starts, desc="evaluating", unit="batch", disable=not progress):
            end = min(start + batch_size, len(self.prompts))
            self.add(self.prompts[start:end], list(range(start, end)))
        return self.finish()


def prompts_record(prompts: Sequence[Prompt]) -> dict[str, Any]:
    """Which prompts a run was evaluated on, as `results.json` records them: their count and the sha256 of their
    ids and texts (in id order)."""
    digest = hashlib.sha256()
    for prompt in sorted(prompts, key=lambda p: p.id):
        digest.update(f"{prompt.id}\x00{prompt.text}\x00".encode())
    return {"count": len(prompts), "sha256": digest.hexdigest()}


def evaluate(steered: SteeredCausalLM, prompts: Sequence[Prompt], config: EvaluationConfig | None = None,
             batch_size: int = 4, progress: bool = True, verbose: bool = True) -> dict[str, Any]:
    """Evaluate `steered` on prompts (RealToxicityPrompts protocol) in this process; returns the results that
    `<config.output_dir>/results.json` holds. The same prompts and settings give the same metrics as
    `destein test`."""
    return Evaluator(steered, config, verbose=verbose).run(prompts, batch_size, progress)
