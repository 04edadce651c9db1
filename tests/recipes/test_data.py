"""The recipes' single-domain data: class-sorted batches (also per DDP rank) and the GAN's
greyscale, tanh-range digits."""

from __future__ import annotations

import pytest
import torch

from lightning_norms.recipes.data import ClassSortedBatchSampler, SingleDomainDigits


def test_class_sorted_batches() -> None:
    labels = torch.arange(10).repeat_interleave(20)
    sampler = ClassSortedBatchSampler(labels, batch_size=8, classes_per_batch=2, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 25
    seen = [i for b in batches for i in b]
    assert len(seen) == len(set(seen)) == 200
    for b in batches:
        counts = torch.bincount(labels[b], minlength=10)
        assert sorted(counts[counts > 0].tolist()) in ([4, 4], [8])
    ranks = [list(ClassSortedBatchSampler(labels, 8, 2, seed=3, sampler=_Rank(r))) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 12
    assert not {i for b in ranks[0] for i in b} & {i for b in ranks[1] for i in b}
    sampler.set_epoch(1)
    assert list(sampler) != batches
    with pytest.raises(ValueError, match="multiple"):
        ClassSortedBatchSampler(labels, batch_size=7, classes_per_batch=2)


class _Rank:
    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.num_replicas = 2


def test_single_domain_digits_grey_tanh() -> None:
    data = SingleDomainDigits(batch_size=8, grey=True, tanh_range=True)
    x, _, d = next(iter(data.train_dataloader()))
    assert x.shape == (8, 1, 8, 8) and data.image_shape == (1, 8, 8)
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.9
    assert (d == 0).all()
    xt, yt = data.test_tensors()
    assert len(xt) == len(yt) == 359
