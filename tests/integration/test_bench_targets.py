"""``bench/bench_targets.py`` (issue 20's targets in one run): its counters and its smoke run.

The counters are checked on modules whose counts are known by construction: ``nn.BatchNorm2d``
is 3 launches per forward+backward (``native_batch_norm``, its backward, the
``num_batches_tracked`` increment), one more ``torch.add`` is one more; a ``.item()`` is a host
read; a forward that saves one more activation peaks that much higher; ``x * x``
saves one storage. The ``--quick`` run must print every row with a verdict and the summary.
No timing is asserted.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import Tensor, nn

from tests._dist import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "bench"))

import bench_targets
from gpu_check import HOST_READS, _count_ops

SHAPE = (4, 3, 5, 5)


class _BNPlusAdd(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with one extra elementwise op (its backward is a pass-through)."""

    def forward(self, input: Tensor) -> Tensor:
        return torch.add(super().forward(input), 1.0)


class _BNWithItem(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that reads one value back to Python per call."""

    def forward(self, input: Tensor) -> Tensor:
        self.last_mean = input.mean().item()
        return super().forward(input)


class _BNWithBool(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that branches on a tensor (``bool``: is_nonzero -> item -> read)."""

    def forward(self, input: Tensor) -> Tensor:
        if input.isfinite().all():
            return super().forward(input)
        return input


class _BNSquared(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` squared: BN's output is saved for backward, one more activation."""

    def forward(self, input: Tensor) -> Tensor:
        out = super().forward(input)
        return out * out


class _Square(nn.Module):
    def forward(self, input: Tensor) -> Tensor:
        return input * input


class _Fp32Round(nn.Module):
    """Upcasts to fp32 and back: 2 fp32 activations forward (the cast, the product), 2 backward."""

    def forward(self, input: Tensor) -> Tensor:
        return (input.float() * 2).to(input.dtype)


def test_launch_counter_counts_batch_norm_and_one_extra_op() -> None:
    x = torch.randn(SHAPE)
    bn = _count_ops(bench_targets.step_fn(nn.BatchNorm2d(3), x))
    plus = _count_ops(bench_targets.step_fn(_BNPlusAdd(3), x))
    assert bn == 3
    assert plus == bn + 1


def test_host_read_counter_counts_each_read_once() -> None:
    x = torch.randn(SHAPE)
    count = bench_targets.count_host_reads
    assert count(bench_targets.step_fn(nn.BatchNorm2d(3), x)) == 0
    assert count(bench_targets.step_fn(_BNWithItem(3), x)) == 1
    assert count(bench_targets.step_fn(_BNWithBool(3), x)) == 1
    assert _count_ops(bench_targets.step_fn(_BNWithBool(3), x), HOST_READS) == 3  # nested


def test_memory_counters() -> None:
    x = torch.randn(8, 16, 16, 16)
    peak = bench_targets.peak_bytes(nn.BatchNorm2d(16), x, {})
    more = bench_targets.peak_bytes(_BNSquared(16), x, {})
    # the output, the input gradient and the backward kernel's temporary (+ [C]-sized ones)
    assert 3 * x.nbytes <= peak < 3 * x.nbytes + 4096
    assert more - peak >= x.nbytes
    assert bench_targets.saved_bytes(_Square(), x, {}) == x.nbytes
    xb = x.bfloat16()
    bn_fp32 = bench_targets.fp32_activations(
        bench_targets.step_fn(nn.BatchNorm2d(16), xb), x.numel()
    )
    assert bn_fp32 == 0
    assert bench_targets.fp32_activations(bench_targets.step_fn(_Fp32Round(), xb), x.numel()) == 4


def test_counting_backend_counts_compiles() -> None:
    torch._dynamo.reset()
    backend = bench_targets.CountingBackend()
    compiled = torch.compile(nn.BatchNorm2d(3), backend=backend, dynamic=False)
    for shape in (SHAPE, SHAPE, (6, 3, 5, 5)):
        compiled(torch.randn(shape))
    torch._dynamo.reset()
    assert backend.calls == 2


ROW_LABELS = [
    *(
        f"host reads  {name}  train / eval"
        for name in ("DomainBatchNorm2d ids", "DomainBatchNorm2d int", "BatchRenorm2d")
    ),
    *(f"host reads  {name}" for name in ("SyncedBatchNorm2d", "CosineConv2d 1x1", "LayerNorm2d")),
    "host reads  CosineConv2d 3x3",
    "host reads  CosineLinear",
    *(f"launches  {name}" for name in bench_targets.LAUNCH_TARGETS),
    "eager 8x16x4x4  ctl BN / BN copy",
    "eager 8x16x4x4  DomainBatchNorm2d ids / BN",
    "eager 8x16x16x16  DomainBatchNorm2d ids / masked BNs",
    "eager 8x16x16x16  BatchRenorm2d / BN",
    "CosineConv2d 1x1 / Conv2d",
    "CosineLinear / Linear",
    *(f"{name} / BN" for name in ("DomainBatchNorm2d ids", "BatchRenorm2d", "SyncedBatchNorm2d")),
    *(f"graph breaks  {name}" for name in ("DomainBatchNorm2d ids", "BatchRenorm2d")),
    "compiles  DomainBatchNorm2d ids  3 sizes x 3 compositions",
    "compiles  DomainBatchNorm2d int  3 sizes x 3 compositions",
    "graph breaks  BatchRenorm2d  same run (dynamic shapes)",
    *(f"precise BN  {m}" for m in ("resnet18", "mobilenet_v3_small")),
    "memory  DomainBatchNorm2d ids  peak / BN's, bf16 input",
    "memory  DomainBatchNorm2d ids  bf16 input: fp32 activations made",
]


@pytest.mark.slow
def test_quick_run_prints_every_target() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "bench_targets.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [line for line in proc.stdout.splitlines() if line.endswith(("met", "MISSED", "info"))]
    for label in ROW_LABELS:
        assert any(row.startswith(label) or f" {label}" in row for row in rows), label
    judged = [row for row in rows if not row.endswith("info")]
    assert len(rows) == 65
    assert f"of {len(judged)} targets met" in proc.stdout
    assert "launches  nn.BatchNorm2d (control)" in proc.stdout
    assert "3 (twin 3)" in proc.stdout


@pytest.mark.parametrize("name", sorted(bench_targets.LAUNCH_TARGETS))
def test_launch_targets_hold(name: str) -> None:
    """Issue 20's launch targets, with the bench's own counter and cases (no timing)."""
    cases = {case[0]: case for case in bench_targets._launch_cases()}
    _, ours, kwargs, twin, x = cases[name]
    count = _count_ops(bench_targets.step_fn(ours, x, kwargs))
    assert count <= bench_targets.LAUNCH_TARGETS[name], (name, count)
    assert count >= _count_ops(bench_targets.step_fn(twin, x))  # the counter counts ours
