"""DExperts' two experts for a built-in model: LoRA fine-tunes of the base model on ParaDetox's two sides, the
non-toxic rewrites (expert) and the toxic originals (anti-expert), merged into plain model folders that
`destein_pl.baselines.DExperts` loads.

    python -m benchmarks dexperts_train [--model smollm2-135m] [--sentences 2000] [--epochs 1]

Each expert: LoRA (rank 16, alpha 32, every linear layer of the decoder), AdamW at 2e-4, batches of 16 sentences,
one epoch over the first `--sentences` usable pairs of a seeded shuffle of `../shared/data/paradetox/paradetox.tsv`
(the pairs DeStein's calibration samples come from the same file; the RealToxicityPrompts prompts are untouched).
The 200 pairs after them are held out: the table gives each model's mean token loss on both held-out sides, before
and after, so an expert that did not learn its side shows. The folders go to `runs/dexperts/<model>/{expert,
antiexpert}` (float32, about 4 bytes a parameter each) and are rebuilt only when missing.

Needs `peft` (`pip install peft`).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch

from benchmarks.results import DATA, Results

PARADETOX = DATA / "paradetox" / "paradetox.tsv"
HELD_OUT = 200
SEED = 0
ROLES = {"expert": "nontoxic", "antiexpert": "toxic"}
"""Each expert and the side of the pairs it is trained on."""


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="built-in base model (default smollm2-135m)")
    parser.add_argument("--sentences", type=int, default=2000, help="training sentences per expert (default 2000)")
    parser.add_argument("--epochs", type=int, default=1, help="passes over them (default 1)")
    parser.add_argument("--batch-size", type=int, default=16, help="sentences per step (default 16)")


def output_fields(args: argparse.Namespace) -> dict[str, str]:
    return {"model_name": model_name(args.model)}


def model_name(model: str) -> str:
    """A built-in name as it is; a folder by its last part."""
    return Path(model).name


def experts_folder(runs: Path, model: str) -> Path:
    """Where the experts of `model` are stored: `<runs>/dexperts/<model>/{expert,antiexpert}`."""
    return runs / "dexperts" / model


def sides(sentences: int) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(training texts, held-out texts) per side, from a seeded shuffle of the usable ParaDetox pairs."""
    from destein_pl.calibration.pairs import read_pairs, usable_pairs

    pairs, _ = usable_pairs(read_pairs(PARADETOX))
    random.Random(SEED).shuffle(pairs)
    if len(pairs) < sentences + HELD_OUT:
        raise SystemExit(f"--sentences {sentences}: {PARADETOX.name} has {len(pairs)} usable pairs, and "
                         f"{HELD_OUT} are held out")
    train, held = pairs[:sentences], pairs[sentences : sentences + HELD_OUT]
    names = ("toxic", "nontoxic")
    return ({s: [getattr(p, s) for p in train] for s in names}, {s: [getattr(p, s) for p in held] for s in names})


def batches(tokenizer, texts: list[str], size: int):
    """Right-padded batches with the pads masked out of the labels: every real token keeps its position."""
    tokenizer.padding_side = "right"
    for start in range(0, len(texts), size):
        encoded = tokenizer(texts[start : start + size], return_tensors="pt", padding=True, truncation=True,
                            max_length=64)
        labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
        yield {**encoded, "labels": labels}


@torch.no_grad()
def mean_loss(model, tokenizer, texts: list[str]) -> float:
    """Mean token loss over texts (token-weighted)."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches(tokenizer, texts, 32):
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        total += model(**batch).loss.item() * tokens
        count += tokens
    return total / count


def train(base: str, texts: list[str], epochs: int, batch_size: int):
    """A LoRA fine-tune of the base model on `texts`, merged into a plain model."""
    from peft import LoraConfig, get_peft_model

    from destein_pl import load_base_model

    model, tokenizer = load_base_model(base, dtype="float32")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    torch.manual_seed(SEED)
    model.train()
    order = list(texts)
    for epoch in range(epochs):
        random.Random(SEED + epoch).shuffle(order)
        for batch in batches(tokenizer, order, batch_size):
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return model.merge_and_unload().eval(), tokenizer


def run(args: argparse.Namespace, results: Results) -> None:
    from destein_pl import load_base_model

    train_texts, held = sides(args.sentences)
    folder = experts_folder(results.runs, model_name(args.model))
    base, tokenizer = load_base_model(args.model, dtype="float32")
    rows = [("base", {s: mean_loss(base, tokenizer, held[s]) for s in held}, None)]
    for role, side in ROLES.items():
        target = folder / role
        started = time.perf_counter()
        if not (target / "config.json").is_file():
            model, tok = train(args.model, train_texts[side], args.epochs, args.batch_size)
            partial = target.with_name(f".{role}.partial")  # moved into place only once complete
            shutil.rmtree(partial, ignore_errors=True)
            model.save_pretrained(partial)
            tok.save_pretrained(partial)
            os.replace(partial, target)
            seconds = time.perf_counter() - started
        else:
            seconds = None
        model, tok = load_base_model(str(target))
        rows.append((role, {s: mean_loss(model, tok, held[s]) for s in held}, seconds))
    lines = ["| model | trained on | held-out loss, non-toxic side | held-out loss, toxic side | training seconds |",
             "|---|---|---:|---:|---:|"]
    for name, losses, seconds in rows:
        trained = "-" if name == "base" else f"{args.sentences} {ROLES[name].replace('nontoxic', 'non-toxic')} sentences"
        took = "-" if seconds is None else f"{seconds:.0f}"
        lines.append(f"| {name} | {trained} | {losses['nontoxic']:.3f} (ppl {math.exp(losses['nontoxic']):.1f}) | "
                     f"{losses['toxic']:.3f} (ppl {math.exp(losses['toxic']):.1f}) | {took} |")
    name = model_name(args.model)
    text = (f"LoRA experts of {name} for DExperts: rank 16, every linear layer, {args.epochs} epoch(s) over "
            f"{args.sentences} ParaDetox sentences of one side, batches of {args.batch_size}; loss on {HELD_OUT} "
            f"held-out pairs. Training seconds: blank when the stored experts were reused.\n\n" + "\n".join(lines))
    results.write(f"dexperts_train-{name}", f"DExperts experts of {name}", text)
