"""The prepared accelerator check: every GPU-only hazard of the package, one summary.

Run on a CUDA machine (``make gpu-check``; under 10 minutes on one GPU)::

    python bench/gpu_check.py                       # CUDA when available, else CPU
    python bench/gpu_check.py --device cpu --quick  # the CPU dry run CI exercises

Checks, each printed as ``PASS``/``FAIL``/``SKIP`` with its figures, then one summary line
(exit status 1 on any ``FAIL``):

- ``layers``: every layer's training and eval forward/backward on the device against the same
  layer in float64 on the CPU (outputs, input and parameter gradients, running statistics);
- ``amp``: fp16 autocast with the loss scaled by 65536 (a ``GradScaler``'s first scale) and
  bf16 autocast over inputs with all-zero patches: every gradient finite;
- ``compile``: ``torch.compile`` (inductor on CUDA; aot_eager in ``--quick``) against eager;
- ``host_reads``: profiler count of ``_local_scalar_dense``/``item``/``is_nonzero``/
  ``nonzero``/``unique`` per training forward+backward and eval forward: 0 for every layer;
  on CUDA the same step also runs under ``torch.cuda.set_sync_debug_mode("error")``;
- ``launches``: top-level aten ops per forward+backward at 32x64x16x16 and the time ratio
  against the native twin (the kernel issue's table);
- ``ddp``: two processes (nccl with two GPUs, else gloo on the device's tensors) running the
  synced layers on half a batch each against one process on the whole batch, and
  ``recompute_bn_stats`` with 4 and 3 batches per rank against one process seeing all;
- ``doctor``: a Lightning fit with ``Trainer(deterministic=True)``, ``BatchNormDoctor`` and
  ``PreciseBN`` on the device.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_norms import (
    BatchRenorm2d,
    CosineConv2d,
    CosineLinear,
    DomainBatchNorm1d,
    DomainBatchNorm2d,
    LayerNorm2d,
)
from lightning_norms._tracing import HOST_READS
from lightning_norms.distributed import SyncedBatchNorm2d

NO_KERNEL = frozenset(
    {
        *("view", "reshape", "_reshape_alias", "_unsafe_view", "as_strided", "expand"),
        *("expand_as", "unsqueeze", "squeeze", "permute", "t", "transpose", "select", "slice"),
        *("narrow", "split", "chunk", "unbind", "alias", "detach", "view_as", "flatten"),
        *("unflatten", "empty", "empty_like", "empty_strided", "resolve_conj", "resolve_neg"),
        *("lift_fresh", "new_empty", "new_empty_strided", "result_type", "promote_types"),
    }
)
"""Top-level aten ops that launch no kernel on a GPU (views, allocations): not counted."""


class Case:
    """One layer configuration: a constructor, an input shape and the forward's extra args."""

    def __init__(
        self, name: str, make: Callable[[], nn.Module], shape: tuple[int, ...], ids: bool = False
    ) -> None:
        self.name, self.make, self.shape, self.ids = name, make, shape, ids

    def call(self, m: nn.Module, x: Tensor) -> Tensor:
        if not self.ids:
            return m(x)
        ids = torch.arange(x.shape[0], device=x.device) % 2
        return m(x, ids)


CASES = [
    Case("DomainBatchNorm2d ids", lambda: DomainBatchNorm2d(8, 2), (6, 8, 5, 5), ids=True),
    Case("DomainBatchNorm2d int", lambda: _int_domain(DomainBatchNorm2d(8, 2)), (6, 8, 5, 5)),
    Case("DomainBatchNorm1d ids", lambda: DomainBatchNorm1d(8, 2), (6, 8), ids=True),
    Case("BatchRenorm2d", lambda: BatchRenorm2d(8, warmup_steps=0), (6, 8, 5, 5)),
    Case("SyncedBatchNorm2d", lambda: SyncedBatchNorm2d(8), (6, 8, 5, 5)),
    Case("CosineConv2d 3x3", lambda: CosineConv2d(8, 4, 3, padding=1), (6, 8, 5, 5)),
    Case("CosineConv2d 1x1", lambda: CosineConv2d(8, 4, 1), (6, 8, 5, 5)),
    Case("CosineLinear", lambda: CosineLinear(8, 4), (6, 8)),
    Case("LayerNorm2d", lambda: LayerNorm2d(8), (6, 8, 5, 5)),
]


class _IntDomain(nn.Module):
    """A domain layer called with ``domain=1`` (the whole batch one domain)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x, 1)


def _int_domain(m: nn.Module) -> nn.Module:
    return _IntDomain(m)


def _randomise(m: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.rand(p.shape, generator=g, dtype=torch.float64) + 0.5)
    return m


def _step(case: Case, m: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
    """One forward and a backward of fixed output weights; returns output and gradients."""
    x = x.detach().requires_grad_(True)
    out = case.call(m, x)
    weights = torch.linspace(-1, 1, out.numel(), device=out.device, dtype=out.dtype)
    out.backward(weights.view_as(out))
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    return out.detach(), x.grad, grads


def _close(a: Tensor, b: Tensor, tol: float) -> float:
    """Largest error of ``a`` against ``b`` relative to ``b``'s scale; raises past ``tol``."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    err = float((a - b).abs().max() / b.abs().max().clamp(min=1e-6)) if b.numel() else 0.0
    if not err <= tol:
        raise AssertionError(f"relative error {err:.2e} > {tol:.0e}")
    return err


def check_layers(device: torch.device, quick: bool) -> str:
    worst = 0.0
    for case in CASES:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(case.shape, generator=g, dtype=torch.float64) * 2 + 3
        ref = _randomise(case.make().double())
        dev = _randomise(case.make()).to(device)
        for training in (True, False):
            ref.train(training)
            dev.train(training)
            got, want = _step(case, dev, x.float().to(device)), _step(case, ref, x)
            try:
                pairs = zip([got[0], got[1], *got[2]], [want[0], want[1], *want[2]], strict=True)
                for a, b in pairs:
                    worst = max(worst, _close(a, b, 1e-4))
                for name, buf in ref.named_buffers():
                    worst = max(worst, _close(dict(dev.named_buffers())[name].float(), buf, 1e-4))
            except AssertionError as err:
                raise AssertionError(f"{case.name} training={training}: {err}") from None
            ref.zero_grad()
            dev.zero_grad()
    return f"{len(CASES)} layers x train/eval, worst relative error {worst:.1e}"


def _zero_patch_input(shape: tuple[int, ...], device: torch.device) -> Tensor:
    x = torch.randn(shape, device=device)
    if x.dim() == 4:
        x[:, :, :3, :3] = 0.0
    x[0] = 0.0
    return x


def _plain_twin(m: nn.Module) -> nn.Module | None:
    """The plain layer a cosine layer replaces (same weight, no bias), else ``None``."""
    if isinstance(m, CosineLinear):
        twin: nn.Module = nn.Linear(m.in_features, m.out_features, bias=False)
    elif isinstance(m, CosineConv2d):
        twin = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                         m.dilation, m.groups, bias=False)
    else:
        return None
    with torch.no_grad():
        twin.weight.copy_(m.weight)
    return twin.to(m.weight.device)


def _amp_finite(call: Callable[[Tensor], Tensor], params: list[Tensor], x: Tensor,
                dtype: torch.dtype, scale: float) -> bool:
    """Whether every gradient of an autocast step with the loss scaled by ``scale`` is finite."""
    for p in params:
        p.grad = None
    x = x.detach().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=dtype):
        out = call(x)
    (out.float().sum() * scale).backward()
    grads = [x.grad, *(p.grad for p in params if p.grad is not None)]
    return all(bool(torch.isfinite(g).all()) for g in grads)


def check_amp(device: torch.device, quick: bool) -> str:
    """fp16/bf16 autocast at a GradScaler's first scale (65536), or at the largest power-of-16
    scale at which the plain layer a cosine layer replaces keeps finite gradients."""
    scales = []
    for case in CASES:
        for dtype in (torch.float16, torch.bfloat16):
            m = _randomise(case.make()).to(device).train()
            x = _zero_patch_input(case.shape, device)
            twin, scale = _plain_twin(m), 65536.0
            while twin is not None and scale > 1 and not _amp_finite(
                twin, list(twin.parameters()), x, dtype, scale
            ):
                scale /= 16
            scales.append(scale)
            if not _amp_finite(lambda v, m=m, c=case: c.call(m, v), list(m.parameters()), x,
                               dtype, scale):
                raise AssertionError(f"{case.name} {dtype}: non-finite gradient at scale {scale:g}")
    return (f"{len(CASES)} layers x fp16/bf16 autocast over zero patches: finite at scale "
            f"65536 (cosine: the plain layer's largest finite scale, down to {min(scales):g})")


def check_compile(device: torch.device, quick: bool) -> str:
    backend = "aot_eager" if quick or device.type != "cuda" else "inductor"
    cases = CASES[:4] if quick else CASES
    torch._dynamo.reset()
    for case in cases:
        eager = _randomise(case.make()).to(device).train()
        compiled_model = _randomise(case.make()).to(device).train()
        compiled = torch.compile(compiled_model, backend=backend, fullgraph=True)
        x = torch.randn(case.shape, device=device) + 1

        def run(m: nn.Module, c: Case = case, x: Tensor = x) -> list[Tensor]:
            out, gx, gp = _step(c, m, x)
            return [out, gx, *gp]

        for a, b in zip(run(compiled), run(eager), strict=True):
            _close(a, b, 1e-4)
    return f"{len(cases)} layers, backend {backend}, fullgraph, output and gradients match"


def _count_ops(fn: Callable[[], None], names: frozenset[str] | None = None) -> int:
    from torch.profiler import profile

    with profile() as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    if names is not None:
        return sum(1 for e in events if e.name in names)
    top = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten")]
    return sum(1 for e in top if e.name.removeprefix("aten::") not in NO_KERNEL)


def _discard(_: object) -> None:
    return None


def check_host_reads(device: torch.device, quick: bool) -> str:
    found = []
    for case in CASES:
        m = _randomise(case.make()).to(device)
        x = torch.randn(case.shape, device=device) + 1
        m.train()
        train = _count_ops(lambda m=m, c=case, x=x: _discard(_step(c, m, x)), HOST_READS)
        m.eval()
        with torch.no_grad():
            evals = _count_ops(lambda m=m, c=case, x=x: _discard(c.call(m, x)), HOST_READS)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                m.train()
                _step(case, m, x)
            except RuntimeError as err:
                found.append(f"{case.name}: sync debug mode: {err}")
            finally:
                torch.cuda.set_sync_debug_mode(0)
        if train or evals:
            found.append(f"{case.name}: {train} host reads in training, {evals} in eval")
    if found:
        raise AssertionError("; ".join(found))
    return f"{len(CASES)} layers: 0 host reads in training forward+backward and eval"


def _time(fn: Callable[[], None], device: torch.device, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def check_launches(device: torch.device, quick: bool) -> str:
    shape = (8, 16, 8, 8) if quick else (32, 64, 16, 16)
    n, c = shape[0], shape[1]
    pairs = [
        ("DomainBatchNorm2d ids", Case("", lambda: DomainBatchNorm2d(c, 2), shape, True),
         nn.BatchNorm2d(c)),
        ("DomainBatchNorm2d int", Case("", lambda: _int_domain(DomainBatchNorm2d(c, 2)), shape),
         nn.BatchNorm2d(c)),
        ("BatchRenorm2d", Case("", lambda: BatchRenorm2d(c), shape), nn.BatchNorm2d(c)),
        ("CosineConv2d 3x3", Case("", lambda: CosineConv2d(c, c, 3, padding=1), shape),
         nn.Conv2d(c, c, 3, padding=1, bias=False)),
        ("CosineLinear", Case("", lambda: CosineLinear(c * 4, c), (n * 8, c * 4)),
         nn.Linear(c * 4, c, bias=False)),
    ]
    rows = []
    for name, case, twin in pairs:
        ours, twin = case.make().to(device).train(), twin.to(device).train()
        x = torch.randn(case.shape, device=device) + 1
        native = Case("", nn.Identity, case.shape)

        def run_ours(m: nn.Module = ours, c_: Case = case, x: Tensor = x) -> None:
            _step(c_, m, x)

        def run_twin(m: nn.Module = twin, c_: Case = native, x: Tensor = x) -> None:
            _step(c_, m, x)

        run_ours(), run_twin()
        launches = (_count_ops(run_ours), _count_ops(run_twin))
        rounds = 5 if quick else 30
        ratio = _time(run_ours, device, rounds) / _time(run_twin, device, rounds)
        rows.append(f"{name}: {launches[0]} vs {launches[1]} launches, {ratio:.2f}x time")
    return f"at {'x'.join(map(str, shape))}: " + "; ".join(rows)


def _ddp_worker(rank: int, world: int, backend: str, device_type: str, tmp: str) -> None:
    dist.init_process_group(backend, init_method=f"file://{tmp}/rdv", rank=rank, world_size=world)
    try:
        device = torch.device(device_type, rank if backend == "nccl" else 0)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.save(_ddp_body(rank, world, device), os.path.join(tmp, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _sync_layers() -> list[tuple[str, Callable[[], nn.Module], bool]]:
    return [
        ("SyncedBatchNorm2d", lambda: SyncedBatchNorm2d(4), False),
        ("DomainBatchNorm2d sync", lambda: DomainBatchNorm2d(4, 2, sync=True), True),
        ("BatchRenorm2d sync", lambda: BatchRenorm2d(4, warmup_steps=0, sync=True), False),
    ]


def _global_batch() -> tuple[Tensor, Tensor, Tensor]:
    """The global batch, its domain ids, and the output weights of the loss (global indices)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 4, 3, 3, generator=g) * 2 + 1
    return x, torch.tensor([0, 1, 1, 0, 1, 1, 0, 1]), torch.linspace(-1, 1, x.numel()).view_as(x)


def _ddp_body(rank: int, world: int, device: torch.device) -> dict[str, list[Tensor]]:
    from lightning_norms.stats import recompute_bn_stats

    x, ids, w = _global_batch()
    half = slice(rank * 4, rank * 4 + 4)
    out: dict[str, list[Tensor]] = {}
    for name, make, takes_ids in _sync_layers():
        m = _randomise(make()).to(device).train()
        xs = x[half].clone().to(device).requires_grad_(True)
        y = m(xs, ids[half].to(device)) if takes_ids else m(xs)
        (y * w[half].to(device)).sum().backward()
        out[name] = [t.detach().cpu() for t in (y, xs.grad, m.running_mean, m.running_var)]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 4, 1), SyncedBatchNorm2d(4)).to(device)
    batches = [x[i : i + 1].to(device) * (i + 1) for i in range(7)]
    mine = batches[:4] if rank == 0 else batches[4:]
    recompute_bn_stats(net, mine, num_batches=10)
    out["recompute uneven"] = [net[1].running_mean.cpu(), net[1].running_var.cpu()]
    return out


def _ddp_reference(device: torch.device) -> dict[str, list[Tensor]]:
    from lightning_norms.stats import recompute_bn_stats

    x, ids, w = _global_batch()
    out: dict[str, list[Tensor]] = {}
    for name, make, takes_ids in _sync_layers():
        m = _randomise(make()).to(device).train()
        xs = x.clone().to(device).requires_grad_(True)
        y = m(xs, ids.to(device)) if takes_ids else m(xs)
        (y * w.to(device)).sum().backward()
        out[name] = [t.detach().cpu() for t in (y, xs.grad, m.running_mean, m.running_var)]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 4, 1), SyncedBatchNorm2d(4)).to(device)
    recompute_bn_stats(net, [x[i : i + 1].to(device) * (i + 1) for i in range(7)], num_batches=10)
    out["recompute uneven"] = [net[1].running_mean.cpu(), net[1].running_var.cpu()]
    return out


def check_ddp(device: torch.device, quick: bool) -> str:
    two_gpus = device.type == "cuda" and torch.cuda.device_count() >= 2
    backend = "nccl" if two_gpus else "gloo"
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ddp_worker, args=(2, backend, device.type, tmp), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(tmp, f"r{r}.pt")) for r in range(2)]
    ref = _ddp_reference(device)
    for name, want in ref.items():
        for r, got in enumerate(ranks):
            parts = got[name]
            if name != "recompute uneven":
                half = slice(r * 4, r * 4 + 4)
                parts = [parts[0], parts[1], parts[2], parts[3]]
                want_r = [want[0][half], want[1][half], want[2], want[3]]
            else:
                want_r = want
            for a, b in zip(parts, want_r, strict=True):
                try:
                    _close(a, b, 1e-4)
                except AssertionError as err:
                    raise AssertionError(f"{name} rank {r}: {err}") from None
    note = "" if two_gpus else " (one device: gloo on its tensors; nccl needs two GPUs)"
    return f"backend {backend}{note}: {len(ref)} cases equal one process"


def check_doctor(device: torch.device, quick: bool) -> str:
    import lightning.pytorch as pl
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_norms.callbacks import BatchNormDoctor, PreciseBN

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2),
            )

        def forward(self, x: Tensor) -> Tensor:
            return self.body(x)

        def training_step(self, batch: list[Tensor], _: int) -> Tensor:
            return F.cross_entropy(self.body(batch[0]), batch[1])

        def validation_step(self, batch: list[Tensor], _: int) -> None:
            self.log("val_loss", F.cross_entropy(self.body(batch[0]), batch[1]))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    data = TensorDataset(torch.randn(64, 3, 8, 8) + 2, torch.randint(0, 2, (64,)))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            default_root_dir=tmp, accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=1, max_epochs=2, deterministic=True, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[BatchNormDoctor(), PreciseBN(num_batches=4)],
        )
        trainer.fit(Net(), DataLoader(data, batch_size=16), DataLoader(data, batch_size=16))
    return "2 epochs with deterministic=True, BatchNormDoctor and PreciseBN: no error"


CHECKS: dict[str, Callable[[torch.device, bool], str]] = {
    "layers": check_layers,
    "amp": check_amp,
    "compile": check_compile,
    "host_reads": check_host_reads,
    "launches": check_launches,
    "ddp": check_ddp,
    "doctor": check_doctor,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes, aot_eager compile")
    parser.add_argument("--only", nargs="*", choices=sorted(CHECKS), help="run these checks")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"gpu_check on {device} (torch {torch.__version__}"
          f"{', ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''})")
    results = {}
    for name in args.only or CHECKS:
        start = time.perf_counter()
        try:
            status, detail = "PASS", CHECKS[name](device, args.quick)
        except Exception as err:  # every check reports; the summary says which failed
            status, detail = "FAIL", f"{type(err).__name__}: {err}"
            traceback.print_exc()
        results[name] = status
        print(f"[{status}] {name} ({time.perf_counter() - start:.1f} s): {detail}", flush=True)
    failed = [n for n, s in results.items() if s == "FAIL"]
    print(f"gpu_check summary: {len(results) - len(failed)} of {len(results)} checks passed"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
