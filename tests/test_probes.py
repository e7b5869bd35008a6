import pytest
import torch

from destein_pl.calibration.probes import fit_head_probes, split_pairs


def test_split_keeps_pairs_whole_and_is_seeded():
    train, val = split_pairs(40, 0.2, seed=0)
    assert len(val) == 8 and len(train) == 32 and not set(train) & set(val)
    assert set(train) | set(val) == set(range(40))
    assert (split_pairs(40, 0.2, seed=0)[1] == val).all() and not (split_pairs(40, 0.2, seed=1)[1] == val).all()
    with pytest.raises(ValueError, match="val_fraction"):
        split_pairs(10, 1.5, seed=0)


def test_probe_accuracy_in_unit_interval_and_one_for_a_separable_head():
    g = torch.Generator().manual_seed(0)
    n, L, H, D = 40, 2, 3, 8
    toxic, nontoxic = torch.randn(n, L, H, D, generator=g), torch.randn(n, L, H, D, generator=g)
    toxic[:, 1, 2, 0] += 10.0  # layer 1, head 2 separates trivially along one dimension
    probes = fit_head_probes(toxic, nontoxic, val_fraction=0.2, seed=0)
    assert probes.accuracy.shape == (L, H) and probes.coef.shape == (L, H, D)
    assert ((probes.accuracy >= 0) & (probes.accuracy <= 1)).all()
    assert probes.accuracy[1, 2] == 1.0
    assert probes.coef[1, 2, 0] > 0  # positive score means toxic
    noise = torch.ones(L, H, dtype=torch.bool)
    noise[1, 2] = False
    assert probes.accuracy[noise].mean() < 0.9  # heads of pure noise are not separable
