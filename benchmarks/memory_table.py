"""Expected GPU memory per device for the multi-GPU configs, computed from the model shapes, with the arithmetic:
the README's tables, written to `docs/results/memory_table.md`.

Parameter counts come from building each model on the meta device (no weights, no download) from its public
shape (config.json of meta-llama/Llama-2-13b-hf and -70b-hf). Everything else is arithmetic on the settings of
`configs/paper/llama2-13b.yaml` and `configs/paper/llama2-70b.yaml`. Not counted: the CUDA context and the
allocator's slack (typically 1-3 GiB), activations of one layer (small beside the KV cache at these batch sizes).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from benchmarks.results import Results

GIB = 2**30
BF16 = 2  # bytes per weight and per cached key/value
SHAPES = {
    "Llama-2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096),
    "Llama-2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096),
}


@dataclass
class Shape:
    name: str
    params: int
    layer_params: int
    outer_params: int  # embeddings, final norm, LM head: the FSDP root unit
    layers: int
    heads: int
    head_dim: int
    kv_bytes_per_token: int  # all layers, keys and values

    @classmethod
    def of(cls, name: str) -> Shape:
        config = LlamaConfig(**SHAPES[name])
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        params = sum(p.numel() for p in model.parameters())
        layer = sum(p.numel() for p in model.model.layers[0].parameters())
        head_dim = config.hidden_size // config.num_attention_heads
        kv = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * BF16
        return cls(name, params, layer, params - layer * config.num_hidden_layers, config.num_hidden_layers,
                   config.num_attention_heads, head_dim, kv)


def row(part: str, arithmetic: str, value: float) -> tuple[str, str, float]:
    return part, arithmetic, value / GIB


def table(title: str, rows: list[tuple[str, str, float]]) -> str:
    lines = [f"**{title}**", "", "| per GPU | arithmetic | GiB |", "|---|---|---:|"]
    lines += [f"| {part} | {arithmetic} | {gib:.1f} |" for part, arithmetic, gib in rows]
    lines.append(f"| **total** | | **{sum(r[2] for r in rows):.1f}** |")
    return "\n".join(lines)


def steering(m: Shape) -> tuple[str, str, float]:
    n = m.layers * m.heads * (m.head_dim + 1)
    return row("steering buffers (whole on every GPU)", f"{m.layers} x {m.heads} x ({m.head_dim} + 1) x 4 B", n * 4)


def kv(m: Shape, tokens: int, what: str) -> tuple[str, str, float]:
    return row(f"KV cache, {what}", f"{tokens:,} tokens x {m.kv_bytes_per_token / 2**20:.2f} MiB",
               tokens * m.kv_bytes_per_token)


def sharded(m: Shape, gpus: int) -> list[tuple[str, str, float]]:
    return [
        row(f"{m.name} shard", f"{m.params / 1e9:.2f} B params x 2 B / {gpus}", m.params * BF16 / gpus),
        row(f"{m.name} outer weights gathered (FSDP root: embeddings, LM head)",
            f"{m.outer_params / 1e9:.3f} B x 2 B", m.outer_params * BF16),
        row(f"{m.name} decoder layers gathered (current + prefetched)", f"2 x {m.layer_params / 1e6:.0f} M x 2 B",
            2 * m.layer_params * BF16),
    ]


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=64,
                        help="padded prompt width (RealToxicityPrompts prompts are shorter; max_prompt_tokens 512)")
    parser.add_argument("--perplexity-batch-size", type=int, default=64)


def run(args: argparse.Namespace, results: Results) -> None:
    m13, m70 = Shape.of("Llama-2-13b"), Shape.of("Llama-2-70b")
    judge_tokens = args.perplexity_batch_size * (args.prompt_tokens + 20)
    replicas = table(
        f"LLaMA-2-13B replicas (DDP) + LLaMA-2-70B perplexity model sharded over {args.gpus} GPUs "
        "(`configs/paper/llama2-13b.yaml`)",
        [row("Llama-2-13b weights (a whole replica)", f"{m13.params / 1e9:.2f} B params x 2 B", m13.params * BF16),
         steering(m13),
         kv(m13, 16384, "one generation batch (max_batch_tokens 16384)"),
         *sharded(m70, args.gpus),
         kv(m70, judge_tokens, f"perplexity batch ({args.perplexity_batch_size} x ({args.prompt_tokens} + 20))")])
    steered = table(
        f"LLaMA-2-70B steered, sharded over {args.gpus} GPUs (`destein_fsdp`, `configs/paper/llama2-70b.yaml`)",
        [*sharded(m70, args.gpus), steering(m70),
         kv(m70, 32768, "one generation batch (max_batch_tokens 32768)"),
         kv(m70, judge_tokens, f"perplexity batch ({args.perplexity_batch_size} x ({args.prompt_tokens} + 20))")])
    results.write("memory_table", "Expected memory per GPU of the multi-GPU configs", (
        "Computed from the models' public shapes (built on the meta device: no weights, no download) and the "
        "settings of the configs. Not counted: the CUDA context and the allocator's slack (typically 1-3 GiB), "
        f"activations of one layer (small beside the KV cache at these batch sizes).\n\n{replicas}\n\n{steered}"))
