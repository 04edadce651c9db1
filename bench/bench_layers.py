"""Forward+backward time of each lightning-norms layer against its torch reference.

Run: ``python bench/bench_layers.py [--threads 1] [--rounds 5]``. Every layer and its reference
are timed in the same run, alternately, with ``torch.utils.benchmark`` (warm-up, then
``blocked_autorange``); the figure is the median over rounds of each side's median, and the
ratio ``ours / reference`` is printed. CPU only; threads are set explicitly.

Targets (issue 2): BatchRenorm2d <= 1.3x nn.BatchNorm2d on a 64x64x32x32 batch,
LayerNorm2d <= 1.2x permute + F.layer_norm, CosineConv2d <= 2x nn.Conv2d.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils import benchmark

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


def _median_time(step: Callable[[], None], min_run_time: float) -> float:
    timer = benchmark.Timer(stmt="step()", globals={"step": step})
    return timer.blocked_autorange(min_run_time=min_run_time).median


def compare(
    name: str, ours: nn.Module, ref: nn.Module, x: Tensor, rounds: int, min_run_time: float
) -> tuple[str, float, float]:
    steps = {"ours": _step_fn(ours, x), "ref": _step_fn(ref, x)}
    for step in steps.values():
        for _ in range(3):
            step()
    times: dict[str, list[float]] = {"ours": [], "ref": []}
    for _ in range(rounds):
        for key, step in steps.items():
            times[key].append(_median_time(step, min_run_time))
    return name, statistics.median(times["ours"]), statistics.median(times["ref"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per layer")
    parser.add_argument("--min-run-time", type=float, default=0.3, help="seconds per measurement")
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
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, rounds={args.rounds}")
    print(f"{'forward+backward':<66} {'ours ms':>9} {'ref ms':>9} {'ratio':>7}")
    for name, ours, ref, x in cases:
        _, t_ours, t_ref = compare(name, ours, ref, x, args.rounds, args.min_run_time)
        print(f"{name:<66} {t_ours * 1e3:9.2f} {t_ref * 1e3:9.2f} {t_ours / t_ref:6.2f}x")


if __name__ == "__main__":
    main()
