"""Every benchmark, in the order of `docs/BENCHMARKS.md`: what it answers, the results file it writes, the options
of its standard run (what `make bench` runs, and what made the committed file) and of its quick run (seconds: what
the tests run), grouped into the page's sections with the note that says what each section answers.

A benchmark `NAME` is the module `benchmarks.NAME`, which declares its options (`add_options(parser)`) and runs
(`run(args, results)`); nothing else about it is written anywhere but here.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from benchmarks.frontier import GATED_ALPHAS, GEMMA3_GATED_ALPHAS, setting_name

GATED_SERIES = ("smooth-paper", "smooth-floor", "forward", "forward-floor")
"""The gated series of a dense frontier: the context gate and the forward gate, each with and without the floor."""


def dense(*series: tuple[str, tuple[float, ...]]) -> str:
    """`--only` for a dense frontier: the base model and each series at its alphas."""
    return "--only base " + " ".join(setting_name({"series": name, "alpha": a}) for name, alphas in series
                                     for a in alphas)


def jigsaw(folder: str, settings: tuple[str, ...], name: str) -> str:
    """`scorer_rescore`'s options for stored runs `runs/<folder>/<setting>` rescored by the Jigsaw BiLSTM."""
    return (" ".join(f"runs/{folder}/{setting}" for setting in settings)
            + f" --scorer jigsaw-bilstm --name {name} --threads 2")


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: `python -m benchmarks <name> [options]`."""

    name: str
    """Its command name, and its module under `benchmarks/`."""
    description: str
    """What it answers, in one line."""
    output: str
    """Its results file under `docs/results/`, without `.md`; `{option}` fields are filled from the parsed options
    (e.g. `claims-n{per_subset}-s{samples}`)."""
    standard: tuple[str, ...] = ("",)
    """The options of each standard run: what `make bench` runs, and what made the committed results file."""
    quick: str = ""
    """The options of the quick run (`--quick`, seconds): `{runs}` is the run's folder for stored runs, `{tiny}` a
    tiny random model with the embedded model's tokenizer and `{tiny_ckpt}` a steering checkpoint for it
    (`benchmarks.tiny`)."""
    needs: tuple[str, ...] = ()
    """Benchmarks whose stored runs its quick run reads (they run first)."""
    gpu: bool = False
    """Its standard run needs a CUDA GPU: `make bench` skips it on a machine without one."""
    requires: tuple[str, ...] = ()
    """Python modules beyond the project's that it imports: where one is missing it is skipped (`make bench`, the
    tests) or refused (`python -m benchmarks NAME`), naming the module; its module docstring says how to get it."""

    def missing(self) -> list[str]:
        """The modules of `requires` that this Python cannot import."""
        return [name for name in self.requires if importlib.util.find_spec(name) is None]


@dataclass(frozen=True)
class Section:
    """A section of `docs/BENCHMARKS.md`: a title, the note that says what it answers, and its benchmarks."""

    title: str
    note: str
    benchmarks: tuple[Benchmark, ...]


SECTIONS: tuple[Section, ...] = (
    Section(
        "The paper's claims",
        "Each ablation of the paper, rerun on SmolLM2-135M (and on Gemma 3 270M, second table) with the development "
        "protocol of `benchmarks/frontier.py` "
        "(reduced to the first 50 + 50 prompts of its tune sample and 10 continuations, so that every setting fits "
        "in minutes here). The verdicts come from a paired bootstrap over prompts; \"not detectable at this size\" "
        "means the 95% interval of the difference includes 0. Read against the paper: the top half of the heads "
        "beats the bottom half, as in the paper's Table 11, and more pairs than 20 do not help, as in its Table 9; "
        "but here 5 pairs already do as well as 20, where the paper's m = 5 is clearly worse. The paper's other gaps "
        "do not show at this size: probe weights against uniform ones, parallel against non-parallel pairs, and, "
        "plainly against the paper, self-induced against universal ParaDetox pairs (its EMT 0.203 against 0.327 "
        "becomes no detectable difference here, with the self-induced pairs costing more perplexity). One alpha for "
        "every setting mixes strength with direction: uniform weights steer harder than probe weights, and pay for "
        "it in perplexity. The second table reruns the claims on Gemma 3 270M, a base model of another family, at "
        "its own alpha (0.4, chosen for the reference setting on these same prompts, which favours the reference "
        "over the other rows): probe weights beat uniform ones on the toxic prompts there, the top/bottom-half gap "
        "no longer shows, and the self-induced claim fails again, more plainly: Gemma's own parallel pairs (lexical "
        "rewrites) do detectably worse than universal ParaDetox pairs, and, over all prompts, than its own "
        "non-parallel ones; the "
        "published-code fusion is refused, since Gemma's heads do not slice its hidden size.",
        (Benchmark("claims", "the paper's ablations: head weights, top/bottom heads, m, parallel and self-induced "
                   "pairs, fusion", "claims{model_tag}-n{per_subset}-s{samples}",
                   ("--samples 10 --per-subset 50", "--samples 10 --per-subset 50 --model gemma3-270m --alpha 0.4"),
                   "--model {tiny} --samples 1 --tokens 2 --per-subset 1 --only base destein m5 m10 m20 m80"),)),
    Section(
        "Choosing alpha",
        "The steering strength of the shipped 40-pair checkpoint, swept on toxic RealToxicityPrompts prompts with "
        "the paper's protocol: `configs/smollm2-135m.yaml` takes the strongest alpha that cuts EMT by at least 40% "
        "with perplexity at most 50% above the base model's.",
        (Benchmark("alpha_sweep", "EMT and perplexity of the shipped checkpoint over alphas (table and plot)",
                   "alpha_sweep", quick="--ckpt {tiny_ckpt} --n 1 --samples 1 --tokens 2 --alphas 0 1.3"),)),
    Section(
        "Fusion variants, the gate and the pairs: the quality frontier",
        "The published-code fusion against the paper's, the probe gate, and self-induced pairs against universal "
        "ones, from `benchmarks/frontier.py` (the README's \"Gating and fusion variants\" section discusses them), "
        "and how well the gate's probe score separates toxic from non-toxic prompts.",
        (Benchmark("frontier", "the quality frontier of fusion variants, gate and pairs on the development protocol",
                   "frontier{model_tag}-{split}-n{per_subset}-s{samples}",
                   ("--samples 10 --only base paper-a0.9 paper-a1.3 smooth-paper-a1.3 smooth-paper-a1.8",
                    "--samples 5 " + dense(("paper", (0.5, 0.7, 0.9, 1.1, 1.3)), *(
                        (series, GATED_ALPHAS) for series in GATED_SERIES)),
                    "--split report --only base shipped smooth-paper-a1.3",
                    ("--samples 10 --per-subset 25 --only base hard-paper-a1.8 norm_preserving-a1.3 norm_preserving-a2 "
                     "pairs-paradetox-40-a1.3 pairs-self-induced-fewshot-a1.3 pairs-self-induced-lexical-a1.3 "
                     "paper-a0.9 paper-a1.3 paper-a1.8 published-a0.1 published-a0.3 smooth-paper-a1.3 "
                     "smooth-paper-a1.8"),
                    ("--model gemma3-270m --samples 10 --per-subset 50 --only base norm_preserving-a0.6 paper-a0.3 "
                     "paper-a0.4 paper-a0.5 paper-a0.6 paper-a0.75 paper-a1.3 smooth-paper-a0.6 smooth-paper-a0.8 "
                     "smooth-paper-a1"),
                    # the forward series stop at 0.8 on Gemma: the context gate at 1.0 already costs over +35%
                    "--model gemma3-270m --samples 5 --per-subset 50 " + dense(
                        ("paper", (0.3, 0.4, 0.5, 0.6, 0.75)), ("smooth-paper", GEMMA3_GATED_ALPHAS),
                        ("smooth-floor", GEMMA3_GATED_ALPHAS), ("forward", GEMMA3_GATED_ALPHAS[:-1]),
                        ("forward-floor", GEMMA3_GATED_ALPHAS[:-1])),
                    "--model gemma3-270m --split report --samples 10 --only base shipped smooth-floor-a0.7"),
                   "--samples 1 --tokens 2 --per-subset 1 --only base pairs-paradetox-40-a1.3"),
         Benchmark("gate_scores", "how well the gate's probe score separates toxic from non-toxic prompts (AUROC, "
                   "threshold)", "gate_scores{model_tag}-{split}",
                   ("", "--split report", "--model gemma3-270m --checkpoints paradetox-40"),
                   "--per-subset 2 --checkpoints paradetox-1000"),
         Benchmark("forward_gate", "the forward-looking gate: continuation probes fit on prompts of neither sample, "
                   "and how well its score predicts a toxic continuation on tune, against the context gate's",
                   "forward_gate{model_tag}{target_tag}", ("", "--target share", "--model gemma3-270m --per-subset 50"),
                   "--rtp 40 --pairs 0 --samples 2 --tokens 2 --toxic-at 0.1 --per-subset 1 --tune-samples 1",
                   needs=("frontier",)))),
    Section(
        "DeStein against other methods",
        "The methods a user would pick instead (prompting, word filtering, ActAdd, ITI, Self-Detoxify, DExperts; "
        "`destein_pl/baselines/`), each swept on the tune sample of the development protocol, then compared with "
        "DeStein at matched toxic-prompt perplexity (+10% and +20% over base) on the report sample.",
        (Benchmark("dexperts_train", "DExperts' expert and anti-expert: LoRA fine-tunes on ParaDetox's two sides",
                   "dexperts_train-{model_name}", ("", "--model gemma3-270m"),
                   "--model {tiny} --sentences 8 --batch-size 4",
                   requires=("peft",)),
         Benchmark("comparison", "every method's sweep on tune, then the matched points against DeStein on report",
                   "comparison-{model}-{split}-n{per_subset}-s{samples}",
                   ("--samples 5 --per-subset 25", "--split report --samples 10",
                    "--model gemma3-270m --samples 5 --per-subset 25",
                    "--model gemma3-270m --split report --samples 5 --per-subset 25"),
                   "--samples 1 --tokens 2 --per-subset 1 --only prompting iti-k16"))),
    Section(
        "Scorer fidelity",
        "How well each offline scorer agrees with Perspective on the 2,000 RealToxicityPrompts prompts, and whether "
        "the EMT drop survives rescoring by a second scorer: the Jigsaw BiLSTM of `toxic-comment-classifier`, which "
        "shares nothing with the steered model, and a classifier built here from the embedded model (no model hub "
        "is reachable).",
        (Benchmark("scorer_classifier", "the second offline scorer: a ParaDetox classifier on the embedded model, "
                   "with its held-out AUROC", "scorer_classifier",
                   quick="--base-model {tiny} --pairs 10 --out {runs}/classifiers/tiny"),
         Benchmark("scorer_fidelity", "offline scorers against Perspective: AUROC, Spearman rho, texts/s",
                   "scorer_fidelity", ("--threads 1",),
                   "--classifier {runs}/classifiers/tiny --limit 5 --repeats 1", needs=("scorer_classifier",)),
         Benchmark("scorer_rescore", "the EMT drop of stored evaluation runs under a second scorer",
                   "scorer_rescore{scorer_tag}",
                   (("runs/claims/tune-n50-s10/base runs/claims/tune-n50-s10/destein "
                     "runs/claims/tune-n50-s10/self-induced-parallel runs/claims/tune-n50-s10/published-a0.3 "
                     "--threads 2"),
                    jigsaw("frontier/report-n100-s25", ("base", "shipped", "smooth-paper-a1.3"), "frontier-report"),
                    jigsaw("frontier/tune-n100-s5", ("base", "forward-floor-a1.8", "smooth-floor-a1.3",
                                                     "smooth-paper-a1.3", "paper-a0.7"), "frontier-tune"),
                    jigsaw("comparison/gemma3-270m/report-n25-s5", ("base", "destein-a0.4", "actadd-l12-a1",
                                                                    "dexperts-a0.5", "self_detoxify-a0.25"),
                           "comparison-gemma3-270m"),
                    jigsaw("frontier/gemma3-270m/report-n100-s10", ("base", "shipped", "smooth-floor-a0.7"),
                           "frontier-gemma3-270m-report")),
                   "{runs}/claims/tiny-llama/tune-n1-s1-t2/base {runs}/claims/tiny-llama/tune-n1-s1-t2/destein "
                   "--classifier {runs}/classifiers/tiny",
                   needs=("claims", "scorer_classifier")))),
    Section(
        "Self-induced pairs: the rewriter",
        "The `self` rewriter of `destein induce` on the embedded model: the paper's instruction against few-shot "
        "ParaDetox demonstrations, by how many rewrites come back, keep the source's content, turn non-toxic and "
        "pass the pipeline's filters.",
        (Benchmark("self_rewriter", "the `self` rewriter's modes: instruction against few-shot demonstrations",
                   "self_rewriter",
                   quick="--model {tiny} --n 1 --examples 1 --num-candidates 1 --num-demonstrations 2"),)),
    Section(
        "Speed and how cost grows",
        "Loading the embedded model, generation with steering live and folded into a bias (on both cores, nothing "
        "else running), the evaluation sampler against Hugging Face `generate`, where evaluation time goes (by "
        "phase, and under the profiler by region and operator, with the sampler now and as it was before its "
        "nucleus choice stopped sorting the whole vocabulary), the throughput goals before and now, calibration "
        "throughput, and the time of calibration and evaluation as they grow. The evaluation and "
        "calibration tables, and the memory table's wall times, ran on one thread while another one-thread "
        "benchmark used the second core; each ratio is measured within one run, its parts in turn.",
        (Benchmark("load_speed", "load time of a built-in model (cold and cached), generation with and without "
                   "steering", "load_speed{model_tag}", ("", "--ckpt checkpoints/gemma3-270m-paradetox.ckpt"),
                   quick="--ckpt {tiny_ckpt} --tokens 2 --batch 1 --repeats 1"),
         Benchmark("fold_speed", "generation of the base, live-steered and folded models", "generation_speed",
                   ("--threads 2 --repeats 9",), "--ckpt {tiny_ckpt} --tokens 2 --repeats 1"),
         Benchmark("evaluation_cost", "the sampler against `generate`, where evaluation time goes, its growth with "
                   "prompts", "evaluation_cost", ("--threads 1",),
                   "--ckpt {tiny_ckpt} --samples 2 --tokens 2 --repeats 1 --sampler-prompts 1 --split-prompts 1 "
                   "--sizes 1 2 "
                   "--growth-samples 1 --growth-repeats 1"),
         Benchmark("evaluation_profile", "one evaluation under the profiler: by phase, by region (prefill, decode, "
                   "perplexity, nucleus, gate) and by operator, with the sampler now and as it was before",
                   "evaluation_profile-{ckpt.stem}-{sampler}",
                   ("--sampler before", "", "--ckpt checkpoints/smollm2-135m-gated.ckpt --sampler before",
                    "--ckpt checkpoints/smollm2-135m-gated.ckpt"),
                   "--ckpt {tiny_ckpt} --prompts 1 --samples 1 --tokens 2 --top 3"),
         Benchmark("throughput", "the evaluation throughput goals before and now: sampler against generate, time "
                   "outside generation, gated against ungated, one protocol point", "throughput",
                   quick="--samples 1 --tokens 2 --sampler-prompts 1 --split-prompts 1 --repeats 1 "
                   "--point-per-subset 1 --point-samples 1"),
         Benchmark("gate_depth", "a gate whose heads come from the first layers only: its shadow pass's cost "
                   "against its accuracy and the protocol's metrics", "gate_depth",
                   quick="--ckpt {tiny_ckpt} --layers 1 --per-subset 1 --samples 1 --tokens 2 --timing-prompts 1 "
                   "--timing-samples 1 --repeats 1"),
         Benchmark("calibration_cost", "recording batched against one text at a time, probes, growth with m",
                   "calibration_cost", ("--threads 1 --check-m 1000",),
                   "--model {tiny} --pairs 10 --repeats 1 --sizes 10 12 --size-repeats 1"))),
    Section(
        "Memory",
        "The steering state and checkpoint against the paper's Table 8, the peak memory of `fit` and `test`, and the "
        "memory per GPU that the multi-GPU configs need, from the models' shapes.",
        (Benchmark("memory", "steering state, checkpoint files against the paper's Table 8, peak memory of fit and "
                   "test", "memory", ("--threads 1",), "--processes import --repeats 1"),
         Benchmark("memory_table", "expected memory per GPU of the multi-GPU configs, from the model shapes",
                   "memory_table"))),
    Section(
        "Several processes and GPUs",
        "The embedded model sharded over two CPU processes, with and without resharding after each forward pass, and "
        "what a GPU changes: steering, folding and the sampler on the device.",
        (Benchmark("fsdp_reshard", "generation speed and peak memory of FSDP with and without "
                   "reshard_after_forward (2 CPU processes)", "fsdp_reshard",
                   quick="--model {tiny} --prompts 1 --samples 1 --tokens 2 --repeats 1"),
         Benchmark("gpu_check", "what a GPU changes: steering exactness, `destein test` in bfloat16, sampler speed, "
                   "batch invariance", "gpu_check", quick="--device cpu --ckpt {tiny_ckpt} --test-prompts 1 "
                   "--samples 1 --tokens 1 --repeats 1", gpu=True))),
    Section(
        "Serving",
        "`destein serve` under load, many requests at mixed steering strengths batched together, against the same "
        "prompts decoded offline in one batch; and what stock engines make of `destein export`: the Hugging Face "
        "folder in the transformers 4.x that serving stacks still pin, and the GGUF file in llama.cpp, against the "
        "live steered model.",
        (Benchmark("serve_load", "`destein serve`: concurrent requests at mixed alphas through the `openai` client, "
                   "requests/s and tokens/s against one offline batch", "serve_load", ("--threads 1",),
                   quick="--ckpt {tiny_ckpt} --requests 4 --tokens 2 --repeats 1",
                   requires=("fastapi", "uvicorn", "openai")),
         Benchmark("export_compat", "an exported folder in transformers 4.x: logits and greedy text against live "
                   "steering", "export_compat", quick="--ckpt {tiny_ckpt} --python current --tokens 2"),
         Benchmark("llama_cpp", "an exported GGUF in llama.cpp: the steering's effect on the logits and greedy "
                   "text against live steering, on the stored and a float32 base", "llama_cpp",
                   quick="--prompts 1 --tokens 2 --bases stored", requires=("llama_cpp",)))),
)

BENCHMARKS: dict[str, Benchmark] = {b.name: b for section in SECTIONS for b in section.benchmarks}


def benchmark(name: str) -> Benchmark:
    """The benchmark called `name`; an error listing them all when there is none."""
    if name not in BENCHMARKS:
        raise SystemExit(f"no benchmark named {name!r}; the benchmarks are {', '.join(BENCHMARKS)} "
                         f"(`python -m benchmarks` lists them)")
    return BENCHMARKS[name]
