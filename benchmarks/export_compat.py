"""Whether an exported Hugging Face folder gives the live steered model's logits and greedy text in another
transformers, the 4.x that serving stacks still pin.

Exports `--ckpt` (`destein export`, format `hf`), then loads the folder with stock `AutoModelForCausalLM` and
`AutoTokenizer` in a separate Python whose transformers is `--transformers` (a throwaway virtual environment made
for the run, with the other packages of this one), and compares its logits and greedy continuations of a few
prompts with the live steered model's in this process, and runs the everyday idiom
`model.generate(**tokenizer(text, return_tensors="pt"))`, which fails when the tokenizer gives an output the model
does not take. `--python PATH` uses that interpreter instead (`current`:
this one, which checks only the code path). Writes `docs/results/export_compat.md`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

import torch

from benchmarks.results import ROOT, Results, shown
from destein_pl import SteeredCausalLM
from destein_pl.steering.export import export

CHECKPOINT = ROOT / "checkpoints" / "smollm2-135m-paradetox.ckpt"
PROMPTS = ["You are such a stupid", "The weather today is", "I can't stand those people, they are all",
           "Shut up, you", "Once upon a time there was", "The worst thing about my neighbour is that he"]
STOCK = """
import json, sys
import torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, prompts, tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(folder)
out = {"version": transformers.__version__, "tokenizer": type(tokenizer).__name__,
       "outputs": sorted(tokenizer("x")), "logits": [], "texts": [], "idiom": []}
with torch.no_grad():
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        out["logits"].append(model(input_ids=ids).logits[0, -1].tolist())
        new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:]
        out["texts"].append(tokenizer.decode(new, skip_special_tokens=True))
        try:  # the everyday idiom: every output of the tokenizer straight into generate
            batch = tokenizer(prompt, return_tensors="pt")
            new = model.generate(**batch, max_new_tokens=tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:]
            out["idiom"].append(tokenizer.decode(new, skip_special_tokens=True))
        except (TypeError, ValueError) as err:
            out["idiom"].append({"error": f"{type(err).__name__}: {err}".splitlines()[0][:200]})
print(json.dumps(out))
"""


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", type=Path, default=CHECKPOINT, help="steering checkpoint (default: the shipped one)")
    parser.add_argument("--transformers", default="4.57.*", help="the transformers of the throwaway environment")
    parser.add_argument("--python", default=None,
                        help="a Python with the transformers to check (`current`: this one); default: a throwaway "
                             "environment with --transformers")
    parser.add_argument("--tokens", type=int, default=20, help="greedy new tokens per prompt")


def stock_python(args: argparse.Namespace, folder: Path) -> str:
    """The interpreter to load the folder with: `--python`, or a new environment with `--transformers`."""
    if args.python == "current":
        return sys.executable
    if args.python is not None:
        return args.python
    venv.create(folder, system_site_packages=True, with_pip=True)
    python = str(folder / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", f"transformers=={args.transformers}"], check=True)
    return python


@torch.no_grad()
def live(steered: SteeredCausalLM, tokens: int) -> dict[str, list]:
    """The live steered model's last-position logits and greedy continuations of `PROMPTS`."""
    tokenizer, out = steered.tokenizer, {"logits": [], "texts": []}
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        out["logits"].append(steered(input_ids=ids).logits[0, -1])
        new = steered.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                               do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:]
        out["texts"].append(tokenizer.decode(new, skip_special_tokens=True))
    return out


def run(args: argparse.Namespace, results: Results) -> None:
    steered = SteeredCausalLM.from_checkpoint(args.ckpt)
    expected = live(steered, args.tokens)
    with tempfile.TemporaryDirectory() as tmp:
        folder = export(str(args.ckpt), str(Path(tmp) / "export"))
        python = stock_python(args, Path(tmp) / "env")
        answer = subprocess.run([python, "-c", STOCK, str(folder), json.dumps(PROMPTS), str(args.tokens)],
                                check=True, capture_output=True, text=True)
    stock = json.loads(answer.stdout.strip().splitlines()[-1])
    rows = []
    for prompt, want, got, want_text, got_text, idiom in zip(PROMPTS, expected["logits"], stock["logits"],
                                                             expected["texts"], stock["texts"], stock["idiom"]):
        diff = float((torch.tensor(got) - want).abs().max())
        same_text = "yes" if got_text == want_text else "no"
        rows.append(f"| {prompt} | {diff:.2e} | {same_text} | {idiom_cell(idiom, want_text)} |")
    same = sum(g == w for g, w in zip(stock["texts"], expected["texts"]))
    idiom_same = sum(i == w for i, w in zip(stock["idiom"], expected["texts"]))
    results.write("export_compat", "An exported folder in another transformers", (
        f"`{shown(args.ckpt)}` exported as a Hugging Face folder, loaded with stock `AutoModelForCausalLM` and "
        f"`AutoTokenizer` (`{stock['tokenizer']}`) in transformers {stock['version']}, against the live steered "
        f"model in this process (transformers of this environment): the largest difference of the last position's "
        f"logits, and whether {args.tokens} greedy tokens are the same text. {same} of {len(PROMPTS)} "
        f"continuations are the same. The tokenizer gives {', '.join(f'`{k}`' for k in stock['outputs'])}; "
        f"the everyday `model.generate(**tokenizer(text, return_tensors=\"pt\"))` gives the same text for "
        f"{idiom_same} of {len(PROMPTS)} prompts.\n\n"
        "| prompt | max abs logit difference | same greedy text | `generate(**tokenizer(text))` |\n"
        "| --- | ---: | --- | --- |\n" + "\n".join(rows)))


def idiom_cell(idiom: str | dict, expected: str) -> str:
    """The table's cell for the everyday idiom: the same text, other text, or the error it raised."""
    if isinstance(idiom, dict):
        return f"error: {idiom['error'].replace('|', '/')}"
    return "same text" if idiom == expected else "other text"
