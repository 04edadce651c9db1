"""mix_real_fake: the round trip, the labels, gradients, generators, devices and errors."""

from __future__ import annotations

import pytest
import torch

from lightning_norms.data import mix_real_fake


def test_round_trip_and_labels():
    real = torch.randn(5, 3, 4, 4)
    fake = torch.randn(7, 3, 4, 4)
    x, is_real, perm = mix_real_fake(real, fake, torch.Generator().manual_seed(0))
    both = torch.cat([real, fake])
    assert x.shape == (12, 3, 4, 4) and is_real.shape == (12,) and perm.shape == (12,)
    assert perm.dtype == torch.long and sorted(perm.tolist()) == list(range(12))
    assert torch.equal(x, both[perm])
    # undo: argsort, or scatter back
    assert torch.equal(x[perm.argsort()], both)
    undone = torch.empty_like(x)
    undone[perm] = x
    assert torch.equal(undone[:5], real) and torch.equal(undone[5:], fake)
    # labels: 1 exactly where a real row landed
    assert is_real.dtype == real.dtype
    expected = torch.tensor([1.0 if p < 5 else 0.0 for p in perm.tolist()])
    assert torch.equal(is_real, expected)
    assert torch.equal(x[is_real.bool()].sort(0).values, real.sort(0).values)
    assert int(is_real.sum()) == 5
    # actually shuffled: not real-then-fake
    assert perm.tolist() != list(range(12))


def test_generator_makes_it_reproducible_and_default_is_random():
    real, fake = torch.randn(16, 2), torch.randn(16, 2)
    a = mix_real_fake(real, fake, torch.Generator().manual_seed(3))
    b = mix_real_fake(real, fake, torch.Generator().manual_seed(3))
    c = mix_real_fake(real, fake, torch.Generator().manual_seed(4))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(a[2], c[2])
    torch.manual_seed(0)
    d = mix_real_fake(real, fake)
    torch.manual_seed(0)
    e = mix_real_fake(real, fake)
    assert torch.equal(d[2], e[2])


def test_gradients_reach_real_and_fake():
    real = torch.randn(4, 3, requires_grad=True)
    fake = torch.randn(6, 3, requires_grad=True)
    weights = torch.arange(10.0).unsqueeze(1)
    x, _, perm = mix_real_fake(real, fake)
    (x * weights).sum().backward()
    # row perm[j] of cat([real, fake]) sits at position j and gets gradient j
    grad = torch.empty(10)
    grad[perm] = torch.arange(10.0)
    assert torch.equal(real.grad, grad[:4].unsqueeze(1).expand(4, 3))
    assert torch.equal(fake.grad, grad[4:].unsqueeze(1).expand(6, 3))


def test_integer_inputs_get_float_labels_and_half_keeps_its_dtype():
    _, is_real, _ = mix_real_fake(torch.ones(2, 2, dtype=torch.long), torch.zeros(3, 2).long())
    assert is_real.dtype == torch.float32
    _, is_real, _ = mix_real_fake(torch.ones(2, 2).half(), torch.zeros(3, 2).half())
    assert is_real.dtype == torch.float16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_inputs_with_cpu_and_cuda_generators():
    real, fake = torch.randn(3, 2, device="cuda"), torch.randn(5, 2, device="cuda")
    for generator in (None, torch.Generator().manual_seed(0), torch.Generator("cuda")):
        x, is_real, perm = mix_real_fake(real, fake, generator)
        assert x.device == is_real.device == perm.device == real.device
        assert torch.equal(x, torch.cat([real, fake])[perm])


@pytest.mark.parametrize(
    ("real", "fake", "error", "match"),
    [
        (torch.zeros(2, 3), torch.zeros(2, 4), ValueError, "shape"),
        (torch.zeros(2, 3), torch.zeros(2, 3, 1), ValueError, "shape"),
        (torch.zeros(2, 3), torch.zeros(2, 3).double(), ValueError, "dtype"),
        (torch.zeros(2, 3), torch.zeros(2, 3, device="meta"), ValueError, "device"),
        (torch.zeros(()), torch.zeros(()), ValueError, "real"),
        (torch.zeros(2, 3), torch.zeros(0, 3), ValueError, "fake"),
        ([1.0, 2.0], torch.zeros(2), TypeError, "real"),
    ],
)
def test_bad_inputs(real, fake, error, match):
    with pytest.raises(error, match=match):
        mix_real_fake(real, fake)


def test_bad_generator():
    with pytest.raises(TypeError, match="generator"):
        mix_real_fake(torch.zeros(2), torch.zeros(2), generator=0)
