import math
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from destein_pl.evaluation.metrics import (
    ContinuationPerplexity,
    DistinctN,
    ExpectedMaxToxicity,
    PerPromptMetric,
    ToxicityProbability,
    distinct_n,
)

NAN = float("nan")

# four prompts, three continuations each; maxima 0.7, 0.4, (none: left out), 0.5
TOX_KEYS = torch.tensor([10, 11, 12, 13])
TOXICITY = torch.tensor([
    [0.1, 0.7, NAN],
    [0.2, 0.3, 0.4],
    [NAN, NAN, NAN],
    [0.5, NAN, 0.05],
])
EMT = (0.7 + 0.4 + 0.5) / 3
TP_05 = 2 / 3  # 0.7 >= 0.5, 0.4 < 0.5, 0.5 >= 0.5

# (sum, count) per prompt: (10 + 20, 2), (0, 0), (5 + 15 + 40, 3) -> 90 / 5
PPL_KEYS = torch.tensor([10, 11, 12])
PERPLEXITY = torch.tensor([[10.0, 20.0, NAN], [NAN, NAN, NAN], [5.0, 15.0, 40.0]])
PPL = (10 + 20 + 5 + 15 + 40) / 5

TEXT_KEYS = torch.tensor([0, 1, 2])
TEXTS = [["the cat sat", "the cat ran"], ["a a a a"], ["", "one"]]
# n=1: {the, cat, sat, ran} / 6 = 2/3, {a} / 4 = 1/4, {one} / 1 = 1           -> (2/3 + 1/4 + 1) / 3 = 23/36
# n=2: {the cat, cat sat, cat ran} / 4 = 3/4, {a a} / 3 = 1/3, none (left out) -> (3/4 + 1/3) / 2 = 13/24
# n=3: {the cat sat, the cat ran} / 2 = 1, {a a a} / 2 = 1/2, none (left out) -> (1 + 1/2) / 2 = 3/4
DISTINCT = {1: 23 / 36, 2: 13 / 24, 3: 3 / 4}


def test_expected_max_toxicity_and_toxicity_probability():
    emt, tp, tp_06 = ExpectedMaxToxicity(), ToxicityProbability(), ToxicityProbability(threshold=0.6)
    for metric in (emt, tp, tp_06):
        metric.update(TOX_KEYS, TOXICITY)
    assert emt.compute().item() == pytest.approx(EMT)
    assert tp.compute().item() == pytest.approx(TP_05)
    assert tp_06.compute().item() == pytest.approx(1 / 3)  # only 0.7 >= 0.6


def test_continuation_perplexity():
    metric = ContinuationPerplexity()
    metric.update(PPL_KEYS, PERPLEXITY)
    assert metric.compute().item() == pytest.approx(PPL)


def test_distinct_n_function():
    assert distinct_n(TEXTS[0], 1) == pytest.approx(2 / 3)
    assert distinct_n(["x y", "x y"], 2) == 1 / 2  # joined, "x y x y" would give {x y, y x} / 3 = 2/3
    assert distinct_n(["a", "b"], 2) is None  # no bigram inside a continuation
    assert distinct_n([], 1) is None
    with pytest.raises(ValueError, match="at least 1"):
        distinct_n(["a"], 0)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_distinct_n_metric(n):
    metric = DistinctN(n)
    metric.update(TEXT_KEYS, TEXTS)
    assert metric.compute().item() == pytest.approx(DISTINCT[n])


def _metric_cases() -> list[tuple[Callable[[], PerPromptMetric], Tensor, list, float]]:
    """(metric factory, keys, per-prompt data as a list of rows, expected value) for every metric."""
    return [
        (ExpectedMaxToxicity, TOX_KEYS, list(TOXICITY), EMT),
        (ToxicityProbability, TOX_KEYS, list(TOXICITY), TP_05),
        (ContinuationPerplexity, PPL_KEYS, list(PERPLEXITY), PPL),
        (lambda: DistinctN(2), TEXT_KEYS, TEXTS, DISTINCT[2]),
    ]


def _update(metric: PerPromptMetric, keys: Tensor, rows: list, index: list[int]) -> None:
    """Update `metric` with the prompts at positions `index` (tensor data stacked, texts as a list)."""
    data = [rows[i] for i in index]
    metric.update(keys[index], torch.stack(data) if isinstance(rows[0], Tensor) else data)


@pytest.mark.parametrize("case", range(4))
def test_duplicate_prompts_count_once(case):
    make, keys, rows, expected = _metric_cases()[case]
    every = list(range(len(keys)))
    in_one_call = make()
    _update(in_one_call, keys, rows, every + [0, 0])  # the first prompt three times in one update
    split = make()
    _update(split, keys, rows, every[:2])
    _update(split, keys, rows, every[1:] + [0])  # prompts 0 and 1 again in a second update
    for metric in (in_one_call, split):
        assert metric.compute().item() == pytest.approx(expected)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_empty_state_is_nan():
    for make, *_ in _metric_cases():
        assert math.isnan(make().compute().item())
    only_missing = ExpectedMaxToxicity()
    only_missing.update(torch.tensor([1]), torch.tensor([[NAN, NAN]]))
    assert math.isnan(only_missing.compute().item())


def test_keys_must_match_prompts():
    with pytest.raises(ValueError, match="keys must have shape"):
        ExpectedMaxToxicity().update(torch.tensor([1, 2]), torch.tensor([[0.1, 0.2]]))


# Five prompts over two ranks the way a DistributedSampler pads them: six slots, prompt 0 repeated on rank 1.
SYNC_KEYS = torch.tensor([100, 101, 102, 103, 104])
SYNC_TOXICITY = torch.tensor([[0.9, 0.8], [0.1, NAN], [NAN, NAN], [0.3, 0.6], [0.2, 0.0]])
SYNC_PERPLEXITY = torch.tensor([[50.0, 70.0], [NAN, 12.0], [8.0, 9.0], [NAN, NAN], [30.0, 31.0]])
SYNC_TEXTS = [["b a b", "a"], ["c c", "c"], ["x y z", "x y"], [""], ["u v u v"]]
SYNC_SHARDS = [[0, 2, 4], [1, 3, 0]]


def _sync_metrics() -> dict[str, PerPromptMetric]:
    return {
        "emt": ExpectedMaxToxicity(),
        "tp": ToxicityProbability(),
        "ppl": ContinuationPerplexity(),
        "dist1": DistinctN(1),
        "dist2": DistinctN(2),
    }


def _sync_compute(index: list[int]) -> dict[str, float]:
    """Update every metric with the prompts at `index`, one prompt per update call, and compute them."""
    metrics = _sync_metrics()
    for i in index:
        metrics["emt"].update(SYNC_KEYS[[i]], SYNC_TOXICITY[[i]])
        metrics["tp"].update(SYNC_KEYS[[i]], SYNC_TOXICITY[[i]])
        metrics["ppl"].update(SYNC_KEYS[[i]], SYNC_PERPLEXITY[[i]])
        metrics["dist1"].update(SYNC_KEYS[[i]], [SYNC_TEXTS[i]])
        metrics["dist2"].update(SYNC_KEYS[[i]], [SYNC_TEXTS[i]])
    return {name: metric.compute().item() for name, metric in metrics.items()}


def _sync_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.save(_sync_compute(SYNC_SHARDS[rank]), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_sync_deduplicates_padded_prompt(tmp_path):
    expected = _sync_compute(list(range(len(SYNC_KEYS))))
    padded = _sync_compute(SYNC_SHARDS[0] + SYNC_SHARDS[1])
    assert padded == expected  # one process: the padded prompt counts once too
    # without deduplication prompt 0 (max 0.9) would count twice: (0.9 * 2 + 0.1 + 0.6 + 0.2) / 5 != 1.8 / 4
    assert expected["emt"] == pytest.approx((0.9 + 0.1 + 0.6 + 0.2) / 4)
    mp.spawn(_sync_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt") == pytest.approx(expected)
