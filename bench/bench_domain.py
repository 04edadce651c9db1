"""Forward+backward time of DomainBatchNorm2d against the peers a user would pick, one run.

Run: ``python bench/bench_domain.py [--threads 1|2] [--quick] [--rounds 9]``. Training mode,
CPU, over the grid ``N x C x H x W`` = 8x16x4x4, 8x16x16x16, 32x32x8x8, 64x64x16x16,
64x64x32x32, 64x64x56x56. Per size, in the same alternating rounds:

- ``ids``: ours with per-sample ids (2 domains, a shuffled balanced mix, as
  ``MixingBatchSampler`` gives) against ``nn.BatchNorm2d`` on the whole batch (``/BN``) and
  against a masked ModuleList (``/mask``: one ``nn.BatchNorm2d`` per domain on ``x[ids == d]``,
  scattered back, ``bench/_peers.py``);
- ``split``: ours with ids = the two contiguous halves against timm's ``SplitBatchNorm2d``
  (``timm.layers.split_batchnorm``, its own setting: equal contiguous splits; ``-`` without
  timm);
- ``int``: ours with an ``int`` domain against ``nn.BatchNorm2d``;
- ``ctl``: ``nn.BatchNorm2d`` against a copy of itself: the noise floor of the run.

Every round times each side back to back (``torch.utils.benchmark``, ``blocked_autorange``);
the figures are the medians over rounds of the per-round ratios, which cancels slow drifts of
the load. With one thread the clock is the thread's CPU time (time spent preempted by other
jobs is not counted; cache and memory contention still is, hence ``ctl``).

Targets (issue 13): ``ids/BN`` <= 1.3x at every size and <= 1.1x at 64x64x56x56;
``ids/mask`` <= 0.5x on mid and large maps and <= 1.0x on small ones (8x16x16x16).

``--penalty`` times a gradient-penalty step instead (WGAN-GP / R1: the input gradient with
``create_graph=True``, then the backward of its squared norm); ``--profile`` prints the number
of aten ops of one forward+backward (ours, per-sample ids, and ``nn.BatchNorm2d``).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils import benchmark

from lightning_norms import DomainBatchNorm2d

try:
    from bench._peers import MaskedBatchNorms
except ImportError:  # run as a script: bench/ is on sys.path
    from _peers import MaskedBatchNorms  # type: ignore[no-redef]

GRID = [(8, 16, 4, 4), (8, 16, 16, 16), (32, 32, 8, 8), (64, 64, 16, 16), (64, 64, 32, 32)]
GRID.append((64, 64, 56, 56))
Step = Callable[[], None]


def _step_fn(module: nn.Module, x: Tensor, kwargs: dict, penalty: bool = False) -> Step:
    x = x.detach().requires_grad_(True)
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


def _time(step: Step, min_run_time: float) -> float:
    # one thread: CPU time of this thread, so time spent preempted by other jobs is not counted
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    timer = benchmark.Timer(stmt="step()", globals={"step": step}, timer=clock)
    return timer.blocked_autorange(min_run_time=min_run_time).median


def _split_bn(c: int) -> nn.Module | None:
    """timm's SplitBatchNorm2d with two splits, called with the ``domain`` keyword ignored."""
    if importlib.util.find_spec("timm") is None:
        return None
    from timm.layers.split_batchnorm import SplitBatchNorm2d

    class _Split(SplitBatchNorm2d):
        def forward(self, x: Tensor, domain: object = None) -> Tensor:
            return super().forward(x)

    return _Split(c, num_splits=2)


def _sides(shape: tuple[int, ...], penalty: bool) -> dict[str, Step]:
    """Every timed side of one size (the same input for all)."""
    n, c = shape[:2]
    torch.manual_seed(0)
    x = torch.randn(shape) * 2 + 0.5
    mixed = torch.randperm(n) % 2
    halves = torch.arange(n) // (n // 2)
    sides = {
        "ours": _step_fn(DomainBatchNorm2d(c, 2), x, {"domain": mixed}, penalty),
        "bn": _step_fn(nn.BatchNorm2d(c), x, {}, penalty),
        "bn_copy": _step_fn(nn.BatchNorm2d(c), x, {}, penalty),
        "mask": _step_fn(MaskedBatchNorms(c, 2), x, {"domain": mixed}, penalty),
        "ours_int": _step_fn(DomainBatchNorm2d(c, 2), x, {"domain": 1}, penalty),
        "ours_halves": _step_fn(DomainBatchNorm2d(c, 2), x, {"domain": halves}, penalty),
    }
    split = _split_bn(c)
    if split is not None:
        sides["timm_split"] = _step_fn(split, x, {"domain": None}, penalty)
    return sides


RATIOS = {
    "ids/BN": ("ours", "bn"),
    "ids/mask": ("ours", "mask"),
    "split/timm": ("ours_halves", "timm_split"),
    "int/BN": ("ours_int", "bn"),
    "ctl": ("bn_copy", "bn"),
}


def measure(shape: tuple[int, ...], rounds: int, min_run_time: float, penalty: bool) -> dict:
    """Median time per side and median per-round ratio per pair, for one size."""
    sides = _sides(shape, penalty)
    for step in sides.values():
        for _ in range(2):
            step()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, step in sides.items():
            times[name].append(_time(step, min_run_time))
    result: dict[str, float] = {f"{k} ms": statistics.median(v) * 1e3 for k, v in times.items()}
    for label, (a, b) in RATIOS.items():
        if a in times and b in times:
            pairs = zip(times[a], times[b], strict=True)
            result[label] = statistics.median(t_a / t_b for t_a, t_b in pairs)
    return result


def count_ops() -> None:
    """aten ops (all levels) of one forward+backward, 8x16x4x4, ours vs nn.BatchNorm2d."""
    from torch.profiler import profile

    x = torch.randn(8, 16, 4, 4)
    for name, module, kwargs in [
        (
            "DomainBatchNorm2d, per-sample ids",
            DomainBatchNorm2d(16, 2),
            {"domain": torch.arange(8) % 2},
        ),
        ("DomainBatchNorm2d, int domain", DomainBatchNorm2d(16, 2), {"domain": 1}),
        ("nn.BatchNorm2d", nn.BatchNorm2d(16), {}),
    ]:
        step = _step_fn(module, x, kwargs)
        step()
        with profile() as prof:
            step()
        events = [e for e in prof.events() if e.name.startswith("aten::")]
        top = [
            e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")
        ]
        print(f"{name:<36} aten ops {len(events):4d} (top-level {len(top)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--rounds", type=int, default=9, help="alternating rounds per size")
    parser.add_argument("--min-run-time", type=float, default=0.2, help="seconds per timing")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 0.05 s (a smoke run)")
    parser.add_argument("--penalty", action="store_true", help="time a gradient-penalty step")
    parser.add_argument("--profile", action="store_true", help="print aten op counts and exit")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.profile:
        count_ops()
        return
    if args.quick:
        args.rounds, args.min_run_time = 3, 0.05
    what = "gradient penalty (double backward)" if args.penalty else "forward+backward"
    print(
        f"DomainBatchNorm2d (2 domains) vs peers, {what}, training, threads={args.threads}, "
        f"median of {args.rounds} alternating rounds"
    )
    header = f"{'N x C x H x W':<16}{'BN ms':>9}{'ours ms':>9}"
    header += "".join(f"{label:>12}" for label in RATIOS)
    print(header)
    for shape in GRID:
        r = measure(shape, args.rounds, args.min_run_time, args.penalty)
        row = f"{'x'.join(map(str, shape)):<16}{r['bn ms']:9.3f}{r['ours ms']:9.3f}"
        row += "".join(f"{r[label]:12.2f}" if label in r else f"{'-':>12}" for label in RATIOS)
        print(row, flush=True)


if __name__ == "__main__":
    main()
