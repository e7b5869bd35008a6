"""A model sharded over 2 gloo processes computes what the whole model computes, and the lockstep lets processes
with different amounts of work finish together."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, AutoTokenizer

from destein_pl.evaluation.perplexity import continuation_nll
from destein_pl.steering.architectures import architecture_for
from destein_pl.steering.sharding import Lockstep, drain, load_sharded, world_mesh
from tests.conftest import PERPLEXITY_RTOL

TEXTS = ["the cat sat on", "you are a", "one two three four five"]


def _logits(model, tokenizer):
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    arch = architecture_for(model.config)
    with torch.no_grad():
        return model(**arch.padded_inputs(batch["input_ids"], batch["attention_mask"])).logits


def _worker(rank: int, init_file: str, model_dir: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model, tokenizer = load_sharded(model_dir, world_mesh("cpu"), "cpu")
        out = {"logits": _logits(model, tokenizer)}
        drain(model)
        # Rank 0 measures 3 prompts' continuations, rank 1 one prompt: the lockstep pads rank 1's calls.
        prompts = TEXTS if rank == 0 else TEXTS[:1]
        ids = tokenizer(["a b", "c d e"], add_special_tokens=False)["input_ids"]
        out["nll"] = [continuation_nll(model, architecture_for(model.config), tokenizer(p)["input_ids"], ids,
                                       tokenizer.pad_token_id, batch_size=1) for p in prompts]
        out["empty_calls"] = drain(model)
        out["sharded"] = isinstance(model.destein_lockstep, Lockstep)
        out["dtensors"] = [type(p).__name__ == "DTensor" for p in model.parameters()]
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_sharded_model_computes_what_the_whole_model_computes(tiny_llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.padding_side = "left"
    expected = _logits(model, tokenizer)
    ids = tokenizer(["a b", "c d e"], add_special_tokens=False)["input_ids"]
    expected_nll = [continuation_nll(model, architecture_for(model.config), tokenizer(p)["input_ids"], ids,
                                     tokenizer.pad_token_id, batch_size=1) for p in TEXTS]
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tiny_llama_dir), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for out in ranks:
        assert out["sharded"] and all(out["dtensors"])
        assert torch.equal(out["logits"], expected)
    for rank, expected_prompts in ((0, expected_nll), (1, expected_nll[:1])):
        assert len(ranks[rank]["nll"]) == len(expected_prompts)
        for got, want in zip(ranks[rank]["nll"], expected_prompts):
            assert got == pytest.approx(want, rel=PERPLEXITY_RTOL)
    # each prompt makes 2 calls per continuation (prompt, continuation) at batch size 1: rank 1 is 8 calls short
    assert (ranks[0]["empty_calls"], ranks[1]["empty_calls"]) == (0, 8)
