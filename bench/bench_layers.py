"""Forward+backward time of BatchRenorm, Cosine and LayerNorm2d layers against their peers.

Run: ``python bench/bench_layers.py [--threads 1|2] [--pairs 40] [--quick]``. Each row times one
of our layers and the layer a user would pick instead (``nn.BatchNorm2d``, ``nn.Conv2d``,
``nn.Linear``, timm's ``LayerNorm2d``, torchrl's ``BatchRenorm1d``) in the same run: after a
warm-up, one forward+backward step of each, alternately (the order flips every pair),
``--pairs`` times. Printed: each side's median time and the median of the per-pair ratios
``ours / peer`` (robust to load from other processes). The control rows time a torch layer
against a second copy of itself: their distance from 1.00x is the noise floor of the run.
With one thread the clock is the thread's CPU time (``time.thread_time``), else wall time.
timm and torchrl rows are skipped (and say so) when the package does not import.

Targets (issue 13): BatchRenorm2d <= 1.15x nn.BatchNorm2d, CosineConv2d <= 1.5x nn.Conv2d
(1x1 and 3x3), CosineLinear <= 1.3x nn.Linear, LayerNorm2d ~1.0x timm's LayerNorm2d.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from lightning_norms import BatchRenorm1d, BatchRenorm2d, CosineConv2d, CosineLinear, LayerNorm2d

Case = tuple[str, Callable[[], nn.Module], Callable[[], nn.Module] | None, Tensor]


def _peer(module: str, name: str) -> Callable[..., nn.Module] | None:
    """``module.name`` when the package imports, else ``None`` (the row is skipped)."""
    try:
        return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]
    except Exception:  # any import failure (missing package or dependency): no such peer
        return None


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
    """Median time of each side and median of the per-pair ratios ``ours / ref``."""
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    step_ours, step_ref = _step_fn(ours, x), _step_fn(ref, x)
    for _ in range(3):
        step_ours()
        step_ref()
    t_ours: list[float] = []
    t_ref: list[float] = []
    for i in range(pairs):
        order = ((step_ours, t_ours), (step_ref, t_ref))
        for step, times in order if i % 2 == 0 else order[::-1]:
            start = clock()
            step()
            times.append(clock() - start)
    ratio = statistics.median(a / b for a, b in zip(t_ours, t_ref, strict=True))
    return statistics.median(t_ours), statistics.median(t_ref), ratio


def _maps(quick: bool) -> list[tuple[int, int, int, int]]:
    """The feature-map grid: small, mid (and large unless ``quick``)."""
    grid = [(8, 16, 16, 16), (32, 64, 32, 32)]
    return grid if quick else [*grid, (64, 64, 32, 32)]


def _renorm_cases(quick: bool) -> Iterator[Case]:
    for shape in _maps(quick):
        x = torch.randn(shape) * 2 + 0.5
        c = shape[1]
        for layout, xx in (("", x), (" channels_last", x.to(memory_format=torch.channels_last))):
            yield (
                f"BatchRenorm2d / nn.BatchNorm2d  {list(shape)}{layout}",
                lambda c=c: BatchRenorm2d(c, warmup_steps=0),
                lambda c=c: nn.BatchNorm2d(c),
                xx,
            )
    torchrl_renorm = _peer("torchrl.modules", "BatchRenorm1d")
    for rows, c in ((64, 256), (512, 1024)):
        yield (
            f"BatchRenorm1d / torchrl BatchRenorm1d  [{rows},{c}]",
            lambda c=c: BatchRenorm1d(c),
            None if torchrl_renorm is None else (lambda c=c: torchrl_renorm(c)),
            torch.randn(rows, c) * 2 + 0.5,
        )


def _cosine_cases(quick: bool) -> Iterator[Case]:
    for shape in _maps(quick)[:2]:
        x = torch.randn(shape)
        c = shape[1]
        for k in (1, 3):
            yield (
                f"CosineConv2d / nn.Conv2d  {c}->{c} {k}x{k}  {list(shape)}",
                lambda c=c, k=k: CosineConv2d(c, c, k, padding=k // 2),
                lambda c=c, k=k: nn.Conv2d(c, c, k, padding=k // 2),
                x,
            )
    for rows, fin, fout in ((64, 256, 256), (256, 1024, 1024)):
        yield (
            f"CosineLinear / nn.Linear  {fin}->{fout}  [{rows},{fin}]",
            lambda fin=fin, fout=fout: CosineLinear(fin, fout),
            lambda fin=fin, fout=fout: nn.Linear(fin, fout),
            torch.randn(rows, fin),
        )


def _layer_norm_cases(quick: bool) -> Iterator[Case]:
    timm_ln = _peer("timm.layers", "LayerNorm2d")
    for shape in _maps(quick)[:2]:
        x = torch.randn(shape)
        c = shape[1]
        for layout, xx in (("", x), (" channels_last", x.to(memory_format=torch.channels_last))):
            yield (
                f"LayerNorm2d / timm LayerNorm2d  {list(shape)}{layout}",
                lambda c=c: LayerNorm2d(c),
                None if timm_ln is None else (lambda c=c: timm_ln(c)),
                xx,
            )


def _control_cases() -> Iterator[Case]:
    """The noise floor: a torch layer against a second copy of itself."""
    bn, conv = nn.BatchNorm2d(64), nn.Conv2d(16, 16, 3, padding=1)
    for name, layer, x in (
        ("control: nn.BatchNorm2d / itself  [32,64,32,32]", bn, torch.randn(32, 64, 32, 32)),
        ("control: nn.Conv2d / itself  [8,16,16,16]", conv, torch.randn(8, 16, 16, 16)),
    ):
        yield name, lambda layer=layer: layer, lambda layer=layer: copy.deepcopy(layer), x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, choices=(1, 2), help="intra-op threads")
    parser.add_argument("--pairs", type=int, default=40, help="alternating (ours, peer) pairs")
    parser.add_argument("--quick", action="store_true", help="no large maps, 10 pairs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pairs = 10 if args.quick else args.pairs
    clock = "thread CPU time" if args.threads == 1 else "wall time"
    print(
        f"torch {torch.__version__}, threads={torch.get_num_threads()}, pairs={pairs}, "
        f"clock: {clock}, cpus={os.cpu_count()}, load average {os.getloadavg()[0]:.1f} at start"
    )
    print(f"{'forward+backward (ours / peer)':<62} {'ours ms':>9} {'peer ms':>9} {'ratio':>7}")
    groups = (_control_cases(), _renorm_cases(args.quick), _cosine_cases(args.quick))
    for cases in (*groups, _layer_norm_cases(args.quick)):
        for name, make_ours, make_peer, x in cases:
            if make_peer is None:
                print(f"{name:<62} {'skipped: the peer package does not import':>27}")
                continue
            t_ours, t_ref, ratio = compare(make_ours(), make_peer(), x, pairs)
            print(f"{name:<62} {t_ours * 1e3:9.3f} {t_ref * 1e3:9.3f} {ratio:6.2f}x")


if __name__ == "__main__":
    main()
