"""Whether llama.cpp runs an exported GGUF as the live steered model does.

Exports `--ckpt` (`destein export --format gguf`) twice: onto its base GGUF as stored (SmolLM2's Q4_1), and onto
a float32 copy of that base (every tensor dequantized, the same weights the live model computes with), which
tells llama.cpp's quantization noise from the steering. Each file and its base are loaded with llama-cpp-python
and compared, on the same token ids, with the live steered model in this process:

- whether llama.cpp applies the folded bias: the cosine between the steering's effect on the last prompt
  position's logits in llama.cpp (export minus base file) and in the live model (alpha on minus alpha 0);
- how far its steered logits are from the live model's (largest absolute difference);
- whether `--tokens` greedy tokens are the live model's.

It needs `llama_cpp` (llama-cpp-python; no wheel for this CPU build: `pip install llama-cpp-python`, which compiles
llama.cpp in about 30 minutes on 2 cores; on CPUs with AMX, `CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=OFF
-DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF"`, as a native build of 0.3.36 crashed in decode). Writes
`docs/results/llama_cpp.md`.
"""

from __future__ import annotations

import argparse
import tempfile
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader

from benchmarks.export_compat import CHECKPOINT, PROMPTS
from benchmarks.results import Results, shown
from destein_pl import SteeredCausalLM
from destein_pl.steering.checkpoint import read_checkpoint, save_steering
from destein_pl.steering.export import export
from destein_pl.steering.gguf_export import base_gguf_file, write_gguf_copy

BASES = ("stored", "float32")


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", type=Path, default=CHECKPOINT,
                        help="steering checkpoint on a GGUF base model (default: the shipped one)")
    parser.add_argument("--tokens", type=int, default=20, help="greedy new tokens per prompt")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"how many of the {len(PROMPTS)} prompts")
    parser.add_argument("--bases", nargs="+", choices=BASES, default=list(BASES),
                        help="the base files to export onto: as stored, and/or a float32 copy")


def llama(path: Path):
    """llama.cpp on one GGUF file, every position's logits kept (a context of 256 tokens, torch's thread count);
    imported here, so that `--help` works without it."""
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=torch.get_num_threads(), logits_all=True,
                           verbose=False)


def engine_run(path: Path, prompts: list[list[int]], tokens: int, end: int) -> tuple[list[np.ndarray], list[list]]:
    """llama.cpp's last-position logits of each prompt, and its greedy continuation (stopping at `end`)."""
    model, logits, continuations = llama(path), [], []
    for ids in prompts:
        model.reset()
        model.eval(ids)
        logits.append(np.array(model.scores[model.n_tokens - 1], dtype=np.float64))
        new = []
        for _ in range(tokens):
            token = int(np.argmax(model.scores[model.n_tokens - 1]))
            if token == end:
                break
            new.append(token)
            model.eval([token])
        continuations.append(new)
    model.close()
    return logits, continuations


@torch.no_grad()
def live_run(steered: SteeredCausalLM, prompts: list[list[int]], tokens: int
             ) -> tuple[list[np.ndarray], list[np.ndarray], list[list]]:
    """The live model's last-position logits without and with steering, and its steered greedy continuations."""
    calibrated, base, steered_logits, continuations = steered.alpha, [], [], []
    end = steered.generation_config.eos_token_id
    for ids in prompts:
        batch = torch.tensor([ids])
        steered.alpha = 0.0
        base.append(steered(input_ids=batch).logits[0, -1].double().numpy())
        steered.alpha = calibrated
        steered_logits.append(steered(input_ids=batch).logits[0, -1].double().numpy())
        out = steered.generate(input_ids=batch, attention_mask=torch.ones_like(batch), max_new_tokens=tokens,
                               do_sample=False, eos_token_id=end, pad_token_id=end)[0, len(ids):].tolist()
        continuations.append([t for t in out if t != end])
    return base, steered_logits, continuations


def float32_checkpoint(ckpt: Path, folder: Path) -> Path:
    """`ckpt` rebased onto a float32 copy of its base GGUF (written into `folder`)."""
    tensors, metadata = read_checkpoint(ckpt)
    source = base_gguf_file(metadata)
    base = folder / f"{source.stem}-F32.gguf"
    write_gguf_copy(GGUFReader(source), base, {}, {}, {}, dequantized=True)
    rebased = folder / "float32-base.safetensors"
    save_steering(rebased, tensors, {**metadata, "base_model": {**metadata["base_model"], "name_or_path": str(base)}})
    return rebased


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def run(args: argparse.Namespace, results: Results) -> None:
    steered = SteeredCausalLM.from_checkpoint(args.ckpt, dtype="float32")
    tokenizer, end = steered.tokenizer, steered.generation_config.eos_token_id
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS[: args.prompts]]
    live_base, live_steered, live_text = live_run(steered, prompts, args.tokens)
    rows, totals = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for base_kind in args.bases:
            folder = Path(tmp) / base_kind
            folder.mkdir()
            ckpt = args.ckpt if base_kind == "stored" else float32_checkpoint(args.ckpt, folder)
            exported = next(export(str(ckpt), str(folder / "export"), format="gguf").glob("*.gguf"))
            base_file = base_gguf_file(read_checkpoint(ckpt)[1])
            types = sorted({t.tensor_type.name for t in GGUFReader(base_file).tensors})
            engine_base, _ = engine_run(base_file, prompts, 0, end)
            engine_steered, engine_text = engine_run(exported, prompts, args.tokens, end)
            same = 0
            for i, text in enumerate(PROMPTS[: args.prompts]):
                effect = cosine(engine_steered[i] - engine_base[i], live_steered[i] - live_base[i])
                diff = float(np.abs(engine_steered[i] - live_steered[i]).max())
                agrees = engine_text[i] == live_text[i]
                same += agrees
                rows.append(f"| {base_kind} ({', '.join(types)}) | {text} | {effect:.6f} | {diff:.3f} | "
                            f"{'yes' if agrees else 'no'} |")
            totals.append(f"{base_kind} base: {same} of {len(prompts)}")
    results.write("llama_cpp", "An exported GGUF in llama.cpp", (
        f"`{shown(args.ckpt)}` (alpha {steered.alpha:g}) exported with `destein export --format gguf`, loaded by "
        f"llama-cpp-python {version('llama-cpp-python')}, against the live steered model in this process (float32, the "
        f"base weights dequantized), on the same token ids: the cosine between the steering's effect on the last "
        f"prompt position's logits in llama.cpp (export minus its base file) and in the live model (steered minus "
        f"alpha 0), the largest absolute difference of the steered logits, and whether {args.tokens} greedy tokens "
        f"are the live model's ({'; '.join(totals)}). The `stored` base is the file as shipped (quantized); the "
        f"`float32` base is a copy with every tensor dequantized, the weights the live model computes with.\n\n"
        "| base file (tensor types) | prompt | cosine of the steering's effect | max abs logit difference | "
        "same greedy tokens |\n| --- | --- | ---: | ---: | --- |\n" + "\n".join(rows)))
