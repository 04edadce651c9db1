"""Forward+backward time of DomainBatchNorm2d against nn.BatchNorm2d on the same batch.

Run: ``python bench/bench_domain.py [--threads 1] [--rounds 7]``. Training mode, a
64x64x32x32 CPU batch; cases: per-sample ids with 2 and 4 domains (interleaved, as a mixed
batch), an ``int`` domain, and per-sample ids in eval. Ours and the reference are timed
alternately in the same run with ``torch.utils.benchmark`` (warm-up, then
``blocked_autorange``); the figure is the median over rounds of each side's median, and the
ratio ``ours / reference`` is printed. Other processes sharing the cores make the figures noisy:
compare ratios, not absolute times.

Targets (issue 3): per-sample ids <= 1.3x ``nn.BatchNorm2d``; an ``int`` domain <= 1.05x.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils import benchmark

from lightning_norms import DomainBatchNorm2d


def _step_fn(module: nn.Module, x: Tensor, domain: int | Tensor | None) -> Callable[[], None]:
    x = x.detach().requires_grad_(True)
    kwargs = {} if domain is None else {"domain": domain}
    with torch.no_grad():
        grad = torch.randn_like(module(x, **kwargs))

    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x, **kwargs).backward(grad)

    return step


def _median_time(step: Callable[[], None], min_run_time: float) -> float:
    timer = benchmark.Timer(stmt="step()", globals={"step": step})
    return timer.blocked_autorange(min_run_time=min_run_time).median


def compare(
    ours: Callable[[], None], ref: Callable[[], None], rounds: int, min_run_time: float
) -> tuple[float, float]:
    steps = {"ours": ours, "ref": ref}
    for step in steps.values():
        for _ in range(3):
            step()
    times: dict[str, list[float]] = {"ours": [], "ref": []}
    for _ in range(rounds):
        for key, step in steps.items():
            times[key].append(_median_time(step, min_run_time))
    return statistics.median(times["ours"]), statistics.median(times["ref"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds per case")
    parser.add_argument("--min-run-time", type=float, default=0.3, help="seconds per measurement")
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
    ]
    print(
        f"DomainBatchNorm2d vs nn.BatchNorm2d, x={tuple(x.shape)}, forward+backward, "
        f"threads={args.threads}, median of {args.rounds} alternating rounds"
    )
    print(f"{'case':<36} {'ours ms':>9} {'BN ms':>9} {'ratio':>7}")
    for name, num_domains, domain, training in cases:
        ours = DomainBatchNorm2d(c, num_domains).train(training)
        ref = nn.BatchNorm2d(c).train(training)
        t_ours, t_ref = compare(
            _step_fn(ours, x, domain), _step_fn(ref, x, None), args.rounds, args.min_run_time
        )
        print(f"{name:<36} {t_ours * 1e3:9.2f} {t_ref * 1e3:9.2f} {t_ours / t_ref:7.2f}")


if __name__ == "__main__":
    main()
