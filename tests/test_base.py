"""The one BN base: every variant with its own feature off is ``nn.BatchNorm*d``.

Reference: torch's own ``nn.BatchNorm1d/2d/3d`` run side by side over several training steps
(outputs, input and parameter gradients, running statistics, ``num_batches_tracked``), then in
eval; ``momentum=None`` (cumulative average) and ``track_running_stats=False`` included.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from lightning_norms import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    DomainBatchNorm1d,
    DomainBatchNorm2d,
    DomainBatchNorm3d,
)
from lightning_norms._base import INPUT_DIMS, BatchNormBase
from lightning_norms.distributed import SyncedBatchNorm1d, SyncedBatchNorm2d, SyncedBatchNorm3d
from tests._layers import randomise_alike, uniform

BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
AFFINE = {"weight": uniform(0.5, 1.5), "bias": uniform(-0.5, 0.5)}
SHAPES = {1: (6, 4, 5), 2: (6, 4, 3, 3), 3: (4, 4, 2, 3, 3)}

# name -> (builder of the variant with its feature off, how its forward is called)
Call = Callable[[nn.Module, Tensor], Tensor]
VARIANTS: dict[str, tuple[dict[int, Callable[..., nn.Module]], Call]] = {
    "domain-int": (
        {
            1: lambda **kw: DomainBatchNorm1d(4, 1, **kw),
            2: lambda **kw: DomainBatchNorm2d(4, 1, **kw),
            3: lambda **kw: DomainBatchNorm3d(4, 1, **kw),
        },
        lambda m, x: m(x, domain=0),
    ),
    "domain-ids": (
        {
            1: lambda **kw: DomainBatchNorm1d(4, 2, **kw),
            2: lambda **kw: DomainBatchNorm2d(4, 2, **kw),
            3: lambda **kw: DomainBatchNorm3d(4, 2, **kw),
        },
        lambda m, x: m(x, domain=torch.ones(x.shape[0], dtype=torch.long)),
    ),
    "renorm": (
        {
            1: lambda **kw: BatchRenorm1d(4, r_max=1.0, d_max=0.0, **kw),
            2: lambda **kw: BatchRenorm2d(4, r_max=1.0, d_max=0.0, **kw),
            3: lambda **kw: BatchRenorm3d(4, r_max=1.0, d_max=0.0, **kw),
        },
        lambda m, x: m(x),
    ),
    "synced": (
        {
            1: lambda **kw: SyncedBatchNorm1d(4, **kw),
            2: lambda **kw: SyncedBatchNorm2d(4, **kw),
            3: lambda **kw: SyncedBatchNorm3d(4, **kw),
        },
        lambda m, x: m(x),
    ),
}


def _row(t: Tensor | None, kind: str) -> Tensor | None:
    """The BN-shaped state of a variant: the last domain's row of a ``[D, C]`` tensor."""
    if t is None or not kind.startswith("domain"):
        return t
    return t[-1]


def _assert_state(bn: nn.Module, variant: nn.Module, kind: str) -> None:
    for name in ("running_mean", "running_var"):
        ref, got = getattr(bn, name), _row(getattr(variant, name), kind)
        if ref is None:
            assert got is None
        else:
            torch.testing.assert_close(got, ref)
    if bn.num_batches_tracked is not None:
        tracked = variant.num_batches_tracked.reshape(-1)
        assert int(tracked[-1]) == int(bn.num_batches_tracked)


@pytest.mark.parametrize("kind", list(VARIANTS))
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize(
    "kw",
    [{}, {"momentum": None}, {"track_running_stats": False}, {"affine": False, "momentum": 0.3}],
    ids=["default", "cumulative", "untracked", "no-affine"],
)
def test_feature_off_equals_batchnorm(kind: str, dims: int, kw: dict) -> None:
    torch.manual_seed(dims)
    builders, call = VARIANTS[kind]
    variant, bn = builders[dims](**kw), BN[dims](4, **kw)
    if bn.weight is not None:  # the same random affine in both (every domain row)
        randomise_alike(bn, variant, draws=AFFINE, seed=None)
    for step in range(4):
        x = (torch.randn(SHAPES[dims]) * (step + 1) + step).requires_grad_(True)
        x_ref = x.detach().clone().requires_grad_(True)
        grad = torch.randn(SHAPES[dims])
        out, ref = call(variant, x), bn(x_ref)
        torch.testing.assert_close(out, ref)
        out.backward(grad)
        ref.backward(grad)
        torch.testing.assert_close(x.grad, x_ref.grad)
        if bn.weight is not None:
            torch.testing.assert_close(_row(variant.weight.grad, kind), bn.weight.grad)
            torch.testing.assert_close(_row(variant.bias.grad, kind), bn.bias.grad)
            variant.zero_grad()
            bn.zero_grad()
        _assert_state(bn, variant, kind)
    x = torch.randn(SHAPES[dims]) * 3 + 1
    torch.testing.assert_close(call(variant.eval(), x), bn.eval()(x))


def test_every_variant_has_the_base() -> None:
    for builders, _ in VARIANTS.values():
        for dims, build in builders.items():
            layer = build()
            assert isinstance(layer, BatchNormBase) and layer._dims == dims
            assert isinstance(layer, torch.nn.modules.batchnorm._BatchNorm)


@pytest.mark.parametrize("kind", list(VARIANTS))
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_bad_dims_raise_naming_the_class(kind: str, dims: int) -> None:
    builders, call = VARIANTS[kind]
    layer = builders[dims]()
    ranks, names = INPUT_DIMS[dims]
    bad = torch.randn(*([2] * (max(ranks) + 1)))
    name = type(layer).__name__
    expected = re.escape(f"{name}: expected {names} input, got shape {tuple(bad.shape)}")
    with pytest.raises(ValueError, match=f"^{expected}$"):
        call(layer, bad)
    wrong_channels = torch.randn(SHAPES[dims][0], 3, *SHAPES[dims][2:])
    with pytest.raises(ValueError, match=rf"^{name}\(4\): expected 4 channels in dim 1"):
        call(layer, wrong_channels)
    assert int(layer.num_batches_tracked.sum()) == 0  # a rejected call changes nothing


def test_extra_repr_fields() -> None:
    assert repr(SyncedBatchNorm2d(3, sync=False)) == repr(nn.BatchNorm2d(3)).replace(
        "BatchNorm2d", "SyncedBatchNorm2d"
    )
    assert repr(SyncedBatchNorm2d(3)).endswith("track_running_stats=True, sync=True)")
    torch_fields = nn.BatchNorm2d(3, momentum=None).extra_repr()
    layer = DomainBatchNorm2d(3, 2, momentum=None, shared_affine=True, process_group=object())
    assert layer.extra_repr() == (
        f"{torch_fields}, num_domains=2, shared_affine=True, sync=True, process_group=..."
    )
    torch_fields = nn.BatchNorm1d(5).extra_repr()
    assert BatchRenorm1d(5, r_max=2, warmup_steps=0).extra_repr() == (
        f"{torch_fields}, r_max=2.0, d_max=5.0, warmup_steps=0"
    )


def test_sync_only_in_training_and_with_a_group() -> None:
    layer = BatchRenorm2d(3, sync=True)
    state = layer._norm_state()
    assert state.sync is True and state.training is True
    layer.eval()
    state = layer._norm_state()
    assert state.sync is False and state.training is False
    assert not layer.sync_active()  # no process group initialised in this process
