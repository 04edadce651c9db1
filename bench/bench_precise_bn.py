"""Cost of ``recompute_bn_stats`` against the bare forwards it needs, and its peers.

Run: ``python bench/bench_precise_bn.py [--threads 1|2] [--rounds 5] [--batches 20] [--quick]
[--ddp] [--no-timing]``. A torchvision ``resnet18(weights=None, num_classes=10)`` on CPU,
``--batches`` batches of 32x3x32x32. Models:

- ``BN``: torch's ``nn.BatchNorm2d`` (exact: the free path, momentum-1 update read back);
- ``generic``: every BN swapped for a user subclass with its own ``forward`` (what timm's
  ``BatchNormAct2d`` gets: the forward pre-hook computes the moments from the input with the
  moment engine's ``batch_moments``);
- ``domain D`` (``D`` = 2, 64): every BN converted to ``DomainBatchNorm2d(num_domains=D)``,
  per-sample domain ids (uniform over ``D``, drawn per pair of samples) set with
  ``lightning_norms.domain`` (read back after a momentum-1 forward, like ``BN``).

Cases, each against the bare forwards of the same model: ``forwards`` (the same batches under
``torch.no_grad()``, BN layers in train mode: what any recompute has to run),
``recompute_bn_stats``, and on the ``BN`` model the peers a user would pick instead: fvcore's
``update_bn_stats`` (``pip install fvcore``; the row says so when it does not import) and
``torch.optim.swa_utils.update_bn``. ``noise control`` times the bare forwards of ``BN`` twice
in every round: its ratio is the noise floor of the run. Every case of every model runs once
per round, in an order rotated each round (background load hits all alike); the median of the
per-round ratios is printed. Clock: this thread's CPU time (``time.thread_time``) with one
thread, the process's CPU time with more, so time spent preempted by other jobs does not count.

Target (issue 13): recompute <= 1.05x the bare forwards for the generic path and for
``DomainBatchNorm`` at 2 and 64 domains.

Accuracy (printed first; ``--no-timing``: only this): the same model and batches, the running
statistics left by ``recompute_bn_stats``, ``update_bn`` and fvcore against a float64
reference (each BN layer's inputs in the same pass, accumulated as float64 sums of
``x - shift`` and ``(x - shift)**2`` with ``shift`` the first batch's channel means: an
independent, cancellation-free formula), per channel ``|var - var_ref| / var_ref`` and
``|mean - mean_ref| / std_ref``: mean and max over all channels of all 20 layers.
With ``--ddp`` it also spawns 2 gloo ranks that each recompute over half the batches and prints
the slowest rank's time against the single-process recompute.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn

from lightning_norms import convert_norms, domain
from lightning_norms.stats import recompute_bn_stats

Batch = tuple[Tensor, Tensor]
_FVCORE = importlib.util.find_spec("fvcore") is not None


class _SubclassBN(nn.BatchNorm2d):
    """A subclass with its own forward (as timm's ``BatchNormAct2d``): the generic pre-hook path
    (a subclass that keeps torch's forward is read back like ``nn.BatchNorm2d``)."""

    def forward(self, input: Tensor) -> Tensor:
        return super().forward(input)


def _model(kind: str = "BN") -> nn.Module:
    """``BN``, ``generic`` or ``domain D``: resnet18 with that kind of BN layer."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    if kind == "generic":
        for module in list(model.modules()):
            for name, child in module.named_children():
                if type(child) is nn.BatchNorm2d:
                    setattr(module, name, _SubclassBN(child.num_features))
    elif kind.startswith("domain"):
        convert_norms(model, "domain", num_domains=int(kind.split()[1]))
    return model


def _batches(n: int, num_domains: int, batch_size: int = 32, size: int = 32) -> list[Batch]:
    """Random images; domain ids drawn per pair of samples (layer4's 1x1 maps need two)."""
    g = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(batch_size, 3, size, size, generator=g),
            torch.randint(0, num_domains, (batch_size // 2,), generator=g).repeat_interleave(2),
        )
        for _ in range(n)
    ]


def _run(model: nn.Module, batch: Batch) -> Any:
    """One batch through ``model``, with its per-sample domain ids set (ignored by plain BN)."""
    with domain(model, batch[1]):
        return model(batch[0])


def _forwards(model: nn.Module, batches: list[Batch]) -> None:
    model.train()
    with torch.no_grad():
        for batch in batches:
            _run(model, batch)


def _recompute(model: nn.Module, batches: list[Batch]) -> None:
    recompute_bn_stats(model, batches, num_batches=len(batches), forward_fn=_run)


def _fvcore(model: nn.Module, batches: list[Batch]) -> None:
    from fvcore.nn.precise_bn import update_bn_stats

    update_bn_stats(model, [x for x, _ in batches], num_iters=len(batches))


def _update_bn(model: nn.Module, batches: list[Batch]) -> None:
    update_bn([x for x, _ in batches], model)


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


def _accuracy(batches: list[Batch]) -> dict[str, tuple[float, ...]]:
    """Errors of recompute_bn_stats and its peers against the float64 reference."""
    reference_model = _model()
    reference_model.eval()
    for m in reference_model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
            m.momentum = 0.0
    reference = _Float64Reference(reference_model)
    with torch.no_grad():
        for x, _ in batches:
            reference_model(x)
    ref = reference.stats()
    runs: dict[str, Callable[[nn.Module, list[Batch]], None]] = {
        "recompute_bn_stats": _recompute,
        "torch update_bn": _update_bn,
    }
    if _FVCORE:
        runs["fvcore update_bn_stats"] = _fvcore
    errors = {}
    for name, run in runs.items():
        model = _model()
        run(model, batches)
        errors[name] = _errors(model, ref)
    return errors


def _print_accuracy(batches: list[Batch]) -> None:
    print(f"accuracy vs float64 reference, resnet18, {len(batches)} batches of 32x3x32x32")
    print(f"{'':>24}  {'var err mean':>12}  {'var err max':>11}  {'mean err':>9}  {'max':>9}")
    for name, (v_mean, v_max, u_mean, u_max) in _accuracy(batches).items():
        print(f"{name:>24}  {v_mean:12.3e}  {v_max:11.3e}  {u_mean:9.2e}  {u_max:9.2e}")
    if not _FVCORE:
        print(f"{'fvcore update_bn_stats':>24}  skipped: fvcore not installed")


def _ddp_worker(
    rank: int, world_size: int, batches: list[Batch], threads: int, tmpdir: str
) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmpdir}/rendezvous", rank=rank, world_size=world_size
    )
    try:
        model = _model()
        mine = batches[rank::world_size]
        _recompute(model, mine[:1])  # warm-up, joins the collectives
        dist.barrier()
        clock = _clock(threads)
        start = clock()
        _recompute(model, mine)
        torch.save(clock() - start, os.path.join(tmpdir, f"time_{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _print_ddp(batches: list[Batch], threads: int) -> None:
    """The slowest of 2 ranks (half the batches each) against the 1-process recompute."""
    model = _model()
    clock = _clock(threads)
    start = clock()
    _recompute(model, batches)
    single = clock() - start
    with tempfile.TemporaryDirectory() as tmpdir:
        mp.spawn(_ddp_worker, args=(2, batches, threads, tmpdir), nprocs=2, join=True)
        slowest = max(torch.load(os.path.join(tmpdir, f"time_{r}.pt")) for r in range(2))
    print(f"{'2-rank DDP recompute, slowest rank':<36}{slowest / single:>27.3f}x of 1 process")


def _cases(batches: dict[str, list[Batch]]) -> dict[str, tuple[str, Callable[[], object]]]:
    """Case name -> (the model whose bare forwards it is compared with, the timed call)."""
    cases: dict[str, tuple[str, Callable[[], object]]] = {}
    for kind, data in batches.items():
        model = _model(kind)
        _forwards(model, data[:2])  # warm-up
        cases[f"{kind}: forwards"] = (kind, lambda m=model, d=data: _forwards(m, d))
        cases[f"{kind}: recompute_bn_stats"] = (kind, lambda m=model, d=data: _recompute(m, d))
        if kind == "BN":
            cases["BN: noise control (forwards)"] = (kind, lambda m=model, d=data: _forwards(m, d))
            cases["BN: torch update_bn"] = (kind, lambda m=model, d=data: _update_bn(m, d))
            if _FVCORE:
                cases["BN: fvcore update_bn_stats"] = (kind, lambda m=model, d=data: _fvcore(m, d))
    return cases


def _clock(threads: int) -> Callable[[], float]:
    return time.thread_time if threads == 1 else time.process_time


def _time_cases(
    cases: dict[str, tuple[str, Callable[[], object]]], rounds: int, clock: Callable[[], float]
) -> dict[str, list[float]]:
    """Per case, one ratio to its model's bare forwards per round (order rotated each round)."""
    names = list(cases)
    ratios: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        seconds = {}
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = clock()
            cases[name][1]()
            seconds[name] = clock() - start
        for name, (kind, _) in cases.items():
            ratios[name].append(seconds[name] / seconds[f"{kind}: forwards"])
        ratios.setdefault("_seconds", []).append(seconds["BN: forwards"])
    return ratios


def _print_timing(args: argparse.Namespace, ratios: dict[str, list[float]]) -> None:
    print(
        f"\nresnet18, {args.batches} batches of 32x3x32x32, {args.threads} thread(s), "
        f"median of {args.rounds} rounds; BN bare forwards "
        f"{statistics.median(ratios.pop('_seconds')):.3f} s CPU"
    )
    print(f"{'case':<36}{'ratio to its bare forwards':>28}")
    for name, values in ratios.items():
        print(f"{name:<36}{statistics.median(values):>27.3f}x")
    if not _FVCORE:
        print(f"{'BN: fvcore update_bn_stats':<36}{'skipped: fvcore not installed':>28}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, choices=(1, 2))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="3 rounds of 6 batches")
    parser.add_argument("--ddp", action="store_true")
    parser.add_argument("--no-timing", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.batches = 3, 6
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # torchvision / fvcore deprecation notes
    kinds = {"BN": 1, "generic": 1, "domain 2": 2, "domain 64": 64}
    batches = {kind: _batches(args.batches, d) for kind, d in kinds.items()}
    _print_accuracy(batches["BN"])
    if args.no_timing:
        return
    _print_timing(args, _time_cases(_cases(batches), args.rounds, _clock(args.threads)))
    if args.ddp:
        _print_ddp(batches["BN"], args.threads)


if __name__ == "__main__":
    main()
