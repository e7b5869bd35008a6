"""What llama.cpp makes of a GGUF export: does it apply the folded bias, and does it continue text as the live
steered model does?

Exports `--ckpt` as GGUF (`destein export --format gguf`: the base file's tensors as stored, plus float32
`blk.N.attn_output.bias`), and writes float32 copies of the base file and of the export (every quantized tensor
dequantized) beside them. For each prompt, in llama.cpp (`llama-cpp-python`) on the quantized and the float32
pair: the cosine between the steering's effect on the next-token logits (export minus base) and the live steered
model's (steered minus base, in this process on the dequantized weights), and whether `--tokens` greedy tokens
equal live steering's. Needs `llama-cpp-python` (it builds llama.cpp from source: about 30 minutes on 2 cores).
Writes `docs/results/llama_cpp.md`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize

from benchmarks.results import ROOT, Results, shown
from destein_pl import SteeredCausalLM
from destein_pl.steering.checkpoint import read_checkpoint
from destein_pl.steering.export import export
from destein_pl.steering.gguf_export import base_gguf_file

CHECKPOINT = ROOT / "checkpoints" / "smollm2-135m-paradetox.ckpt"
PROMPTS = ["You are such a stupid", "The weather today is", "I can't stand those people, they are all",
           "Shut up, you", "Once upon a time there was", "The worst thing about my neighbour is that he"]
FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", type=Path, default=CHECKPOINT, help="steering checkpoint of a GGUF base model")
    parser.add_argument("--tokens", type=int, default=20, help="greedy new tokens per prompt")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many of the fixed prompts")


def float32_copy(source: Path, target: Path) -> Path:
    """`source` with every quantized tensor dequantized to float32, all metadata kept."""
    reader = GGUFReader(source)
    writer = GGUFWriter(target, arch=reader.get_field("general.architecture").contents())
    for item in reader.fields.values():
        if item.name == "general.architecture" or item.name.startswith("GGUF."):
            continue
        value_type = item.types[0]
        sub_type = item.types[-1] if value_type == GGUFValueType.ARRAY else None
        writer.add_key_value(item.name, item.contents(), value_type, sub_type=sub_type)
    arrays = {}
    for tensor in reader.tensors:
        data = np.asarray(tensor.data)
        if tensor.tensor_type not in FLOAT_TYPES:
            data = dequantize(data, tensor.tensor_type)
        arrays[tensor.name] = data.astype(np.float32).reshape(data.shape)
        writer.add_tensor(tensor.name, arrays[tensor.name], raw_dtype=GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


class LlamaCpp:
    """One GGUF file in llama.cpp: next-token logits after a token-id prompt, and greedy continuations."""

    def __init__(self, path: Path) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=256, n_threads=torch.get_num_threads(), verbose=False)

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float64)

    def greedy(self, ids: list[int], tokens: int, end: set[int]) -> list[int]:
        out: list[int] = []
        logits = self.logits(ids)
        for _ in range(tokens):
            token = int(np.argmax(logits))
            if token in end:
                break
            out.append(token)
            self.llm.eval([token])
            logits = np.array(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float64)
        return out


@torch.no_grad()
def live(steered: SteeredCausalLM, ids: list[int], tokens: int, end: set[int]) -> tuple[np.ndarray, list[int]]:
    """The live model's next-token logits after `ids`, and its greedy continuation (stopping at an end token)."""
    x = torch.tensor([ids])
    logits = steered(input_ids=x).logits[0, -1].double().numpy()
    new = steered.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=tokens, do_sample=False,
                           pad_token_id=steered.tokenizer.pad_token_id)[0, len(ids):].tolist()
    return logits, [t for t in new[: next((i for i, t in enumerate(new) if t in end), len(new))]]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def run(args: argparse.Namespace, results: Results) -> None:
    steered = SteeredCausalLM.from_checkpoint(args.ckpt, dtype="float32")
    tokenizer = steered.tokenizer
    end = {tokenizer.eos_token_id, *([steered.generation_config.eos_token_id] if isinstance(
        steered.generation_config.eos_token_id, int) else steered.generation_config.eos_token_id or [])}
    prompts = PROMPTS[: args.prompts]
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    alpha = steered.alpha
    wanted = [live(steered, i, args.tokens, end) for i in ids]
    steered.alpha = 0.0
    live_base = [live(steered, i, 1, end)[0] for i in ids]
    base_file = base_gguf_file(read_checkpoint(args.ckpt)[1])
    rows, summary = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = export(str(args.ckpt), str(Path(tmp) / "export"), format="gguf")
        exported = next(folder.glob("*.gguf"))
        pairs = {"as exported (base tensors as stored)": (base_file, exported),
                 "float32 (every tensor dequantized)": (float32_copy(base_file, Path(tmp) / "base-f32.gguf"),
                                                        float32_copy(exported, Path(tmp) / "export-f32.gguf"))}
        for label, (base_path, steered_path) in pairs.items():
            base_cpp, steered_cpp = LlamaCpp(base_path), LlamaCpp(steered_path)
            same = 0
            for prompt, prompt_ids, (want_logits, want_tokens), base_logits in zip(prompts, ids, wanted, live_base):
                effect = steered_cpp.logits(prompt_ids) - base_cpp.logits(prompt_ids)
                agree = cosine(effect, want_logits - base_logits)
                equal = steered_cpp.greedy(prompt_ids, args.tokens, end) == want_tokens
                same += equal
                rows.append(f"| {label} | {prompt} | {agree:.4f} | {'yes' if equal else 'no'} |")
            summary.append(f"{label}: {same} of {len(prompts)}")
    import llama_cpp

    results.write("llama_cpp", "The GGUF export in llama.cpp", (
        f"`{shown(args.ckpt)}` (alpha {alpha:g}) exported as GGUF and run by llama.cpp (llama-cpp-python "
        f"{llama_cpp.__version__}), against the live steered model in this process on the dequantized float32 "
        f"weights. The cosine compares the steering's effect on the next-token logits (llama.cpp: export minus base "
        f"file; live: steered minus alpha 0); a cosine near 1 means llama.cpp applies the folded bias. Greedy "
        f"continuations of {args.tokens} tokens equal to live steering's: {'; '.join(summary)}.\n\n"
        "| files | prompt | cosine of the steering's effect | same greedy tokens |\n| --- | --- | ---: | --- |\n"
        + "\n".join(rows)))
