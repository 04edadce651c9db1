"""Forward+backward time of each lightning-norms layer against its torch reference.

Run: ``python bench/bench_layers.py [--threads 1] [--pairs 60]``. Every layer and its reference
are timed in the same run: after a warm-up, one forward+backward step of each, alternately
(order flipped every pair), ``--pairs`` times. Printed: each side's median time and the median
of the per-pair ratios ``ours / reference`` (robust to load from other processes). CPU only;
threads are set explicitly.

Targets (issue 2): BatchRenorm2d <= 1.3x nn.BatchNorm2d on a 64x64x32x32 batch,
LayerNorm2d <= 1.2x permute + F.layer_norm, CosineConv2d <= 2x nn.Conv2d.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_norms import BatchRenorm2d, CosineConv2d, CosineLinear, LayerNorm2d


class PermuteLayerNorm(nn.LayerNorm):
    """The reference LayerNorm2d: permute to channels-last, ``F.layer_norm``, permute back."""

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, 1e-6)
        return y.permute(0, 3, 1, 2)


def _step_fn(module: nn.Module, x: Tensor) -> Callable[[], None]:
    x = x.detach().requires_grad_(True)
    with torch.no_grad():
        grad = torch.randn_like(module(x))

    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).backward(grad)

    return step


def compare(ours: nn.Module, ref: nn.Module, x: Tensor, pairs: int) -> tuple[float, float, float]:
    """Median time of each side and median of the per-pair ratios ``ours / ref``.

    The two steps run alternately (the order flips every pair), so both sides of a pair see
    the same machine load; the median of the pair ratios is robust to load bursts.
    """
    step_ours, step_ref = _step_fn(ours, x), _step_fn(ref, x)
    for _ in range(3):
        step_ours()
        step_ref()
    t_ours: list[float] = []
    t_ref: list[float] = []
    for i in range(pairs):
        order = ((step_ours, t_ours), (step_ref, t_ref))
        for step, times in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    ratio = statistics.median(a / b for a, b in zip(t_ours, t_ref, strict=True))
    return statistics.median(t_ours), statistics.median(t_ref), ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--pairs", type=int, default=60, help="alternating (ours, ref) pairs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    x_bn = torch.randn(64, 64, 32, 32) * 2 + 0.5
    x_ln = torch.randn(32, 64, 32, 32)
    x_conv = torch.randn(16, 64, 32, 32)
    x_lin = torch.randn(256, 1024)
    cases = [
        (
            "BatchRenorm2d vs nn.BatchNorm2d  [64,64,32,32]",
            BatchRenorm2d(64, warmup_steps=0),
            nn.BatchNorm2d(64),
            x_bn,
        ),
        (
            "BatchRenorm2d vs nn.BatchNorm2d  [64,64,32,32] channels_last",
            BatchRenorm2d(64, warmup_steps=0),
            nn.BatchNorm2d(64),
            x_bn.contiguous(memory_format=torch.channels_last),
        ),
        (
            "LayerNorm2d vs permute+F.layer_norm  [32,64,32,32]",
            LayerNorm2d(64),
            PermuteLayerNorm(64),
            x_ln,
        ),
        (
            "LayerNorm2d vs permute+F.layer_norm  [32,64,32,32] channels_last",
            LayerNorm2d(64),
            PermuteLayerNorm(64),
            x_ln.contiguous(memory_format=torch.channels_last),
        ),
        (
            "CosineConv2d vs nn.Conv2d  64->64 3x3 pad 1  [16,64,32,32]",
            CosineConv2d(64, 64, 3, padding=1),
            nn.Conv2d(64, 64, 3, padding=1),
            x_conv,
        ),
        (
            "CosineLinear vs nn.Linear  1024->1024  [256,1024]",
            CosineLinear(1024, 1024),
            nn.Linear(1024, 1024),
            x_lin,
        ),
    ]
    print(
        f"torch {torch.__version__}, threads={torch.get_num_threads()}, pairs={args.pairs}, "
        f"cpus={os.cpu_count()}, load average {os.getloadavg()[0]:.1f} at start"
    )
    print(f"{'forward+backward':<66} {'ours ms':>9} {'ref ms':>9} {'ratio':>7}")
    for name, ours, ref, x in cases:
        t_ours, t_ref, ratio = compare(ours, ref, x, args.pairs)
        print(f"{name:<66} {t_ours * 1e3:9.2f} {t_ref * 1e3:9.2f} {ratio:6.2f}x")


if __name__ == "__main__":
    main()
