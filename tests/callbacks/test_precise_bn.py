"""PreciseBN callback: timing in the loop, effect on validation, resume, progress, DDP."""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import (
    ModelCheckpoint,
    StochasticWeightAveraging,
    TQDMProgressBar,
)
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, TensorDataset

from lightning_norms.callbacks import PreciseBN
from tests._boring import BoringNormModel, boring_trainer
from tests._dist import run_script

FEATURES = 8


def make_data(n: int, seed: int) -> TensorDataset:
    """Features far from zero mean / unit variance, so a lagging EMA normalises them badly."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g) * 3.0 + 20.0
    w = torch.linspace(-1.0, 1.0, FEATURES)
    y = ((x - 20.0) @ w > 0).long()
    return TensorDataset(x, y)


class Net(BoringNormModel):
    """``BoringNormModel`` on an MLP whose one BN layer sits behind a single Linear (its exact
    input statistics are one matmul away); validation also logs accuracy, per loader."""

    def __init__(self, lr: float = 0.5, bn_momentum: float = 0.01) -> None:
        body = nn.Sequential(
            nn.Linear(FEATURES, 16),
            nn.BatchNorm1d(16, momentum=bn_momentum),
            nn.ReLU(),
            nn.Linear(16, 2),
        )
        super().__init__(body=body, lr=lr)

    def validation_step(
        self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())


class Recorder(Callback):
    """Records validation starts; PreciseBN runs are recorded by the forward function below."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self.events.append(("validate", trainer.current_epoch))


def recording_forward(recorder: Recorder) -> Any:
    def forward(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        event = ("precise_bn", model.trainer.current_epoch)
        if not recorder.events or recorder.events[-1] != event:
            recorder.events.append(event)
        return model(batch[0])

    return forward


def loaders(train_n: int = 128, val_n: int = 128, batch_size: int = 16) -> dict[str, DataLoader]:
    return {
        "train_dataloaders": DataLoader(make_data(train_n, 0), batch_size=batch_size),
        "val_dataloaders": DataLoader(make_data(val_n, 1), batch_size=64),
    }


def trainer_kwargs(tmp_path: Path, **kwargs: Any) -> dict[str, Any]:
    """``boring_trainer``'s arguments: no sanity validation, deterministic, ``kwargs`` on top."""
    defaults: dict[str, Any] = {"root": tmp_path, "num_sanity_val_steps": 0, "deterministic": True}
    return {**defaults, **kwargs}


def exact_bn_input_stats(model: Net, data: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased variance of the first BN layer's inputs (only a Linear upstream)."""
    with torch.no_grad():
        acts = model.body[0](data).double()
    return acts.mean(0), acts.var(0)


def test_runs_before_each_due_validation_and_at_fit_end(tmp_path: Path) -> None:
    recorder = Recorder()
    callback = PreciseBN(num_batches=4, every_n_epochs=2, forward_fn=recording_forward(recorder))
    model = Net()
    trainer = boring_trainer(
        **trainer_kwargs(tmp_path, max_epochs=3, callbacks=[recorder, callback])
    )
    trainer.fit(model, **loaders())
    assert recorder.events == [
        ("validate", 0),
        ("precise_bn", 1),
        ("validate", 1),
        ("validate", 2),
        ("precise_bn", 3),  # fit end (epoch counter already advanced): epoch 2 trained since
    ]
    assert [entry["epoch"] for entry in callback.history] == [1, 3]
    assert [entry["when"] for entry in callback.history] == ["epoch_end", "fit_end"]
    assert all(entry["num_batches"] == 4 for entry in callback.history)
    mean, var = exact_bn_input_stats(model, make_data(128, 0).tensors[0][:64])
    torch.testing.assert_close(model.body[1].running_mean.double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.body[1].running_var.double(), var, rtol=1e-5, atol=1e-5)


def test_no_second_run_at_fit_end_when_nothing_changed(tmp_path: Path) -> None:
    recorder = Recorder()
    callback = PreciseBN(num_batches=2, forward_fn=recording_forward(recorder))
    trainer = boring_trainer(
        **trainer_kwargs(
            tmp_path, max_epochs=2, limit_val_batches=0, callbacks=[recorder, callback]
        )
    )
    trainer.fit(Net(), **loaders())
    assert recorder.events == [("precise_bn", 0), ("precise_bn", 1)]


def fit_val_metrics(tmp_path: Path, callbacks: list[Callback]) -> dict[str, float]:
    seed_everything(0)
    model = Net(lr=0.5, bn_momentum=0.01)
    trainer = boring_trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=callbacks))
    trainer.fit(model, **loaders())
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_improves_validation_when_the_ema_lags(tmp_path: Path) -> None:
    plain = fit_val_metrics(tmp_path, [])
    precise = fit_val_metrics(tmp_path, [PreciseBN(num_batches=8)])
    assert precise["val_loss"] < 0.5 * plain["val_loss"]
    assert precise["val_acc"] > plain["val_acc"] + 0.1
    assert precise["precise_bn/mean_shift"] > 0.5  # the EMA was far off
    assert "precise_bn/var_shift" in precise


def test_fresh_iterator_leaves_training_untouched(tmp_path: Path) -> None:
    model = Net()
    callback = PreciseBN(num_batches=3)
    trainer = boring_trainer(**trainer_kwargs(tmp_path, max_epochs=2, callbacks=[callback]))
    trainer.fit(model, **loaders(train_n=128, batch_size=16))
    assert model.train_steps == 2 * 8
    assert [entry["num_batches"] for entry in callback.history] == [3.0, 3.0]


def test_precise_bn_forward_and_forward_fn_precedence(tmp_path: Path) -> None:
    class Routed(Net):
        def __init__(self) -> None:
            super().__init__()
            self.routed = 0

        def precise_bn_forward(self, batch: tuple[Tensor, Tensor]) -> Tensor:
            self.routed += 1
            return self(batch[0])

    model = Routed()
    trainer = boring_trainer(
        **trainer_kwargs(tmp_path, max_epochs=1, callbacks=[PreciseBN(num_batches=5)])
    )
    trainer.fit(model, **loaders())
    assert model.routed == 5
    calls: list[int] = []
    model = Routed()
    callback = PreciseBN(num_batches=2, forward_fn=lambda m, b: calls.append(1) or m(b[0]))
    boring_trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[callback])).fit(
        model, **loaders()
    )
    assert model.routed == 0 and len(calls) == 2


def test_val_loaders_are_interleaved(tmp_path: Path) -> None:
    data_a, data_b = make_data(64, 3), make_data(64, 4)
    data_b.tensors[0].mul_(-1.0)
    model = Net()
    callback = PreciseBN(num_batches=4, dataloader="val")
    trainer = boring_trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[callback]))
    val = [DataLoader(data_a, batch_size=32), DataLoader(data_b, batch_size=32)]
    trainer.fit(model, DataLoader(make_data(64, 0), batch_size=16), val)
    mean, var = exact_bn_input_stats(model, torch.cat([data_a.tensors[0], data_b.tensors[0]]))
    torch.testing.assert_close(model.body[1].running_mean.double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.body[1].running_var.double(), var, rtol=1e-5, atol=1e-5)


def test_explicit_dataloader_and_short_loader_warning(tmp_path: Path) -> None:
    data = make_data(48, 5)
    callback = PreciseBN(num_batches=10, dataloader=DataLoader(data, batch_size=16))
    model = Net()
    trainer = boring_trainer(
        **trainer_kwargs(tmp_path, max_epochs=2, limit_val_batches=0, callbacks=[callback])
    )
    with pytest.warns(UserWarning, match=r"has 3 batches per process.*num_batches=10") as record:
        trainer.fit(model, **loaders())
    assert len([w for w in record if "PreciseBN" in str(w.message)]) == 1  # once, not per epoch
    assert [entry["num_batches"] for entry in callback.history] == [3.0, 3.0]
    mean, var = exact_bn_input_stats(model, data.tensors[0])
    torch.testing.assert_close(model.body[1].running_var.double(), var, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.body[1].running_mean.double(), mean, rtol=1e-5, atol=1e-5)


def test_checkpoint_resume_keeps_state(tmp_path: Path) -> None:
    def checkpoint() -> ModelCheckpoint:
        return ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=-1)

    first = PreciseBN(num_batches=2)
    kwargs = trainer_kwargs(tmp_path, max_epochs=2, enable_checkpointing=True)
    boring_trainer(**{**kwargs, "callbacks": [first, checkpoint()]}).fit(Net(), **loaders())
    assert len(first.history) == 2
    resumed = PreciseBN(num_batches=2)
    trainer = boring_trainer(**{**kwargs, "max_epochs": 3, "callbacks": [resumed, checkpoint()]})
    trainer.fit(Net(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), **loaders())
    assert resumed.history[:2] == first.history
    assert [entry["epoch"] for entry in resumed.history] == [0, 1, 2]
    state = resumed.state_dict()
    clone = PreciseBN()
    clone.load_state_dict(copy.deepcopy(state))
    assert clone.state_dict() == state and state["last_epoch"] == 2 and not state["dirty"]


def test_progress_shown_in_tqdm_bar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kwargs = trainer_kwargs(tmp_path, max_epochs=1, enable_progress_bar=True)
    bar = TQDMProgressBar(refresh_rate=1)
    boring_trainer(**{**kwargs, "callbacks": [bar, PreciseBN(num_batches=3)]}).fit(
        Net(), **loaders()
    )
    out = capsys.readouterr().out
    assert "PreciseBN: " in out, out


def test_progress_shown_in_rich_bar(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import RichProgressBar

    seen: list[tuple[str, float]] = []

    class Spy(RichProgressBar):
        def refresh(self, hard: bool = False) -> None:
            if self.progress is not None:
                seen.extend((t.description, t.completed) for t in self.progress.tasks)
            super().refresh(hard)

    kwargs = trainer_kwargs(tmp_path, max_epochs=1, enable_progress_bar=True)
    boring_trainer(**{**kwargs, "callbacks": [Spy(), PreciseBN(num_batches=3)]}).fit(
        Net(), **loaders()
    )
    assert ("PreciseBN", 3) in seen


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_batches": 0}, "`num_batches`"),
        ({"num_batches": 2.0}, "`num_batches`"),
        ({"every_n_epochs": 0}, "`every_n_epochs`"),
        ({"every_n_epochs": True}, "`every_n_epochs`"),
        ({"dataloader": "test"}, "`dataloader`"),
        ({"dataloader": 3}, "`dataloader`"),
        ({"forward_fn": "fwd"}, "`forward_fn`"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(MisconfigurationException, match=name):
        PreciseBN(**kwargs)


def test_module_without_forward_is_refused(tmp_path: Path) -> None:
    class NoForward(Net):
        forward = LightningModule.forward

    trainer = boring_trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[PreciseBN()]))
    with pytest.raises(MisconfigurationException, match="precise_bn_forward"):
        trainer.fit(NoForward(), **loaders())


DDP_SCRIPT = """
import torch
from lightning.pytorch import seed_everything
from torch.utils.data import DataLoader

from lightning_norms.callbacks import PreciseBN
from tests._boring import boring_trainer
from tests.callbacks.test_precise_bn import Net, make_data

seed_everything(0)
model = Net()
trainer = boring_trainer(
    ".", strategy="ddp", devices=2, num_sanity_val_steps=0, callbacks=[PreciseBN(num_batches=6)]
)
train = DataLoader(make_data(96, 0), batch_size=8)  # a shuffled shard of 6 batches per rank
trainer.fit(model, train, DataLoader(make_data(32, 1), batch_size=8))
torch.save({k: v for k, v in model.state_dict().items()}, f"rank{trainer.global_rank}.pt")
"""


@pytest.mark.ddp
def test_ddp_ranks_end_with_identical_exact_buffers(tmp_path: Path) -> None:
    proc = run_script(DDP_SCRIPT, tmp_path)
    assert (proc.stdout + proc.stderr).count("PreciseBN: recomputed 1 BN layer(s)") == 1
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    model = Net()
    model.load_state_dict(rank0)
    # the two ranks' DistributedSampler shards together are the whole data set
    mean, var = exact_bn_input_stats(model, make_data(96, 0).tensors[0])
    torch.testing.assert_close(rank0["body.1.running_mean"].double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rank0["body.1.running_var"].double(), var, rtol=1e-5, atol=1e-5)


# --- issue 10: resume mid-epoch, 1-sample tail, forward errors, sync_batchnorm -------------------


class BufferSpy(Callback):
    """Copies the first BN layer's buffers whenever validation starts (what validation sees)."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, Tensor, Tensor]] = []

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        bn = pl_module.body[1]
        self.seen.append((trainer.global_step, bn.running_mean.clone(), bn.running_var.clone()))


def assert_exact_for(model: Net, data: Tensor, mean: Tensor, var: Tensor) -> None:
    """``mean``/``var`` are the exact statistics of ``model``'s first BN inputs over ``data``."""
    ref_mean, ref_var = exact_bn_input_stats(model, data)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-5, atol=1e-5)


# (checkpoint the first run saves, epochs of the resumed run, the step its validation runs at)
RESUMES = {
    "max_steps": ("epoch=0-step=5.ckpt", 1, 8),  # the first run stopped mid-epoch
    "every_n_train_steps": ("epoch=0-step=5.ckpt", 1, 8),  # a mid-epoch checkpoint
    "epoch_end": ("epoch=0-step=8.ckpt", 2, 16),  # the end of epoch 0; epoch 1 follows
}


@pytest.mark.parametrize("stop", sorted(RESUMES))
def test_resume_recomputes_at_the_epochs_real_end(tmp_path: Path, stop: str) -> None:
    ckpt_dir = tmp_path / "ckpt"
    every = 8 if stop == "epoch_end" else 5
    first = boring_trainer(
        **trainer_kwargs(
            tmp_path,
            max_epochs=1,
            max_steps=5 if stop == "max_steps" else -1,
            limit_val_batches=0,
            enable_checkpointing=True,
            callbacks=[
                PreciseBN(num_batches=8),
                ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=every, save_top_k=-1),
            ],
        )
    )
    first.fit(Net(), **loaders())
    ckpt, max_epochs, val_step = RESUMES[stop]
    spy, resumed = BufferSpy(), PreciseBN(num_batches=8)
    model = Net()
    trainer = boring_trainer(
        **trainer_kwargs(tmp_path, max_epochs=max_epochs, callbacks=[resumed, spy])
    )
    trainer.fit(model, ckpt_path=str(ckpt_dir / ckpt), **loaders())
    last = resumed.history[-1]
    assert (last["when"], last["epoch"], last["step"]) == ("epoch_end", max_epochs - 1, val_step)
    ((step, mean, var),) = spy.seen
    assert step == val_step  # the validation at the epoch's real end saw exact statistics
    assert_exact_for(model, make_data(128, 0).tensors[0], mean, var)


def test_val_loader_with_a_one_sample_tail_batch(tmp_path: Path) -> None:
    val = make_data(65, 1)  # 4 batches of 16 and a tail of 1
    model = Net()
    callback = PreciseBN(num_batches=10, dataloader="val")
    trainer = boring_trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[callback]))
    with pytest.warns(UserWarning, match="has 5 batches"):
        trainer.fit(model, DataLoader(make_data(64, 0), batch_size=16), DataLoader(val, 16))
    assert [entry["num_batches"] for entry in callback.history] == [4]
    bn = model.body[1]
    assert_exact_for(model, val.tensors[0][:64], bn.running_mean, bn.running_var)


def test_forward_needing_more_than_x_is_refused_in_setup(tmp_path: Path) -> None:
    class TwoInputs(Net):
        def forward(self, x: Tensor, scale: float = 1.0, *, shift: Tensor) -> Tensor:
            return self.body(x * scale + shift)

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            x, y = batch
            return F.cross_entropy(self(x, shift=torch.zeros(())), y)

    trainer = boring_trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[PreciseBN()]))
    with pytest.raises(MisconfigurationException, match=r"precise_bn_forward.*forward_fn"):
        trainer.fit(TwoInputs(), **loaders())
    callback = PreciseBN(num_batches=2, forward_fn=lambda m, b: m(b[0], shift=torch.zeros(())))
    kwargs = trainer_kwargs(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[callback])
    boring_trainer(**kwargs).fit(TwoInputs(), **loaders())
    assert callback.history[0]["num_batches"] == 2


def test_sync_batchnorm_is_refused_in_setup_before_the_model_is_converted(tmp_path: Path) -> None:
    model = Net()
    kwargs = trainer_kwargs(tmp_path, max_epochs=1, sync_batchnorm=True)
    trainer = boring_trainer(**kwargs, callbacks=[PreciseBN()])
    with pytest.raises(ValueError, match="NormSync"):
        trainer.fit(model, **loaders())
    assert type(model.body[1]) is nn.BatchNorm1d  # setup ran before strategy.setup converted it
    ddp = boring_trainer(**{**kwargs, "strategy": "ddp", "devices": 2})  # nothing launched yet
    with pytest.raises(ValueError, match=r"PreciseBN.*sync_batchnorm=True.*NormSync"):
        PreciseBN().setup(ddp, Net(), "fit")
    PreciseBN().setup(boring_trainer(**trainer_kwargs(tmp_path)), Net(), "fit")  # no sync: accepted


# --- num_samples ----------------------------------------------------------------------------------


def test_num_samples_uses_the_batch_that_crosses_it(tmp_path: Path) -> None:
    model = Net()
    callback = PreciseBN(num_samples=40)  # batches of 16: 16, 32, 48 -> three batches
    boring_trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[callback])).fit(
        model, **loaders()
    )
    assert [(e["num_batches"], e["num_samples"]) for e in callback.history] == [(3, 48)]
    bn = model.body[1]
    assert_exact_for(model, make_data(128, 0).tensors[0][:48], bn.running_mean, bn.running_var)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_samples": 0}, "`num_samples`"),
        ({"num_samples": True}, "`num_samples`"),
        ({"num_samples": 10, "num_batches": 200}, "`num_batches` or `num_samples`"),
    ],
)
def test_bad_num_samples(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(MisconfigurationException, match=match):
        PreciseBN(**kwargs)


# --- weight averaging: the statistics of the averaged weights -----------------------------------


def swa_fit(
    tmp_path: Path, precise_first: bool, with_precise: bool = True, **kwargs: Any
) -> tuple[Net, StochasticWeightAveraging]:
    seed_everything(0)
    model = Net(lr=0.1)
    swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=2)
    precise = [PreciseBN(num_batches=8)] if with_precise else []
    callbacks = [*precise, swa] if precise_first else [swa, *precise]
    boring_trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, **kwargs)).fit(
        model, **loaders()
    )
    return model, swa


def assert_averaged_weights_in(model: Net, swa: StochasticWeightAveraging) -> None:
    average = swa._average_model
    assert average is not None
    for p, q in zip(model.parameters(), average.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("precise_first", [True, False])
@pytest.mark.parametrize(
    "stop", [{"max_epochs": 3}, {"max_epochs": -1, "max_steps": 24}], ids=["epochs", "steps"]
)
def test_swa_callback_gets_exact_stats_of_the_averaged_weights(
    tmp_path: Path, precise_first: bool, stop: dict[str, int]
) -> None:
    # "epochs": SWA runs its own update_bn epoch; "steps": SWA copies the averaged weights in
    # its on_train_end, after which the statistics must be recomputed whatever the order.
    model, swa = swa_fit(tmp_path, precise_first, **stop)
    assert model.train_steps == 24  # 3 epochs of 8 batches: no extra BN-update epoch of SWA's
    assert_averaged_weights_in(model, swa)
    bn = model.body[1]
    assert_exact_for(model, make_data(128, 0).tensors[0], bn.running_mean, bn.running_var)
    assert bn.momentum == 0.01  # SWA's momentum=None pass restored


def test_swa_alone_averages_per_batch_variances(tmp_path: Path) -> None:
    """The reference tells SWA's own update_bn result apart from the exact statistics."""
    model, swa = swa_fit(tmp_path, precise_first=True, with_precise=False, max_epochs=3)
    assert model.train_steps == 32  # SWA alone adds a fourth epoch for its BN update
    assert_averaged_weights_in(model, swa)
    _, var = exact_bn_input_stats(model, make_data(128, 0).tensors[0])
    error = ((model.body[1].running_var.double() - var).abs() / var).max()
    assert error > 1e-3


class EmaNet(Net):
    """Keeps a weight average of ``body`` (updated once per epoch, as in torch's SWA recipe)."""

    def __init__(self) -> None:
        super().__init__(lr=0.1)
        self.ema = AveragedModel(self.body)

    def on_train_epoch_end(self) -> None:
        self.ema.update_parameters(self.body)


def test_averaged_model_inside_the_module_gets_exact_stats(tmp_path: Path) -> None:
    model = EmaNet()
    trainer = boring_trainer(**trainer_kwargs(tmp_path, max_epochs=2, callbacks=[PreciseBN(8)]))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*fewer than two values")
        trainer.fit(model, **loaders())
    data = make_data(128, 0).tensors[0]
    assert int(model.ema.n_averaged) == 2
    for net in (model.body, model.ema.module):
        with torch.no_grad():
            acts = net[0](data).double()
        torch.testing.assert_close(net[1].running_mean.double(), acts.mean(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(net[1].running_var.double(), acts.var(0), rtol=1e-5, atol=1e-5)


# --- more feature combinations --------------------------------------------------------------------


def test_accumulate_grad_batches(tmp_path: Path) -> None:
    spy, callback = BufferSpy(), PreciseBN(num_batches=7)
    model = Net()
    kwargs = trainer_kwargs(tmp_path, max_epochs=2, accumulate_grad_batches=2)
    train = DataLoader(make_data(112, 0), batch_size=16)  # 7 batches: the last step is odd
    boring_trainer(**kwargs, callbacks=[callback, spy]).fit(
        model, train, loaders()["val_dataloaders"]
    )
    assert [(e["when"], e["epoch"], e["step"]) for e in callback.history] == [
        ("epoch_end", 0, 4),
        ("epoch_end", 1, 8),
    ]
    assert [step for step, _, _ in spy.seen] == [4, 8]
    _, mean, var = spy.seen[-1]
    assert_exact_for(model, make_data(112, 0).tensors[0], mean, var)


def test_bf16_mixed_precision(tmp_path: Path) -> None:
    model = Net()
    callback = PreciseBN(num_batches=8)
    trainer = boring_trainer(**trainer_kwargs(tmp_path, max_epochs=1, precision="bf16-mixed"))
    trainer.callbacks.append(callback)
    trainer.fit(model, **loaders())
    assert callback.history[0]["num_batches"] == 8
    data = make_data(128, 0).tensors[0]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        acts = model.body[0](data)
    assert acts.dtype == torch.bfloat16 and model.body[1].running_var.dtype == torch.float32
    mean, var = acts.double().mean(0), acts.double().var(0)  # the bf16 activations, exactly
    torch.testing.assert_close(model.body[1].running_mean.double(), mean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.body[1].running_var.double(), var, rtol=1e-4, atol=1e-4)


# --- BatchNormDoctor never counts the recompute pass --------------------------------------------


def resnet() -> BoringNormModel:
    """``BoringNormModel`` around a torchvision ResNet-18 (20 BN layers), seeded."""
    import torchvision

    seed_everything(0)
    return BoringNormModel(body=torchvision.models.resnet18(weights=None, num_classes=10), lr=0.01)


def doctor_findings(tmp_path: Path, precise_first: bool) -> tuple[list[Any], list[str]]:
    from lightning_norms.callbacks import BatchNormDoctor

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 3, 32, 32, generator=g), torch.arange(8) % 10)
    doctor, precise = BatchNormDoctor(), PreciseBN(num_batches=4)
    callbacks = [precise, doctor] if precise_first else [doctor, precise]
    trainer = boring_trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=callbacks))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(resnet(), DataLoader(data, batch_size=2), DataLoader(data, batch_size=2))
    assert len(precise.history) == 1  # the recompute ran (4 forwards of every BN layer)
    return doctor.findings, [str(w.message) for w in record]


@pytest.mark.slow
def test_doctor_ignores_the_recompute_pass_in_either_order(tmp_path: Path) -> None:
    first, first_messages = doctor_findings(tmp_path, precise_first=True)
    second, second_messages = doctor_findings(tmp_path, precise_first=False)
    for messages in (first_messages, second_messages):
        assert not [m for m in messages if "times in one training step" in m]
    assert [f.check for f in first if f.check == "calls_per_step"] == []
    assert [(f.check, f.layer, f.threshold) for f in first] == [
        (f.check, f.layer, f.threshold) for f in second
    ]
    for a, b in zip(first, second, strict=True):
        assert a.value == pytest.approx(b.value, rel=1e-6, nan_ok=True)


DDP_SWA_SCRIPT = """
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import StochasticWeightAveraging
from torch.utils.data import DataLoader

from lightning_norms.callbacks import PreciseBN
from tests._boring import boring_trainer
from tests.callbacks.test_precise_bn import Net, make_data

seed_everything(0)
model = Net(lr=0.1)
swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=2)
trainer = boring_trainer(
    ".", strategy="ddp", devices=2, max_epochs=3, num_sanity_val_steps=0,
    callbacks=[PreciseBN(num_batches=6), swa],
)
trainer.fit(model, DataLoader(make_data(96, 0), batch_size=8), DataLoader(make_data(32, 1), 8))
average = [p.detach().clone() for p in swa._average_model.parameters()]
torch.save({"state": model.state_dict(), "average": average}, f"rank{trainer.global_rank}.pt")
"""


@pytest.mark.ddp
def test_ddp_swa_ranks_end_with_exact_stats_of_the_averaged_weights(tmp_path: Path) -> None:
    run_script(DDP_SWA_SCRIPT, tmp_path)
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    for key in rank0["state"]:
        assert torch.equal(rank0["state"][key], rank1["state"][key]), key
    model = Net()
    model.load_state_dict(rank0["state"])
    for p, q in zip(model.parameters(), rank0["average"], strict=True):
        assert torch.equal(p, q)  # the averaged weights are in the module
    bn = model.body[1]
    assert_exact_for(model, make_data(96, 0).tensors[0], bn.running_mean, bn.running_var)


# --- issue 18: one console line per recompute; issue 17: dict batches ---------------------------


def summary_lines(precise: PreciseBN) -> list[str]:
    return [
        f"PreciseBN: recomputed 1 BN layer(s) from {h['num_batches']} batch(es), "
        f"{h['num_samples']} sample(s); largest shift: mean {h['mean_shift']:.3g}, "
        f"var {h['var_shift']:.3g}"
        for h in precise.history
    ]


def test_one_line_per_recompute_in_the_log_without_a_bar(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    precise = PreciseBN(num_batches=3)
    with caplog.at_level(logging.INFO):
        boring_trainer(**trainer_kwargs(tmp_path, max_epochs=2, callbacks=[precise])).fit(
            Net(), **loaders()
        )
    lines = [r.getMessage() for r in caplog.records if "PreciseBN: recomputed" in r.getMessage()]
    assert len(precise.history) == 2 and lines == summary_lines(precise)


def test_one_line_per_recompute_above_the_tqdm_bar(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    precise = PreciseBN(num_batches=3)
    kwargs = trainer_kwargs(tmp_path, max_epochs=2, enable_progress_bar=True)
    boring_trainer(**{**kwargs, "callbacks": [TQDMProgressBar(), precise]}).fit(
        Net(), **loaders()
    )
    out = capsys.readouterr().out
    assert [line for line in summary_lines(precise) if out.count(line) == 1] == summary_lines(
        precise
    )


class DictNet(Net):
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return super().training_step([batch["x"], batch["y"]], batch_idx)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        pass


class LastTrainingBuffers(Callback):
    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, *args: Any) -> None:
        state = pl_module.state_dict()
        self.buffers = {k: v.clone() for k, v in state.items() if k.startswith("body.1.")}


def test_dict_batches_without_forward_fn_name_the_fix_and_change_nothing(tmp_path: Path) -> None:
    data = make_data(64, 0)
    dicts = [{"x": x, "y": y} for x, y in zip(*data.tensors, strict=True)]
    model, spy = DictNet(), LastTrainingBuffers()
    trainer = boring_trainer(**trainer_kwargs(tmp_path, callbacks=[spy, PreciseBN(num_batches=2)]))
    with pytest.raises(TypeError, match=r"`forward_fn.*`precise_bn_forward\(batch\)`"):
        trainer.fit(model, DataLoader(dicts, batch_size=16))
    after = {k: v for k, v in model.state_dict().items() if k in spy.buffers}
    assert after.keys() == spy.buffers.keys() and len(after) == 5  # affine and buffers
    for key, value in after.items():
        assert torch.equal(value, spy.buffers[key]), key
