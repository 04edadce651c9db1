"""Cost of one epoch of ``MixingBatchSampler`` against torch's random batch sampler.

Run: ``python bench/bench_sampler.py [--rounds 5] [--batch-size 128]``.
Sources the size of MNIST + SVHN train (60000 + 73257 indices), CPU, one thread. Timed
alternately in each round (so background load hits all alike), median over rounds:

- ``torch``: ``BatchSampler(RandomSampler(range(N)), batch_size, drop_last=True)``, one epoch
  (random batches, no quota: the baseline a user would otherwise write);
- ``mixing``: ``MixingBatchSampler([60000, 73257], batch_size)``, one epoch (exact 50/50);
- ``mixing ddp x2``: the same as rank 0 of 2 (half the batches);
- ``mixing weighted 3``: three sources with ratios 1:2:1.

Prints each time and the ratio to ``torch``. Indices per epoch differ (the mixing epoch ends
when the smaller source runs out), so the table also gives the time per batch. Other processes
sharing the cores make the figures noisy: compare ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterable

import torch
from torch.utils.data import BatchSampler, RandomSampler

from lightning_norms.data import MixingBatchSampler


def _epoch(sampler: Iterable[list[int]]) -> int:
    return sum(1 for _ in sampler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes, bs = [60000, 73257], args.batch_size
    cases: dict[str, Callable[[], Iterable[list[int]]]] = {
        "torch": lambda: BatchSampler(RandomSampler(range(sum(sizes))), bs, drop_last=True),
        "mixing": lambda: MixingBatchSampler(sizes, bs),
        "mixing ddp x2": lambda: MixingBatchSampler(sizes, bs, num_replicas=2, rank=0),
        "mixing weighted 3": lambda: MixingBatchSampler([30000, 60000, 43257], bs, [1, 2, 1]),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    batches: dict[str, int] = {}
    for _ in range(args.rounds):
        for name, make in cases.items():
            sampler = make()
            start = time.perf_counter()
            batches[name] = _epoch(sampler)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["torch"])
    print(f"{'case':<20}{'epoch ms':>10}{'batches':>9}{'us/batch':>10}{'x torch':>9}")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(
            f"{name:<20}{t * 1e3:>10.1f}{batches[name]:>9}{t / batches[name] * 1e6:>10.1f}"
            f"{t / base:>9.2f}"
        )


if __name__ == "__main__":
    main()
