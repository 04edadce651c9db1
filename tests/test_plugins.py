"""NormSync: apply/revert on a model, and a real Lightning DDP fit on CPU (2 processes)."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from lightning_norms import BatchRenorm2d, DomainBatchNorm2d, NormSync
from lightning_norms._base import BatchNormBase
from lightning_norms._sync_guard import RefuseTorchSyncConversion
from lightning_norms.distributed import SyncedBatchNorm1d, SyncedBatchNorm2d, SyncedBatchNorm3d
from tests._dist import REPO_ROOT, run_script


class _SubclassBN(nn.BatchNorm2d):
    """Not an exact ``nn.BatchNorm2d``: NormSync leaves it alone."""


def _model() -> nn.Module:
    shared = nn.BatchNorm2d(4)
    return nn.Sequential(
        nn.Conv2d(3, 4, 1),
        shared,
        nn.Sequential(shared, nn.BatchNorm1d(4), nn.BatchNorm3d(4)),
        DomainBatchNorm2d(4, num_domains=2),
        BatchRenorm2d(4, sync=True),
        _SubclassBN(4),
    )


def test_apply_converts_exact_batchnorm_and_turns_sync_on():
    model = _model().double().eval()
    bn2d, bn1d = model[1], model[2][1]
    params = {name: p for name, p in model.named_parameters()}
    buffers = {name: b for name, b in model.named_buffers()}
    calls = []
    bn2d.register_forward_pre_hook(lambda module, args: calls.append(type(module).__name__))
    keys = list(model.state_dict())
    plugin = NormSync(process_group=None)

    assert plugin.apply(model) is model
    assert type(model[1]) is SyncedBatchNorm2d and model[2][0] is model[1]  # shared stays shared
    assert type(model[2][1]) is SyncedBatchNorm1d and type(model[2][2]) is SyncedBatchNorm3d
    assert type(model[5]) is _SubclassBN and not hasattr(model[5], "sync")
    assert model[3].sync and model[4].sync
    for name, p in model.named_parameters():
        assert p is params[name]
    for name, b in model.named_buffers():
        assert b is buffers[name]
    assert model[1].weight.dtype == torch.float64 and not model[1].training
    assert list(model.state_dict()) == keys
    model[1](torch.randn(2, 4, 3, 3, dtype=torch.float64))
    assert calls == ["SyncedBatchNorm2d"]  # hooks carried over
    assert plugin.apply(model) is model  # idempotent

    assert plugin.revert(model) is model
    assert type(model[1]) is nn.BatchNorm2d and model[2][0] is model[1]
    assert type(model[2][1]) is nn.BatchNorm1d and type(model[2][2]) is nn.BatchNorm3d
    assert not hasattr(model[1], "sync") and not hasattr(model[1], "_norm_sync_converted")
    assert model[1].weight is params["1.weight"] and model[2][1] is not bn1d
    assert model[3].sync is False and model[4].sync is True  # previous settings restored
    assert list(model.state_dict()) == keys


def test_apply_on_a_single_layer_and_a_user_synced_layer():
    plugin = NormSync()
    bn = nn.BatchNorm2d(3)
    synced = plugin.apply(bn)
    assert type(synced) is SyncedBatchNorm2d and synced.weight is bn.weight
    assert type(plugin.revert(synced)) is nn.BatchNorm2d
    own = SyncedBatchNorm2d(3, sync=False)
    assert plugin.apply(own) is own and own.sync
    assert plugin.revert(own) is own and type(own) is SyncedBatchNorm2d and not own.sync


def test_synced_layer_single_process_is_batchnorm():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    synced = SyncedBatchNorm2d.from_batchnorm(nn.BatchNorm2d(3))
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(synced(x), bn(x), atol=0, rtol=0)
    torch.testing.assert_close(synced.running_var, bn.running_var, atol=0, rtol=0)
    assert "sync=True" in repr(synced)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("training", [True, False])
def test_synced_layer_single_process_matches_batchnorm_with_inplace_ops(momentum, training):
    """Regression: an inplace op after a synced layer's output (``out += identity``, ReLU)."""
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(3, momentum=momentum).train(training)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.running_var.uniform_(0.5, 2)
    synced = SyncedBatchNorm2d.from_batchnorm(copy.deepcopy(bn))
    x = torch.randn(4, 3, 5, 5)
    x_grads = []
    for layer in (bn, synced):
        xi = x.clone().requires_grad_()
        out = layer(xi)
        out += xi
        torch.relu_(out).square().sum().backward()
        x_grads.append(xi.grad)
    torch.testing.assert_close(x_grads[1], x_grads[0], atol=0, rtol=0)
    torch.testing.assert_close(synced.weight.grad, bn.weight.grad, atol=0, rtol=0)
    for key, value in bn.named_buffers():
        assert torch.equal(getattr(synced, key), value), key


@pytest.mark.parametrize("training", [True, False])
def test_synced_layer_empty_batch_leaves_every_buffer(training):
    """Regression: the single-process path (nn.BatchNorm2d's) counted an empty batch."""
    synced = SyncedBatchNorm2d(3, momentum=None).train(training)
    synced(torch.randn(4, 3, 2, 2))
    before = {k: v.clone() for k, v in synced.named_buffers()}
    x = torch.randn(0, 3, 2, 2, requires_grad=True)
    y = synced(x)
    y.sum().backward()
    assert y.shape == x.shape and torch.equal(synced.weight.grad, torch.zeros(3))
    for key, value in synced.named_buffers():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize(
    "bad",
    [torch.randn(1, 3, 1, 1), torch.randn(4, 3, 2, 2).double(), torch.randn(4, 2, 2, 2)],
    ids=["one_value", "dtype", "channels"],
)
def test_synced_layer_rejected_call_leaves_every_buffer(bad):
    """Regression: the single-process path advanced ``num_batches_tracked``, then raised."""
    synced = SyncedBatchNorm2d(3)
    synced(torch.randn(4, 3, 2, 2))
    before = {k: v.clone() for k, v in synced.named_buffers()}
    with pytest.raises((ValueError, RuntimeError)):
        synced(bad)
    for key, value in synced.named_buffers():
        assert torch.equal(value, before[key]), key


def test_import_does_not_import_lightning():
    code = (
        "import sys, lightning_norms, lightning_norms.distributed, torch\n"
        "lightning_norms.DomainBatchNorm2d(2, 2); lightning_norms.convert_norms\n"
        "lightning_norms.domain; lightning_norms.BatchRenorm2d\n"
        "bad = [m for m in sys.modules if m == 'lightning' or m.startswith('lightning.')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


def test_trainer_registers_the_plugin():
    from lightning.pytorch import Trainer

    plugin = NormSync()
    trainer = Trainer(strategy="ddp", accelerator="cpu", devices=2, plugins=[plugin], logger=False)
    assert trainer.strategy._layer_sync is plugin


SCRIPT = """
import json
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning_norms import BatchRenorm2d, DomainBatchNorm2d, NormSync
from lightning_norms._base import BatchNormBase
from lightning_norms._sync_guard import RefuseTorchSyncConversion


class Data(Dataset):
    # odd indices (rank 1 under the DistributedSampler) come from another distribution/domain
    def __len__(self):
        return 32

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(3, 6, 6, generator=g) * (1 + 2 * (i % 2)) + 3 * (i % 2)
        return x, i % 2


class LocalBN(nn.BatchNorm2d):
    pass  # not an exact nn.BatchNorm2d: NormSync leaves it unsynced (the control)


class Net(LightningModule):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.control = LocalBN(4)
        self.dbn = DomainBatchNorm2d(4, num_domains=2)
        self.renorm = BatchRenorm2d(4, warmup_steps=2)
        self.head = nn.Linear(4, 1)
        self.seen = set()

    def training_step(self, batch, batch_idx):
        x, d = batch
        h = self.conv(x)
        h = self.bn(h)
        h += self.control(self.conv(x))  # inplace on a synced layer's output
        h = torch.relu_(self.dbn(h, domain=d))  # and after a synced DomainBatchNorm
        h = nn.functional.relu(self.renorm(h), inplace=True)
        self.seen.add((type(self.bn).__name__, self.dbn.sync, self.renorm.sync))
        return self.head(h.mean((2, 3))).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(Data(), batch_size=4)


seed_everything(0)
model = Net()
trainer = Trainer(
    strategy="ddp", accelerator="cpu", devices=2, max_steps=3, plugins=[NormSync()],
    logger=False, enable_checkpointing=False, enable_progress_bar=False,
    enable_model_summary=False,
)
trainer.fit(model)
rank = trainer.global_rank
torch.save({k: v for k, v in model.state_dict().items() if "running" in k}, f"stats_{rank}.pt")
after = [type(model.bn).__name__, model.dbn.sync, model.renorm.sync]
with open(f"types_{rank}.json", "w") as f:
    json.dump({"seen": sorted(map(list, model.seen)), "after": after}, f)
"""


@pytest.mark.ddp
@pytest.mark.slow
def test_lightning_ddp_fit_keeps_running_stats_identical(tmp_path):
    import json

    run_script(SCRIPT, tmp_path)
    stats = [torch.load(tmp_path / f"stats_{r}.pt") for r in range(2)]
    types = [json.loads((tmp_path / f"types_{r}.json").read_text()) for r in range(2)]
    for t in types:
        assert t["seen"] == [["SyncedBatchNorm2d", True, True]]  # apply() ran before training
        assert t["after"] == ["BatchNorm2d", False, False]  # revert() ran at the end
    synced = [k for k in stats[0] if not k.startswith("control.")]
    assert len(synced) == 6
    for key in synced:
        assert torch.equal(stats[0][key], stats[1][key]), key
    # the unsynced control layer saw different data on the two ranks: the check can fail
    assert not torch.allclose(stats[0]["control.running_mean"], stats[1]["control.running_mean"])
    # each domain lived on one rank only, yet both ranks hold both domains' statistics
    assert not torch.allclose(stats[0]["dbn.running_mean"][0], stats[0]["dbn.running_mean"][1])


# --- issue 21 item 8: Trainer(sync_batchnorm=True) without our callbacks is loud ---------------


class _GuardedRenorm(BatchRenorm2d):
    """``BatchRenorm2d`` with the guard ``_base.BatchNormBase`` is to carry (see below)."""

    qconfig = RefuseTorchSyncConversion()


class _GuardedDomain(DomainBatchNorm2d):
    qconfig = RefuseTorchSyncConversion()


def test_torch_sync_conversion_refuses_a_guarded_layer():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), _GuardedRenorm(4))
    with pytest.raises(ValueError, match=r"_GuardedRenorm.*sync_batchnorm=True.*NormSync\(\)"):
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # torch converts children as it walks: the plain BN before it was converted already
    assert [type(m) for m in model] == [nn.Conv2d, nn.SyncBatchNorm, _GuardedRenorm]


def test_guard_is_an_ordinary_unset_attribute_elsewhere():
    layer = _GuardedDomain(4, num_domains=2)
    assert not hasattr(layer, "qconfig") and getattr(layer, "qconfig", None) is None
    with pytest.raises(AttributeError, match="qconfig"):
        del layer.qconfig
    layer.qconfig = "config"  # what torch.ao.quantization's prepare does
    assert layer.qconfig == "config" and copy.deepcopy(layer).qconfig == "config"
    del layer.qconfig
    assert not hasattr(layer, "qconfig")
    assert "qconfig" not in layer.state_dict() and not hasattr(copy.deepcopy(layer), "qconfig")


def test_trainer_sync_batchnorm_without_our_callbacks_fails_before_training(tmp_path):
    import torch.distributed as dist

    from tests._boring import BoringNormModel, boring_loader, boring_trainer

    body = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), _GuardedDomain(4, num_domains=2), nn.ReLU(),
        _GuardedRenorm(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2),
    )  # fmt: skip
    model = BoringNormModel(body)
    trainer = boring_trainer(tmp_path, strategy="ddp", devices=1, sync_batchnorm=True)
    try:
        with pytest.raises(ValueError, match=r"_GuardedDomain.*NormSync"):
            trainer.fit(model, boring_loader())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert model.train_steps == 0
    assert type(model.body[1]) is _GuardedDomain and type(model.body[3]) is _GuardedRenorm


@pytest.mark.skipif(
    not isinstance(BatchNormBase.__dict__.get("qconfig"), RefuseTorchSyncConversion),
    reason="the guard is not yet a class attribute of lightning_norms._base.BatchNormBase",
)
@pytest.mark.parametrize("layer", [DomainBatchNorm2d(4, 2), BatchRenorm2d(4), SyncedBatchNorm2d(4)])
def test_every_package_layer_refuses_torch_sync_conversion(layer):
    with pytest.raises(ValueError, match="NormSync"):
        nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(layer))
