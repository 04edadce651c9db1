"""Forward+backward time of DomainBatchNorm2d against nn.BatchNorm2d on the same batch.

Run: ``python bench/bench_domain.py [--threads 1] [--rounds 7]``. Training mode, a
64x64x32x32 CPU batch; cases: per-sample ids with 2 and 4 domains (interleaved, as a mixed
batch), an ``int`` domain, and per-sample ids in eval. Ours and the reference are timed
alternately in the same run with ``torch.utils.benchmark`` (warm-up, then
``blocked_autorange``); times are the medians over rounds, the ratio ``ours / reference`` is
the median of the per-round ratios (each round times both sides back to back, which cancels
slow drifts of the load). With one thread the clock is the thread's CPU time, so time spent
preempted by other jobs is not counted; cache and memory contention still is: the last row,
``nn.BatchNorm2d`` against a copy of itself, shows the noise floor of the run.

Targets (issue 3): per-sample ids <= 1.3x ``nn.BatchNorm2d``; an ``int`` domain <= 1.05x.

``--penalty`` times a gradient-penalty step instead (WGAN-GP / R1: the input gradient with
``create_graph=True``, then the backward of its squared norm), where the layer's backward
runs through differentiable ops; the reference is torch's own BatchNorm double backward.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils import benchmark

from lightning_norms import DomainBatchNorm2d


def _step_fn(
    module: nn.Module, x: Tensor, domain: int | Tensor | None, penalty: bool = False
) -> Callable[[], None]:
    x = x.detach().requires_grad_(True)
    kwargs = {} if domain is None else {"domain": domain}
    with torch.no_grad():
        grad = torch.randn_like(module(x, **kwargs))

    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        y = module(x, **kwargs)
        if not penalty:
            y.backward(grad)
            return
        (dx,) = torch.autograd.grad(y, x, grad, create_graph=True)
        dx.square().sum().backward()

    return step


def _median_time(step: Callable[[], None], min_run_time: float) -> float:
    # one thread: CPU time of this thread, so time spent preempted by other jobs is not counted
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    timer = benchmark.Timer(stmt="step()", globals={"step": step}, timer=clock)
    return timer.blocked_autorange(min_run_time=min_run_time).median


def compare(
    ours: Callable[[], None], ref: Callable[[], None], rounds: int, min_run_time: float
) -> tuple[float, float, float]:
    """Median times of both sides and the median of the per-round ratios (paired rounds)."""
    for step in (ours, ref):
        for _ in range(3):
            step()
    times: dict[str, list[float]] = {"ours": [], "ref": []}
    for _ in range(rounds):
        times["ours"].append(_median_time(ours, min_run_time))
        times["ref"].append(_median_time(ref, min_run_time))
    ratios = [a / b for a, b in zip(times["ours"], times["ref"], strict=True)]
    return (
        statistics.median(times["ours"]),
        statistics.median(times["ref"]),
        statistics.median(ratios),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--rounds", type=int, default=15, help="alternating rounds per case")
    parser.add_argument("--min-run-time", type=float, default=0.2, help="seconds per measurement")
    parser.add_argument("--penalty", action="store_true", help="time a gradient-penalty step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    n, c = 64, 64
    x = torch.randn(n, c, 32, 32) * 2 + 0.5
    cases: list[tuple[str, int, int | Tensor, bool]] = [
        ("2 domains, per-sample ids", 2, torch.arange(n) % 2, True),
        ("4 domains, per-sample ids", 4, torch.arange(n) % 4, True),
        ("int domain", 2, 1, True),
        ("2 domains, per-sample ids, eval", 2, torch.arange(n) % 2, False),
        ("control: nn.BatchNorm2d vs itself", 0, 0, True),
    ]
    what = "gradient penalty (double backward)" if args.penalty else "forward+backward"
    print(
        f"DomainBatchNorm2d vs nn.BatchNorm2d, x={tuple(x.shape)}, {what}, "
        f"threads={args.threads}, median of {args.rounds} alternating rounds"
    )
    print(f"{'case':<36} {'ours ms':>9} {'BN ms':>9} {'ratio':>7}")
    for name, num_domains, domain, training in cases:
        ref = _step_fn(nn.BatchNorm2d(c).train(training), x, None, args.penalty)
        if num_domains:
            layer = DomainBatchNorm2d(c, num_domains).train(training)
            ours = _step_fn(layer, x, domain, args.penalty)
        else:  # the noise floor: the reference against a second copy of itself
            ours = _step_fn(nn.BatchNorm2d(c).train(training), x, None, args.penalty)
        t_ours, t_ref, ratio = compare(ours, ref, args.rounds, args.min_run_time)
        print(f"{name:<36} {t_ours * 1e3:9.2f} {t_ref * 1e3:9.2f} {ratio:7.2f}")


if __name__ == "__main__":
    main()
