"""Accelerator hazards simulated on the CPU, for every registry entry (API.md "On accelerators").

No GPU is lent to CI, so each accelerator-only hazard is checked here by what the CPU can show:

- ``device="meta"``: every layer's training forward+backward and eval forward run on meta
  tensors, which have no values: any read of a tensor value on the host (``.item()``,
  ``bool(t)``, ``.tolist()``, ``nonzero``) raises there, as it would stall a CUDA stream;
- the same steps under ``torch.profiler`` count zero host-read ops;
- ``torch.use_deterministic_algorithms(True)`` (every recipe's ``Trainer(deterministic=True)``):
  each layer, ``PreciseBN`` and ``BatchNormDoctor`` run, and none of the aten ops they call is
  on torch's list of ops without a deterministic CUDA kernel or without an MPS kernel in the
  supported torch range (a static check of the recorded op names);
- fp16 autocast with the loss scaled by 65536 (a ``GradScaler``'s first scale) over inputs with
  all-zero patches and samples: every gradient finite wherever ``nn.Conv2d``'s is;
- a recorder around ``torch.distributed``'s collectives on two gloo ranks: every rank issues the
  same collectives in the same order (forward, backward, double backward, a domain present on
  one rank only, the ``recompute_bn_stats`` pass with 4 and 3 batches per rank), each on the
  module's device.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

import lightning_norms as ln
from lightning_norms import BatchRenorm2d, DomainBatchNorm2d
from lightning_norms.distributed import SyncedBatchNorm2d
from lightning_norms.stats import recompute_bn_stats
from tests._dist import run_ddp
from tests._layers import HOST_READS, op_names
from tests._registry import REGISTRY, LayerInfo, Sample

NONDETERMINISTIC_CUDA = frozenset(
    {
        "aten::avg_pool3d_backward",
        "aten::_adaptive_avg_pool2d_backward",
        "aten::_adaptive_avg_pool3d_backward",
        "aten::max_pool3d_with_indices_backward",
        "aten::adaptive_max_pool2d_backward",
        "aten::fractional_max_pool2d_backward",
        "aten::fractional_max_pool3d_backward",
        "aten::max_unpool1d",
        "aten::max_unpool2d",
        "aten::max_unpool3d",
        "aten::upsample_linear1d_backward",
        "aten::upsample_bilinear2d_backward",
        "aten::upsample_bicubic2d_backward",
        "aten::upsample_trilinear3d_backward",
        "aten::reflection_pad1d_backward",
        "aten::reflection_pad2d_backward",
        "aten::reflection_pad3d_backward",
        "aten::replication_pad1d_backward",
        "aten::replication_pad2d_backward",
        "aten::replication_pad3d_backward",
        "aten::nll_loss2d_forward",
        "aten::_ctc_loss_backward",
        "aten::_embedding_bag_backward",
        "aten::put_",
        "aten::histc",
        "aten::bincount",
        "aten::kthvalue",
        "aten::median",
        "aten::nanmedian",
        "aten::grid_sampler_2d_backward",
        "aten::grid_sampler_3d_backward",
        "aten::scatter_reduce",
        "aten::scatter_reduce_",
    }
)
"""Ops that raise under ``use_deterministic_algorithms(True)`` on CUDA (torch's documented
list; ``median``/``nanmedian`` with a dim, ``bincount`` with weights, ``scatter_reduce`` with
``prod``, ``resize_`` filling memory: listed whole, as the recorded name does not say which)."""

NO_MPS_KERNEL = frozenset({"aten::nanmedian", "aten::median", "aten::kthvalue", "aten::histc"})
"""Ops without an MPS kernel (or only with one in recent torch) in the supported range."""

TRAINABLE = [info for info in REGISTRY if info.kind != "synced"] + [
    info for info in REGISTRY if info.kind == "synced" and info.name.endswith("2d")
]


def _default_sample(info: LayerInfo) -> Sample:
    return info.default


def _kwargs_on(sample: Sample, device: torch.device | str) -> dict[str, Any]:
    kwargs = sample.kwargs()
    if isinstance(kwargs.get("domain"), Tensor):
        kwargs["domain"] = kwargs["domain"].to(device)
    return kwargs


def _step(layer: nn.Module, x: Tensor, kwargs: dict[str, Any]) -> None:
    """A training forward and backward, then an eval forward (the layer ends in train mode)."""
    layer.train()
    x = x.detach().requires_grad_(True)
    out = layer(x, **kwargs)
    out.backward(torch.ones_like(out))
    layer.eval()
    with torch.no_grad():
        layer(x, **kwargs)
    layer.train()


@pytest.mark.parametrize("info", TRAINABLE, ids=lambda info: info.name)
def test_meta_device_runs_without_reading_values(info: LayerInfo) -> None:
    sample = _default_sample(info)
    layer = info.build().to("meta")
    x = torch.empty(sample.shape, device="meta")
    _step(layer, x, _kwargs_on(sample, "meta"))
    assert all(p.grad is not None and p.grad.is_meta for p in layer.parameters())


@pytest.mark.parametrize("info", TRAINABLE, ids=lambda info: info.name)
def test_no_host_reads_in_training_or_eval(info: LayerInfo) -> None:
    sample = _default_sample(info)
    layer, x = info.build(), sample.make()
    kwargs = sample.kwargs()
    _step(layer, x, kwargs)  # warm-up: once-per-layer work (a first-call warning) is allowed
    reads = op_names(lambda: _step(layer, x, kwargs)) & HOST_READS
    assert not reads, f"{info.name} reads tensor values on the host: {sorted(reads)}"


@contextmanager
def _deterministic() -> Iterator[None]:
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("info", TRAINABLE, ids=lambda info: info.name)
def test_deterministic_mode_and_ops_with_cuda_and_mps_kernels(info: LayerInfo) -> None:
    sample = _default_sample(info)
    layer, x = info.build(), sample.make()
    with _deterministic():
        ops = op_names(lambda: _step(layer, x, sample.kwargs()))
    assert not ops & NONDETERMINISTIC_CUDA, sorted(ops & NONDETERMINISTIC_CUDA)
    assert not ops & NO_MPS_KERNEL, sorted(ops & NO_MPS_KERNEL)


def test_callbacks_under_deterministic_mode_use_deterministic_ops(tmp_path: Path) -> None:
    from lightning_norms.callbacks import BatchNormDoctor, PreciseBN
    from tests._boring import BoringNormModel, boring_body, boring_loader, boring_trainer

    model = BoringNormModel(boring_body(BatchRenorm2d(8)))
    trainer = boring_trainer(
        tmp_path,
        max_epochs=2,
        deterministic=True,
        callbacks=[BatchNormDoctor(), PreciseBN(num_batches=4)],
    )
    with _deterministic():
        ops = op_names(lambda: trainer.fit(model, boring_loader(), boring_loader()))
    assert "aten::native_batch_norm" in ops or "aten::batch_norm" in ops  # the fit ran
    assert not ops & NONDETERMINISTIC_CUDA, sorted(ops & NONDETERMINISTIC_CUDA)
    assert not ops & NO_MPS_KERNEL, sorted(ops & NO_MPS_KERNEL)


def _zero_patches(sample: Sample) -> Tensor:
    """The sample with an all-zero first sample and an all-zero corner patch in the others."""
    x = sample.make().float().clone()
    if x.shape[0] == 0:
        return x
    x[0] = 0.0
    if x.dim() == 4:
        x[:, :, :3, :3] = 0.0
    return x


def _plain_twin(layer: nn.Module) -> nn.Module | None:
    """The plain layer a cosine layer replaces (same weight, no bias), else ``None``."""
    if isinstance(layer, ln.CosineLinear):
        twin: nn.Module = nn.Linear(layer.in_features, layer.out_features, bias=False)
    elif isinstance(layer, ln.CosineConv2d):
        twin = nn.Conv2d(
            layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
            layer.padding, layer.dilation, layer.groups, bias=False,
        )
    else:
        return None
    with torch.no_grad():
        twin.weight.copy_(layer.weight)
    return twin


def _finite_grads(layer: nn.Module, x: Tensor, kwargs: dict[str, Any], scale: float) -> list[str]:
    """Names of the gradients that are not finite after an fp16-autocast step at ``scale``."""
    layer.zero_grad()
    x = x.detach().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.float16):
        out = layer(x, **kwargs)
    (out.float().sum() * scale).backward()
    grads = {"input": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}
    return [n for n, g in grads.items() if g is not None and not bool(torch.isfinite(g).all())]


@pytest.mark.parametrize("info", TRAINABLE, ids=lambda info: info.name)
def test_fp16_autocast_with_a_grad_scaler_keeps_gradients_finite(info: LayerInfo) -> None:
    """At the scaler's first scale (65536), or the largest power-of-two scale at which the plain
    layer it replaces (``nn.Linear`` / ``nn.Conv2d`` for the cosine layers) keeps finite
    gradients, over inputs with an all-zero sample and all-zero patches."""
    sample = _default_sample(info)
    layer = info.build().train()
    x = _zero_patches(sample)
    twin = _plain_twin(layer)
    scale = 65536.0
    while twin is not None and _finite_grads(twin, x, {}, scale) and scale > 1:
        scale /= 16
    assert twin is None or not _finite_grads(twin, x, {}, scale), "the plain layer overflows"
    bad = _finite_grads(layer, x, sample.kwargs(), scale)
    assert not bad, f"non-finite gradients of {bad} at loss scale {scale:g}"


# --- collectives: every rank the same calls, in the same order, on the module's device ---

RECORDED = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
            "broadcast")


@contextmanager
def _recording(log: list[tuple[str, tuple[int, ...], str, str]]) -> Iterator[None]:
    originals = {name: getattr(dist, name) for name in RECORDED}

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def recorder(tensor: Any, *args: Any, **kwargs: Any) -> Any:
            t = tensor[0] if isinstance(tensor, list) else tensor
            log.append((name, tuple(t.shape), str(t.dtype), t.device.type))
            return fn(tensor, *args, **kwargs)

        return recorder

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def _synced_layers() -> list[tuple[str, nn.Module, bool]]:
    torch.manual_seed(0)
    return [
        ("SyncedBatchNorm2d", SyncedBatchNorm2d(4), False),
        ("DomainBatchNorm2d", DomainBatchNorm2d(4, 3, sync=True), True),
        ("BatchRenorm2d", BatchRenorm2d(4, warmup_steps=0, sync=True), False),
    ]


def _collectives_worker(rank: int, world: int) -> dict[str, list[Any]]:
    torch.manual_seed(rank)
    logs: dict[str, list[Any]] = {}
    for name, layer, takes_ids in _synced_layers():
        x = (torch.randn(4, 4, 3, 3) + rank).requires_grad_(True)
        # domain 2 appears on rank 1 only: rank 0 must still join its collectives
        ids = torch.tensor([0, 1, 0, 1]) if rank == 0 else torch.tensor([2, 1, 2, 0])
        log: list[Any] = []
        with _recording(log):
            out = layer(x, ids) if takes_ids else layer(x)
            (grad,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
            grad.square().sum().backward()  # double backward (a gradient penalty)
        devices = {entry[3] for entry in log}
        logs[name] = [log, devices]
    net = nn.Sequential(nn.Conv2d(4, 4, 1), SyncedBatchNorm2d(4), BatchRenorm2d(4, sync=True))
    batches = [torch.randn(2, 4, 3, 3) for _ in range(4 if rank == 0 else 3)]
    log = []
    with _recording(log), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank 1's short-loader warning
        recompute_bn_stats(net, batches, num_batches=4)
    logs["recompute_bn_stats uneven"] = [log, {entry[3] for entry in log}]
    logs["buffers"] = [[t.clone() for t in net.buffers()], set()]
    return logs


@pytest.mark.ddp
@pytest.mark.slow
def test_every_rank_issues_the_same_collectives_on_the_module_device() -> None:
    ranks = run_ddp(_collectives_worker)
    for name in ranks[0]:
        if name == "buffers":
            continue
        log0, log1 = ranks[0][name][0], ranks[1][name][0]
        assert log0 == log1, f"{name}: ranks disagree\nrank 0: {log0}\nrank 1: {log1}"
        assert ranks[0][name][1] <= {"cpu"}, f"{name}: a collective off the module's device"
    assert len(ranks[0]["SyncedBatchNorm2d"][0]) >= 2  # statistics forward, sums backward
    for a, b in zip(ranks[0]["buffers"][0], ranks[1]["buffers"][0], strict=True):
        assert torch.equal(a, b), "recompute_bn_stats left the ranks with different buffers"
    assert math.isfinite(float(ranks[0]["buffers"][0][2].sum()))
