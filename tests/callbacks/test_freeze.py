"""FreezeBatchNorm: frozen statistics stay bit-identical through Lightning's train/eval switches.

References: the buffers as they were before ``fit`` (``torch.equal``), and a copy of the initial
model run with its BN layers in eval mode (what a frozen layer must compute in training).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BaseFinetuning, Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, TensorDataset

from lightning_norms import BatchRenorm2d, DomainBatchNorm2d, domain
from lightning_norms.callbacks import FreezeBatchNorm
from tests._boring import boring_trainer

CLASSES = 4
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _backbone() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )  # fmt: skip


class Net(LightningModule):
    """Records, per training step, every BN layer's mode and affine ``requires_grad``."""

    def __init__(self, backbone: nn.Module, head: nn.Module, fail_at: int | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.fail_at = fail_at
        self.modes: list[list[bool]] = []
        self.affine_grad: list[list[bool]] = []
        self.snapshots: list[dict[str, Tensor]] = []
        self.losses: list[Tensor] = []

    def bns(self) -> list[_BatchNorm]:
        return [m for m in self.modules() if isinstance(m, _BatchNorm)]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        if self.global_step == self.fail_at:
            raise RuntimeError("planted failure")
        self.modes.append([m.training for m in self.bns()])
        self.affine_grad.append([m.weight.requires_grad for m in self.bns()])
        loss = F.cross_entropy(self(batch[0]), batch[1])
        self.losses.append(loss.detach())
        return loss

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        self(batch[0])

    def on_train_epoch_end(self) -> None:
        self.snapshots.append({k: v.detach().clone() for k, v in self.state_dict().items()})

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def _loaders(size: int = 16, n: int = 64) -> tuple[DataLoader, DataLoader]:
    gen = torch.Generator().manual_seed(0)
    x = 2.0 * torch.randn(n, 3, size, size, generator=gen) + 1.0  # far from the initial (0, 1)
    y = torch.arange(n) % CLASSES
    train = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=gen)
    return train, DataLoader(TensorDataset(x[:32], y[:32]), batch_size=16)


def _fit(
    model: Net, callbacks: list[Callback], tmp_path: Path, max_epochs: int = 2, **kw: Any
) -> Trainer:
    ckpt_path = kw.pop("ckpt_path", None)
    trainer = boring_trainer(tmp_path, **{"max_epochs": max_epochs, "callbacks": callbacks, **kw})
    trainer.fit(model, *_loaders(), ckpt_path=ckpt_path)
    return trainer


def _state(module: nn.Module, names: tuple[str, ...]) -> dict[str, Tensor]:
    return {
        f"{layer}.{n}": getattr(m, n).detach().clone()
        for layer, m in module.named_modules()
        if isinstance(m, _BatchNorm)
        for n in names
    }


def _assert_equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _assert_all_differ(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert not torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"modules": 3}, "modules"),
        ({"modules": []}, "modules"),
        ({"modules": ["backbone", ""]}, "modules"),
        ({"modules": ["backbone", 1]}, "modules"),
        ({"train_affine": "no"}, "train_affine"),
        ({"until_epoch": 0}, "until_epoch"),
        ({"until_epoch": True}, "until_epoch"),
        ({"until_epoch": 1.5}, "until_epoch"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(MisconfigurationException, match=f"`{name}`"):
        FreezeBatchNorm(**kwargs)


def test_patterns_choose_layers_by_name_or_container(tmp_path: Path) -> None:
    import torchvision

    resnet = torchvision.models.resnet18(num_classes=CLASSES)
    freeze = FreezeBatchNorm(modules=["backbone.layer1", "*.layer4.*.bn2", "fc*"])
    model = Net(resnet, nn.Identity())
    trainer = boring_trainer(tmp_path)
    with pytest.warns(UserWarning, match=r"pattern 'fc\*' in `modules` matches no BatchNorm"):
        freeze.on_fit_start(trainer, model)
    names = [name for name, _ in freeze._layers]
    assert names == [
        "backbone.layer1.0.bn1", "backbone.layer1.0.bn2", "backbone.layer1.1.bn1",
        "backbone.layer1.1.bn2", "backbone.layer4.0.bn2", "backbone.layer4.1.bn2",
    ]  # fmt: skip
    everything = FreezeBatchNorm()
    everything.on_fit_start(trainer, model)
    assert len(everything._layers) == 20
    with pytest.warns(UserWarning, match="no BatchNorm layer with running statistics"):
        everything.on_fit_start(trainer, Net(nn.Flatten(), nn.LazyLinear(CLASSES)))


@pytest.mark.parametrize("freeze_first", [True, False])
def test_precise_bn_never_recomputes_frozen_layers(tmp_path: Path, freeze_first: bool) -> None:
    from lightning_norms.callbacks import PreciseBN

    torch.manual_seed(0)
    model = Net(_backbone(), nn.Linear(8, CLASSES))
    frozen = {k: v for k, v in _state(model, BUFFERS).items() if k.startswith("backbone.1.")}
    trained = _state(model, BUFFERS)["backbone.4.running_var"]
    precise = PreciseBN(num_batches=2)
    callbacks: list[Callback] = [FreezeBatchNorm(modules="backbone.1"), precise]
    _fit(model, callbacks if freeze_first else callbacks[::-1], tmp_path)
    assert [entry["when"] for entry in precise.history] == ["epoch_end", "epoch_end"]
    _assert_equal({k: v for k, v in _state(model, BUFFERS).items() if k in frozen}, frozen)
    assert precise.last_report is not None
    assert [layer.name for layer in precise.last_report.layers] == ["backbone.4"]
    assert not torch.equal(model.backbone[4].running_var, trained)


def test_precise_bn_with_every_layer_frozen_changes_nothing(tmp_path: Path) -> None:
    from lightning_norms.callbacks import PreciseBN

    torch.manual_seed(0)
    model = Net(_backbone(), nn.Linear(8, CLASSES))
    buffers = _state(model, BUFFERS)
    precise = PreciseBN(num_batches=2)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", ".*leave no BN layer")
        _fit(model, [precise, FreezeBatchNorm()], tmp_path, max_epochs=1)
    _assert_equal(_state(model, BUFFERS), buffers)
    assert model.modes == [[False, False]] * 4 and precise.history == []


# ------------------------------------------------------------------------- freezing in fit
def test_resnet18_stats_bit_identical_affine_trains(tmp_path: Path) -> None:
    import torchvision

    torch.manual_seed(0)
    model = Net(torchvision.models.resnet18(num_classes=CLASSES), nn.Identity())
    buffers, affine = _state(model, BUFFERS), _state(model, ("weight", "bias"))
    reference = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "modules in eval mode" warning either
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        _fit(model, [FreezeBatchNorm()], tmp_path)
    assert len(model.snapshots) == 2 and len(model.modes) == 8  # 2 epochs x 4 steps
    for snapshot in model.snapshots:  # after each epoch, validation included
        _assert_equal({k: snapshot[k] for k in buffers}, buffers)
    _assert_equal(_state(model, BUFFERS), buffers)
    assert model.modes == [[False] * 20] * 8  # eval in every training step
    _assert_all_differ(_state(model, ("weight", "bias")), affine)  # train_affine=True
    assert all(m.training for m in model.bns())  # released at fit end: the mode they had
    # the first training step computed what the initial model computes with BN in eval mode
    x, y = next(iter(_loaders()[0]))
    reference.train()
    for m in reference.bns():
        m.eval()
    torch.testing.assert_close(model.losses[0], F.cross_entropy(reference(x), y))


class TrainsAfterValidation(Net):
    """Puts the whole model back into train mode after validation (Lightning's old default)."""

    def on_validation_model_train(self) -> None:
        self.train()


def test_mid_epoch_validation_that_calls_train(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TrainsAfterValidation(_backbone(), nn.Linear(8, CLASSES))
    buffers = _state(model, BUFFERS)
    trainer = boring_trainer(
        tmp_path, val_check_interval=2, num_sanity_val_steps=0, callbacks=[FreezeBatchNorm()]
    )
    trainer.fit(model, *_loaders())
    assert model.modes == [[False, False]] * 4  # steps 3 and 4 follow a validation
    _assert_equal(_state(model, BUFFERS), buffers)


def test_train_affine_false_and_until_epoch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Net(_backbone(), nn.Linear(8, CLASSES))
    buffers, affine = _state(model, BUFFERS), _state(model, ("weight", "bias"))
    conv = model.backbone[0].weight.detach().clone()
    _fit(model, [FreezeBatchNorm(train_affine=False, until_epoch=1)], tmp_path, max_epochs=2)
    first, second = model.snapshots
    # epoch 0: statistics and affine fixed, the convolutions train
    _assert_equal({k: first[k] for k in buffers}, buffers)
    _assert_equal({k: first[k] for k in affine}, affine)
    assert not torch.equal(first["backbone.0.weight"], conv)
    assert model.modes[:4] == [[False, False]] * 4
    assert model.affine_grad[:4] == [[False, False]] * 4
    # epoch 1: released, BN trains normally: 4 more batches tracked, affine moves
    assert model.modes[4:] == [[True, True]] * 4
    assert model.affine_grad[4:] == [[True, True]] * 4
    tracked = {k: v for k, v in _state(model, ("num_batches_tracked",)).items()}
    assert {v.item() for v in tracked.values()} == {4}
    _assert_all_differ({k: second[k] for k in affine}, affine)
    _assert_all_differ({k: second[k] for k in buffers if "running" in k},
                       {k: v for k, v in buffers.items() if "running" in k})  # fmt: skip


def test_state_restored_when_fit_fails(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Net(_backbone(), nn.Linear(8, CLASSES), fail_at=2)
    buffers = _state(model, BUFFERS)
    with pytest.raises(RuntimeError, match="planted failure"):
        _fit(model, [FreezeBatchNorm(train_affine=False)], tmp_path)
    assert model.modes == [[False, False]] * 2
    assert all(m.training for m in model.bns())
    assert all(p.requires_grad for m in model.bns() for p in m.parameters())
    _assert_equal(_state(model, BUFFERS), buffers)


class PackageLayers(Net):
    """DomainBatchNorm2d (per-sample domain ids) and BatchRenorm2d (step counter) layers."""

    def __init__(self) -> None:
        backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3, bias=False), DomainBatchNorm2d(8, num_domains=2), nn.ReLU(),
            nn.Conv2d(8, 8, 3, bias=False), BatchRenorm2d(8, warmup_steps=2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        super().__init__(backbone, nn.Linear(8, CLASSES))

    def forward(self, x: Tensor) -> Tensor:
        with domain(self.backbone, torch.arange(x.shape[0]) % 2):
            return super().forward(x)


def test_domain_and_renorm_layers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = PackageLayers()
    with torch.no_grad():  # trained-looking statistics: distinct per domain
        model.backbone[1].running_mean.copy_(torch.randn(2, 8))
        model.backbone[4].num_batches_tracked.fill_(1)  # mid warm-up
    buffers, affine = _state(model, BUFFERS), _state(model, ("weight", "bias"))
    assert buffers["backbone.1.running_mean"].shape == (2, 8)
    reference = copy.deepcopy(model).eval()
    _fit(model, [FreezeBatchNorm()], tmp_path)
    _assert_equal(_state(model, BUFFERS), buffers)
    _assert_all_differ(_state(model, ("weight", "bias")), affine)
    x, y = next(iter(_loaders()[0]))
    torch.testing.assert_close(model.losses[0], F.cross_entropy(reference(x), y))


def test_sync_batchnorm_is_refused(tmp_path: Path) -> None:
    model = Net(_backbone(), nn.Linear(8, CLASSES))
    trainer = boring_trainer(tmp_path, sync_batchnorm=True, callbacks=[FreezeBatchNorm()])
    with pytest.raises(ValueError, match=r"FreezeBatchNorm.*NormSync"):
        trainer.fit(model, *_loaders())
    assert model.modes == []


class UnfreezeBackboneAt(BaseFinetuning):
    """Backbone frozen (BN affine and statistics too: train_bn=False), unfrozen at an epoch."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def freeze_before_training(self, pl_module: LightningModule) -> None:
        self.freeze(pl_module.backbone, train_bn=False)

    def finetune_function(self, pl_module: LightningModule, epoch: int, optimizer: Any) -> None:
        if epoch == self.epoch:
            self.unfreeze_and_add_param_group(pl_module.backbone, optimizer, train_bn=True)


@pytest.mark.parametrize("freeze_first", [True, False])
def test_with_base_finetuning(tmp_path: Path, freeze_first: bool) -> None:
    torch.manual_seed(0)
    model = Net(_backbone(), nn.Linear(8, CLASSES))
    buffers, affine = _state(model, BUFFERS), _state(model, ("weight", "bias"))
    conv = model.backbone[0].weight.detach().clone()
    callbacks: list[Callback] = [FreezeBatchNorm(modules="backbone", train_affine=False),
                                 UnfreezeBackboneAt(1)]  # fmt: skip
    trainer = _fit(model, callbacks if freeze_first else callbacks[::-1], tmp_path)
    first, second = model.snapshots
    assert torch.equal(first["backbone.0.weight"], conv)  # BaseFinetuning froze the backbone
    assert not torch.equal(second["backbone.0.weight"], conv)  # and unfroze it at epoch 1
    _assert_equal(_state(model, BUFFERS), buffers)  # statistics fixed through both epochs
    _assert_equal(_state(model, ("weight", "bias")), affine)  # held, though unfrozen at 1
    assert model.modes == [[False, False]] * 8
    assert model.affine_grad == [[False, False]] * 8
    # BaseFinetuning added the BN affine to the optimizer; on release it is trainable again
    group = trainer.optimizers[0].param_groups[-1]["params"]
    assert any(p is model.backbone[1].weight for p in group)
    assert all(p.requires_grad for m in model.bns() for p in m.parameters())
    assert all(m.training and m.track_running_stats for m in model.bns())


def test_resume_mid_epoch_stays_frozen(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.manual_seed(0)
    model = Net(_backbone(), nn.Linear(8, CLASSES))
    buffers = _state(model, BUFFERS)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    _fit(model, [FreezeBatchNorm(until_epoch=2), ckpt], tmp_path, 1, enable_checkpointing=True)
    mid = tmp_path / "epoch=0-step=2.ckpt"
    assert mid.exists()
    resumed = Net(_backbone(), nn.Linear(8, CLASSES))
    _fit(resumed, [FreezeBatchNorm(until_epoch=2)], tmp_path, 3, ckpt_path=mid)
    # 2 steps left of epoch 0 and epoch 1 frozen, epoch 2 released
    assert resumed.modes == [[False, False]] * 6 + [[True, True]] * 4
    first, second, _ = resumed.snapshots
    _assert_equal({k: first[k] for k in buffers}, buffers)
    _assert_equal({k: second[k] for k in buffers}, buffers)
    assert {v.item() for v in _state(resumed, ("num_batches_tracked",)).values()} == {4}


DDP_SCRIPT = """
import json, warnings
import torch
from lightning_norms import NormSync
from lightning_norms.callbacks import FreezeBatchNorm
from tests._boring import boring_trainer
from tests.callbacks.test_freeze import BUFFERS, CLASSES, Net, _backbone, _loaders, _state

torch.manual_seed(0)
warnings.simplefilter("ignore")
model = Net(_backbone(), torch.nn.Linear(8, CLASSES))
before = _state(model, BUFFERS)
types = []
trainer = boring_trainer(".", strategy="ddp", devices=2, max_epochs=2, plugins=[NormSync()],
                         callbacks=[FreezeBatchNorm(train_affine=False)])
trainer.fit(model, *_loaders())
after = _state(model, BUFFERS)
result = {
    "same": all(torch.equal(before[k], after[k]) for k in before),
    "modes": model.modes,
    "after": [[type(m).__name__, m.training, m.weight.requires_grad] for m in model.bns()],
}
with open(f"freeze_{trainer.global_rank}.json", "w") as fh:
    json.dump(result, fh)
"""


@pytest.mark.ddp
def test_ddp_with_normsync(tmp_path: Path) -> None:
    import json

    from tests._dist import run_script

    run_script(DDP_SCRIPT, tmp_path)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"freeze_{rank}.json").read_text())
        assert result["same"]  # bit-identical statistics on every rank
        assert result["modes"] == [[False, False]] * 4  # 64 samples / 2 ranks / 16: 2 steps
        # released before NormSync reverts its layers: the model gets back trainable BN layers
        assert result["after"] == [["BatchNorm2d", True, True]] * 2


def test_train_affine_false_with_until_epoch_refused_under_ddp(tmp_path: Path) -> None:
    model = Net(_backbone(), nn.Linear(8, CLASSES))
    trainer = boring_trainer(tmp_path, strategy="ddp", devices=2)
    freeze = FreezeBatchNorm(train_affine=False, until_epoch=1)
    with pytest.raises(ValueError, match=r"`train_affine=False` with `until_epoch`.*DDP"):
        freeze.setup(trainer, model, "fit")
    assert all(p.requires_grad for p in model.parameters())
    # frozen for the whole fit, the affine parameters are held before DDP wraps the model
    FreezeBatchNorm(train_affine=False).setup(trainer, model, "fit")
    assert [p.requires_grad for m in model.bns() for p in m.parameters()] == [False] * 4
    FreezeBatchNorm(train_affine=False, until_epoch=1).setup(trainer, model, "validate")


class FreezeBackbone(BaseFinetuning):
    """Freezes the backbone, BN affine included (``train_bn=False``), for the whole fit."""

    def freeze_before_training(self, pl_module: LightningModule) -> None:
        self.freeze(pl_module.backbone, train_bn=False)

    def finetune_function(self, pl_module: LightningModule, epoch: int, optimizer: Any) -> None:
        pass


def _flags(model: nn.Module) -> dict[str, bool]:
    return {name: p.requires_grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("freeze_first", [True, False])
@pytest.mark.parametrize("tuner", [FreezeBackbone, lambda: UnfreezeBackboneAt(1)])
def test_requires_grad_at_the_end_as_base_finetuning_alone_leaves_it(
    tmp_path: Path, freeze_first: bool, tuner: Any
) -> None:
    torch.manual_seed(0)
    alone = Net(_backbone(), nn.Linear(8, CLASSES))
    model = copy.deepcopy(alone)
    _fit(alone, [tuner()], tmp_path / "alone")
    callbacks: list[Callback] = [FreezeBatchNorm(modules="backbone", train_affine=False), tuner()]
    _fit(model, callbacks if freeze_first else callbacks[::-1], tmp_path / "both")
    assert _flags(model) == _flags(alone)
    assert model.affine_grad == [[False, False]] * 8  # held in every training step
