"""The moment engine: row moments (both kernels), grouped Chan merges and the EMA factor.

References: float64 formulas over the concatenated data (``torch.var_mean`` on the float64
copy), and torch's BatchNorm for the running update.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_norms._moments import (
    Moments,
    batch_moments,
    ema_factor,
    group_moments,
    kernel_input_dtype,
    row_moments,
    update_running,
)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_row_moments_exact_far_from_zero(layout: str) -> None:
    """Both kernels (BN statistics on the row view; var_mean for strided input) are exact."""
    torch.manual_seed(0)
    x = torch.randn(5, 3, 7, 6) * 0.5 + 1e4
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    mean, var = row_moments(x)
    ref_var, ref_mean = torch.var_mean(x.double().flatten(2), dim=2, correction=0)
    assert mean.dtype == var.dtype == torch.float32
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-7, atol=0)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-4, atol=0)


def test_row_moments_half_and_2d() -> None:
    x = torch.randn(4, 3, 5).half()
    mean, var = row_moments(x)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=2, correction=0)
    assert mean.dtype == torch.float32
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-6, atol=1e-6)
    flat = torch.randn(4, 3)
    mean, var = row_moments(flat)
    assert torch.equal(mean, flat) and not var.any()


def test_group_moments_equal_the_concatenated_groups() -> None:
    torch.manual_seed(1)
    x = torch.randn(9, 2, 4, 4, dtype=torch.float64) * 3 + 7
    ids = torch.tensor([2, 0, 2, 2, 0, 2, 0, 2, 2])
    n, mean, m2 = batch_moments(x, ids, num_groups=4)
    assert n.tolist() == [48.0, 0.0, 96.0, 0.0]
    for g in (0, 2):
        part = x[ids == g].transpose(0, 1).reshape(2, -1)
        torch.testing.assert_close(mean[g], part.mean(1))
        torch.testing.assert_close(m2[g], (part - part.mean(1, keepdim=True)).square().sum(1))
    assert not mean[[1, 3]].any() and not m2[[1, 3]].any()
    one = group_moments(*row_moments(x), 16, None)
    whole = x.transpose(0, 1).reshape(2, -1)
    torch.testing.assert_close(one.var(unbiased=False)[0], whole.var(1, correction=0))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_update_running_equals_batchnorm(momentum: float | None) -> None:
    torch.manual_seed(2)
    bn = nn.BatchNorm2d(3, momentum=momentum)
    mean, var = torch.zeros(1, 3), torch.ones(1, 3)
    steps = torch.zeros(1, dtype=torch.long)
    for _ in range(3):
        x = torch.randn(4, 3, 5, 5) * 2 + 1
        bn(x)
        update_running(mean, var, batch_moments(x), momentum, steps)
    torch.testing.assert_close(mean[0], bn.running_mean)
    torch.testing.assert_close(var[0], bn.running_var)
    assert int(steps) == int(bn.num_batches_tracked) == 3


def test_absent_group_and_factor() -> None:
    mean, var = torch.zeros(2, 1, dtype=torch.float64), torch.ones(2, 1, dtype=torch.float64)
    steps = torch.tensor([4, 7])
    moments = Moments(torch.tensor([2.0, 0.0]), torch.tensor([[3.0], [9.0]]), torch.ones(2, 1))
    update_running(mean, var, moments, None, steps)
    assert steps.tolist() == [5, 7]
    torch.testing.assert_close(mean, torch.tensor([[0.6], [0.0]], dtype=torch.float64))
    assert var.tolist() == [[1.0], [1.0]]
    assert ema_factor(0.3, 10) == 0.3 and ema_factor(None, 5) == 0.2
    with pytest.raises(ValueError, match="num_batches_tracked"):
        update_running(mean, var, moments, None)


@pytest.mark.parametrize(
    ("device", "dtype", "expected"),
    [
        ("cpu", torch.float16, torch.float16),
        ("cuda", torch.bfloat16, torch.bfloat16),
        ("mps", torch.float16, torch.float32),
        ("mps", torch.bfloat16, torch.float32),
        ("mps", torch.float32, torch.float32),
        ("xpu", torch.float16, torch.float32),
    ],
)
def test_kernel_input_dtype_upcasts_off_cpu_and_cuda(device, dtype, expected) -> None:
    """Issue 21.6: the MPS dispatch decision, testable without the device."""
    assert kernel_input_dtype(torch.device(device), dtype, torch.float32) == expected


def test_one_position_rows_need_no_reduction_kernel() -> None:
    """Issue 21.7: ``(N, C)`` and ``(N, C, 1)`` rows are the values (variance 0), exactly."""
    x = torch.randn(5, 3, dtype=torch.float64)
    for t in (x, x[..., None], x[..., None, None]):
        mean, var = row_moments(t)
        assert torch.equal(mean, x) and torch.equal(var, torch.zeros_like(x))
    mean, var = row_moments(x.half())
    assert mean.dtype == torch.float32 and torch.equal(mean, x.half().float())
