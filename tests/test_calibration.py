import pytest
import torch

from destein_pl.calibration.vectors import head_weights, steering_vectors


def test_vectors_are_mean_nontoxic_minus_toxic():
    toxic = torch.tensor([[[[1.0, 2.0]]], [[[3.0, 0.0]]]])  # [N=2, L=1, H=1, D=2]
    nontoxic = torch.tensor([[[[0.0, 0.0]]], [[[1.0, 4.0]]]])
    assert torch.equal(steering_vectors(toxic, nontoxic), torch.tensor([[[-1.5, 1.0]]]))


def test_head_weights_modes_and_top_k():
    acc = torch.tensor([[0.5, 0.9], [1.0, 0.7]])
    assert torch.equal(head_weights(acc, "probe"), acc)
    assert torch.equal(head_weights(acc, "uniform"), torch.ones(2, 2))
    assert torch.equal(head_weights(acc, "probe", top_k=2), torch.tensor([[0.0, 0.9], [1.0, 0.0]]))
    assert torch.equal(head_weights(acc, "uniform", top_k=1), torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="top_k_heads must be between 1 and 4"):
        head_weights(acc, top_k=5)
    with pytest.raises(ValueError, match="'probe' or 'uniform'"):
        head_weights(acc, "random")
