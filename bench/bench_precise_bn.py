"""Cost of ``recompute_bn_stats`` against the no-grad forwards it needs and SWA's ``update_bn``.

Run: ``python bench/bench_precise_bn.py [--threads 1] [--rounds 5] [--batches 50] [--ddp]``.
A torchvision ``resnet18(weights=None, num_classes=10)`` on CPU, ``--batches`` batches of
16x3x64x64. Timed alternately in each round (so background load hits all alike), median over
rounds, both in wall-clock seconds and in this process's CPU seconds (``time.process_time``;
with one thread it is barely affected by other processes competing for the cores, so its
ratios are the ones to read on a shared machine):

- ``forwards``: the same batches through the model under ``torch.no_grad()``, BN layers in
  train mode (what the recompute has to run anyway);
- ``recompute``: ``recompute_bn_stats(model, batches, num_batches)``; exact ``nn.BatchNorm2d``
  layers take the free path (momentum-1 update read back after the fused kernel);
- ``recompute (generic)``: the same model with every BN swapped for a trivial subclass, so the
  input pre-hook path (per-batch two-pass moments, as for BatchRenorm / DomainBatchNorm) runs;
- ``update_bn``: ``torch.optim.swa_utils.update_bn`` over the same batches (cumulative average of
  per-batch variances; for reference).

Prints each time and the ratio to ``forwards``. Target (issue 4): recompute <= 1.1x forwards.
With ``--ddp`` it also spawns 2 gloo ranks that each recompute over half the batches and prints
the slowest rank's time against the single-process recompute (each rank does half the forwards).
Other processes sharing the cores make the figures noisy: compare ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn

from lightning_norms.stats import recompute_bn_stats


class _SubclassBN(nn.BatchNorm2d):
    """Not an exact ``nn.BatchNorm2d``: recompute_bn_stats takes its generic pre-hook path."""


def _model(generic: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    if generic:
        for module in list(model.modules()):
            for name, child in module.named_children():
                if type(child) is nn.BatchNorm2d:
                    setattr(module, name, _SubclassBN(child.num_features))
    return model


def _batches(n: int, batch_size: int = 16, size: int = 64) -> list[Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch_size, 3, size, size, generator=g) for _ in range(n)]


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _forwards(model: nn.Module, batches: list[Tensor]) -> None:
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)


def _ddp_worker(rank: int, world_size: int, batches: list[Tensor], tmpdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmpdir}/rendezvous", rank=rank, world_size=world_size
    )
    try:
        model = _model()
        mine = batches[rank::world_size]
        recompute_bn_stats(model, mine[:1], num_batches=1)  # warm-up, joins the collectives
        dist.barrier()
        seconds = _timed(lambda: recompute_bn_stats(model, mine, num_batches=len(mine)))
        torch.save(seconds, os.path.join(tmpdir, f"time_{rank}.pt"))  # (wall, cpu)
    finally:
        dist.destroy_process_group()


def _ddp_seconds(batches: list[Tensor]) -> tuple[float, float]:
    """Slowest rank's (wall, cpu) seconds."""
    with tempfile.TemporaryDirectory() as tmpdir:
        mp.spawn(_ddp_worker, args=(2, batches, tmpdir), nprocs=2, join=True)
        times = [torch.load(os.path.join(tmpdir, f"time_{r}.pt")) for r in range(2)]
    return max(t[0] for t in times), max(t[1] for t in times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--ddp", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = _batches(args.batches)
    model, generic = _model(), _model(generic=True)
    cases: dict[str, Callable[[], object]] = {
        "forwards": lambda: _forwards(model, batches),
        "recompute": lambda: recompute_bn_stats(model, batches, num_batches=args.batches),
        "recompute (generic)": lambda: recompute_bn_stats(
            generic, batches, num_batches=args.batches
        ),
        "update_bn": lambda: update_bn(batches, model),
    }
    _forwards(model, batches[:2])  # warm-up
    _forwards(generic, batches[:2])
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, fn in cases.items():
            times[name].append(_timed(fn))
    wall = {name: statistics.median(t[0] for t in ts) for name, ts in times.items()}
    cpu = {name: statistics.median(t[1] for t in ts) for name, ts in times.items()}
    print(
        f"resnet18, {args.batches} batches of 16x3x64x64, {args.threads} thread(s), "
        f"median of {args.rounds} rounds"
    )
    print(f"{'':>20}  {'wall s':>7}  {'ratio':>6}  {'cpu s':>7}  {'ratio':>6}")
    for name in cases:
        print(
            f"{name:>20}  {wall[name]:7.3f}  {wall[name] / wall['forwards']:5.3f}x  "
            f"{cpu[name]:7.3f}  {cpu[name] / cpu['forwards']:5.3f}x"
        )
    if args.ddp:
        ddp_wall, ddp_cpu = _ddp_seconds(batches)
        print(
            f"{'2-rank DDP, slowest':>20}  {ddp_wall:7.3f}  "
            f"{ddp_wall / wall['recompute']:5.3f}x  {ddp_cpu:7.3f}  "
            f"{ddp_cpu / cpu['recompute']:5.3f}x  (ratios to the 1-process recompute)"
        )


if __name__ == "__main__":
    main()
