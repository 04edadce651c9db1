"""Cost of one epoch of ``MixingBatchSampler`` against torch's random batch sampler.

Run: ``python bench/bench_sampler.py [--threads 1|2] [--rounds 9] [--batch-size 128] [--quick]``.
Sources the size of MNIST + SVHN train (60000 + 73257 indices), CPU. Cases, each one epoch:

- ``torch``: ``BatchSampler(RandomSampler(range(N)), batch_size, drop_last=True)`` (random
  batches, no quota: the baseline a user would otherwise write);
- ``noise control``: the same torch sampler again: its ratio to ``torch`` is the noise floor of
  the run;
- ``mixing``: ``MixingBatchSampler([60000, 73257], batch_size)`` (exact 50/50);
- ``mixing ddp x2``: the same as rank 0 of 2 (half the batches, all ranks' permutations drawn);
- ``mixing weighted 3``: three sources with ratios 1:2:1;
- ``mixing drop_last=False``: the two sources plus the last, smaller batch.

Every case runs once per round, in an order rotated each round (background load hits all
alike). Printed per case: the median epoch time, the batches per epoch, and the medians of the
per-round ratios to ``torch`` per epoch and per batch (epochs differ in length: a mixing epoch
ends when a source can no longer fill its quota). Clock: this thread's CPU time
(``time.thread_time``) with one thread, the process's CPU time with more, so time spent
preempted by other jobs does not count. Before timing, every mixing case's epoch is checked
(exact quotas in every batch, no index twice) so the figures are for correct output.
``--quick``: 3 rounds on sources a tenth the size.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterable
from itertools import pairwise

import torch
from torch.utils.data import BatchSampler, RandomSampler

from lightning_norms.data import MixingBatchSampler

Case = Callable[[], Iterable[list[int]]]


def _cases(sizes: list[int], batch_size: int) -> dict[str, Case]:
    """The samplers to time, each built fresh per epoch (as a DataLoader would iterate it)."""
    total = sum(sizes)
    third = [sizes[0] // 2, sizes[0], sizes[1] - sizes[0] // 2]  # 1:2:1, the same total

    def torch_sampler() -> BatchSampler:
        return BatchSampler(RandomSampler(range(total)), batch_size, drop_last=True)

    return {
        "torch": torch_sampler,
        "noise control": torch_sampler,
        "mixing": lambda: MixingBatchSampler(sizes, batch_size),
        "mixing ddp x2": lambda: MixingBatchSampler(sizes, batch_size, num_replicas=2, rank=0),
        "mixing weighted 3": lambda: MixingBatchSampler(third, batch_size, ratios=[1, 2, 1]),
        "mixing drop_last=False": lambda: MixingBatchSampler(sizes, batch_size, drop_last=False),
    }


def _check(sampler: MixingBatchSampler) -> None:
    """Raise if an epoch breaks the quotas or repeats an index."""
    bounds = [*sampler.offsets, sum(sampler.source_sizes)]
    seen: set[int] = set()
    batches = list(sampler)
    for b, batch in enumerate(batches):
        quotas = sampler.last_quotas if b == sampler.num_full_batches else sampler.quotas
        counts = [sum(lo <= i < hi for i in batch) for lo, hi in pairwise(bounds)]
        if counts != quotas:
            raise AssertionError(f"batch {b}: composition {counts}, expected {quotas}")
        seen.update(batch)
    if len(seen) != sum(map(len, batches)) or len(batches) != len(sampler):
        raise AssertionError(f"{sampler!r}: an index repeats or len() is wrong")


def _time(cases: dict[str, Case], rounds: int, clock: Callable[[], float]) -> dict[str, list]:
    """Per case and round: (seconds, batches) of one epoch, the order rotated every round."""
    names = list(cases)
    runs: dict[str, list] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sampler = cases[name]()
            start = clock()
            count = sum(1 for _ in sampler)
            runs[name].append((clock() - start, count))
    return runs


def _report(runs: dict[str, list], header: str) -> None:
    base = runs["torch"]
    print(header)
    print(f"{'case':<24}{'epoch ms':>10}{'batches':>9}{'x torch/epoch':>15}{'x torch/batch':>15}")
    for name, values in runs.items():
        epoch = [t / t0 for (t, _), (t0, _) in zip(values, base, strict=True)]
        batch = [(t / n) / (t0 / n0) for (t, n), (t0, n0) in zip(values, base, strict=True)]
        print(
            f"{name:<24}{statistics.median(t for t, _ in values) * 1e3:>10.1f}"
            f"{values[0][1]:>9}{statistics.median(epoch):>14.2f}x{statistics.median(batch):>14.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, choices=(1, 2))
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="3 rounds, sources / 10")
    args = parser.parse_args()
    sizes = [60000, 73257]
    if args.quick:
        args.rounds, sizes = 3, [n // 10 for n in sizes]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = _cases(sizes, args.batch_size)
    for make in cases.values():
        sampler = make()
        if isinstance(sampler, MixingBatchSampler):
            _check(sampler)
    clock = time.thread_time if args.threads == 1 else time.process_time
    runs = _time(cases, args.rounds, clock)
    _report(
        runs,
        f"sources {sizes}, batch {args.batch_size}, {args.threads} thread(s), "
        f"median of {args.rounds} rounds, clock {clock.__name__}",
    )


if __name__ == "__main__":
    main()
