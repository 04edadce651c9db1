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

Accuracy: the same model and batches, the running variances left by ``recompute_bn_stats`` and
by ``update_bn`` against a float64 reference (each BN layer's inputs in the same pass,
accumulated as float64 sums of ``x - shift`` and ``(x - shift)**2`` with ``shift`` the first
batch's channel means: an independent, cancellation-free formula), per channel
``|var - var_ref| / var_ref``: mean and max over all channels of all 20 layers (and the same
for the means). ``--no-timing`` prints only this.
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


class _Float64Reference:
    """Exact float64 mean and unbiased variance of every BN layer's inputs over a pass."""

    def __init__(self, model: nn.Module) -> None:
        self.sums: dict[str, list[Tensor]] = {}
        self.handles = [
            m.register_forward_pre_hook(self._hook(name))
            for name, m in model.named_modules()
            if isinstance(m, nn.BatchNorm2d)
        ]

    def _hook(self, name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().double().transpose(0, 1).reshape(args[0].shape[1], -1)
            if name not in self.sums:
                shift = x.mean(1)
                self.sums[name] = [torch.zeros(()), shift, torch.zeros_like(shift), 0 * shift]
            count, shift, total, squares = self.sums[name]
            d = x - shift[:, None]
            self.sums[name] = [
                count + x.shape[1],
                shift,
                total + d.sum(1),
                squares + d.square().sum(1),
            ]

        return hook

    def stats(self) -> dict[str, tuple[Tensor, Tensor]]:
        for handle in self.handles:
            handle.remove()
        out = {}
        for name, (n, shift, total, squares) in self.sums.items():
            mean_d = total / n
            out[name] = (shift + mean_d, (squares - n * mean_d.square()) / (n - 1))
        return out


def _errors(model: nn.Module, ref: dict[str, tuple[Tensor, Tensor]]) -> tuple[float, ...]:
    """(mean, max) relative variance error and (mean, max) mean error in units of std."""
    var_err, mean_err = [], []
    for name, m in model.named_modules():
        if name in ref:
            mean, var = ref[name]
            var_err.append((m.running_var.double() - var).abs() / var)
            mean_err.append((m.running_mean.double() - mean).abs() / var.sqrt())
    v, u = torch.cat(var_err), torch.cat(mean_err)
    return float(v.mean()), float(v.max()), float(u.mean()), float(u.max())


def _accuracy(batches: list[Tensor]) -> dict[str, tuple[float, ...]]:
    """Errors of recompute_bn_stats and update_bn against the float64 reference."""
    reference_model = _model()
    reference_model.eval()
    for m in reference_model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
            m.momentum = 0.0
    reference = _Float64Reference(reference_model)
    with torch.no_grad():
        for x in batches:
            reference_model(x)
    ref = reference.stats()
    ours, swa = _model(), _model()
    recompute_bn_stats(ours, batches, num_batches=len(batches))
    update_bn(batches, swa)
    return {"recompute_bn_stats": _errors(ours, ref), "update_bn": _errors(swa, ref)}


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
    parser.add_argument("--no-timing", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = _batches(args.batches)
    print(f"accuracy vs float64 reference, resnet18, {args.batches} batches of 16x3x64x64")
    print(f"{'':>20}  {'var err mean':>12}  {'var err max':>11}  {'mean err':>9}  {'max':>9}")
    for name, (v_mean, v_max, u_mean, u_max) in _accuracy(batches).items():
        print(f"{name:>20}  {v_mean:12.3e}  {v_max:11.3e}  {u_mean:9.2e}  {u_max:9.2e}")
    if args.no_timing:
        return
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
