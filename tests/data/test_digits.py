"""TwoDomainDigits: batch format, splits, determinism, covariate shift, real mode, errors."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_norms.data import MixingBatchSampler, TwoDomainDigits
from lightning_norms.data.digits import _stratified_split, make_street
from tests._boring import BoringNormModel
from tests._dist import run_ddp


@pytest.fixture(scope="module")
def mixed() -> TwoDomainDigits:
    dm = TwoDomainDigits(batch_size=16, seed=0)
    dm.setup("fit")
    return dm


def test_attributes_and_sizes(mixed: TwoDomainDigits):
    assert (mixed.num_domains, mixed.num_classes) == (2, 10)
    assert mixed.image_shape == (3, 8, 8)
    assert mixed.domain_names == ("digits", "street")
    sizes = [
        [len(d) for d in group]
        for group in (mixed.train_datasets, mixed.val_datasets, mixed.test_datasets)
    ]
    # 1797 digits, per class round(n_c * 0.2) test and round(n_c * 0.1) val, the rest train
    from sklearn.datasets import load_digits

    counts = np.bincount(load_digits().target)
    test = sum(round(n * 0.2) for n in counts)
    val = sum(round(n * 0.1) for n in counts)
    assert (test, val) == (359, 179)
    assert sizes == [[1797 - test - val] * 2, [val] * 2, [test] * 2]
    for group in (mixed.train_datasets, mixed.val_datasets, mixed.test_datasets):
        assert torch.equal(group[0].labels, group[1].labels)  # street made from the same images


def test_mixed_batches_are_exact_50_50(mixed: TwoDomainDigits):
    loader = mixed.train_dataloader()
    assert isinstance(loader.batch_sampler, MixingBatchSampler)
    assert len(loader) == 1259 // 8
    n = 0
    for x, y, d in loader:
        n += 1
        assert x.shape == (16, 3, 8, 8) and x.dtype == torch.float32
        assert y.dtype == torch.long and d.dtype == torch.long
        assert float(x.min()) >= 0 and float(x.max()) <= 1
        assert int(y.min()) >= 0 and int(y.max()) <= 9
        assert d.tolist().count(0) == d.tolist().count(1) == 8
    assert n == len(loader)


def test_separate_batches_are_domain_pure_and_equal():
    dm = TwoDomainDigits(batching="separate", batch_size=10, seed=0)
    loader = dm.train_dataloader()
    assert len(loader) == 1259 // 10
    for batch in loader:
        assert isinstance(batch, list) and len(batch) == 2
        for k, (x, y, d) in enumerate(batch):
            assert x.shape == (10, 3, 8, 8) and y.shape == (10,)
            assert d.tolist() == [k] * 10


def test_separate_batches_hold_the_right_samples():
    dm = TwoDomainDigits(batching="separate", batch_size=6, seed=3)
    loader = dm.train_dataloader()
    sizes = [len(d) for d in dm.train_datasets]
    for batch, indices in zip(loader, MixingBatchSampler(sizes, 12, seed=3), strict=True):
        for k, (x, y, _) in enumerate(batch):
            # the split keeps the sampler's order inside each domain
            mine = [i - k * sizes[0] for i in indices if (i >= sizes[0]) == bool(k)]
            assert torch.equal(x, dm.train_datasets[k].images[mine])
            assert torch.equal(y, dm.train_datasets[k].labels[mine])


def test_eval_loaders_one_per_domain(mixed: TwoDomainDigits):
    for loaders, datasets in (
        (mixed.val_dataloader(), mixed.val_datasets),
        (mixed.test_dataloader(), mixed.test_datasets),
    ):
        assert len(loaders) == 2
        for k, loader in enumerate(loaders):
            seen = 0
            for _, y, d in loader:
                assert d.tolist() == [k] * len(d)
                assert torch.equal(y, datasets[k].labels[seen : seen + len(y)])
                seen += len(y)
            assert seen == len(datasets[k])


def test_stratified_split_is_disjoint_complete_and_stratified():
    labels = torch.arange(10).repeat_interleave(torch.arange(20, 30))
    train, val, test = _stratified_split(labels, (0.1, 0.2), seed=0)
    everything = torch.cat([train, val, test]).sort().values
    assert torch.equal(everything, torch.arange(len(labels)))
    for c in range(10):
        n = 20 + c
        assert int((labels[test] == c).sum()) == round(n * 0.2)
        assert int((labels[val] == c).sum()) == round(n * 0.1)
    again = _stratified_split(labels, (0.1, 0.2), seed=0)
    other = _stratified_split(labels, (0.1, 0.2), seed=1)
    assert all(torch.equal(a, b) for a, b in zip(again, (train, val, test), strict=True))
    assert not torch.equal(other[2], test)


def _first_epoch(dm: TwoDomainDigits) -> list[torch.Tensor]:
    return [x for x, _, _ in dm.train_dataloader()]


def test_determinism(mixed: TwoDomainDigits):
    same = TwoDomainDigits(batch_size=16, seed=0)
    same.setup()
    for a, b in zip(
        mixed.test_datasets + mixed.train_datasets,
        same.test_datasets + same.train_datasets,
        strict=True,
    ):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert all(
        torch.equal(a, b) for a, b in zip(_first_epoch(mixed), _first_epoch(same), strict=True)
    )
    reseeded = TwoDomainDigits(batch_size=16, seed=1)
    reseeded.setup()
    assert torch.equal(reseeded.train_datasets[1].images, mixed.train_datasets[1].images)
    assert not torch.equal(_first_epoch(reseeded)[0], _first_epoch(mixed)[0])
    resplit = TwoDomainDigits(batch_size=16, split_seed=1)
    resplit.setup()
    assert not torch.equal(resplit.test_datasets[0].labels, mixed.test_datasets[0].labels)
    # the epoch Lightning sets reshuffles
    loader = mixed.train_dataloader()
    loader.batch_sampler.sampler.set_epoch(1)
    assert not torch.equal(next(iter(loader))[0], _first_epoch(mixed)[0])


def test_seed_defaults_to_the_global_seed(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    assert TwoDomainDigits().seed == 7
    monkeypatch.delenv("PL_GLOBAL_SEED")
    assert TwoDomainDigits().seed == 0


def test_covariate_shift_is_real(mixed: TwoDomainDigits):
    """Street: low contrast on a bright background, slightly tinted; digits: white on black."""
    digits, street = (d.images for d in mixed.train_datasets)
    m0, m1 = digits.mean((0, 2, 3)), street.mean((0, 2, 3))
    assert torch.equal(digits[:, 0], digits[:, 1]) and torch.equal(digits[:, 1], digits[:, 2])
    assert (m1 - m0).min() > 0.2  # brighter on average, every channel
    spread0, spread1 = digits.std((1, 2, 3)), street.std((1, 2, 3))
    assert float(spread1.mean()) < 0.5 * float(spread0.mean())  # low contrast
    tint = (street[:, 0] - street[:, 1]).mean((1, 2)).abs()
    assert 0.01 < float(tint.mean()) < 0.06

    # ink below or above the background: dark ink makes the centre darker than the border
    def centre_minus_border(x: torch.Tensor) -> torch.Tensor:
        grey = x.mean(1)
        border = torch.cat([grey[:, 0], grey[:, -1], grey[:, :, 0], grey[:, :, -1]], 1).mean(1)
        return grey[:, 2:6, 2:6].mean((1, 2)) - border

    assert float((centre_minus_border(digits) < 0).float().mean()) < 0.03
    assert 0.55 < float((centre_minus_border(street) < 0).float().mean()) < 0.9


def test_make_street_is_seeded_and_validates():
    grey = torch.rand(4, 8, 8)
    assert torch.equal(make_street(grey, 16), make_street(grey, 16))
    assert not torch.equal(make_street(grey, 16, seed=1), make_street(grey, 16))
    assert make_street(grey.unsqueeze(1), 12).shape == (4, 3, 12, 12)
    with pytest.raises(ValueError, match="digits"):
        make_street(torch.rand(4, 3, 8, 8), 16)
    with pytest.raises(ValueError, match="size"):
        make_street(grey, 2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batching": "both"}, "batching"),
        ({"batch_size": 7}, "even"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"seed": -1}, "seed"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"test_fraction": -0.1}, "test_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction"),
        ({"image_size": 4}, "image_size"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TwoDomainDigits(**kwargs)


def test_missing_root_names_every_missing_file(tmp_path: Path):
    with pytest.raises(FileNotFoundError) as info:
        TwoDomainDigits(root=str(tmp_path / "nowhere"))
    message = str(info.value)
    for name in (
        "train-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
        "train_32x32.mat",
        "test_32x32.mat",
    ):
        assert name in message
    (tmp_path / "train_32x32.mat").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as info:
        TwoDomainDigits(root=str(tmp_path))
    message = str(info.value)
    assert "lacks 5 file(s)" in message
    assert str(tmp_path / "test_32x32.mat") in message
    assert str(tmp_path / "train_32x32.mat") not in message


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _fake_real_root(root: Path) -> None:
    """Tiny MNIST/SVHN files in torchvision's layout (formats as the real ones)."""
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", 40), ("t10k", 20)):
        _write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)
    for split, n in (("train", 30), ("test", 10)):
        x = rng.integers(0, 256, (32, 32, 3, n)).astype(np.uint8)
        y = (np.arange(n) % 10 + 1).reshape(n, 1)  # SVHN labels 1..10, 10 meaning digit 0
        savemat(str(root / f"{split}_32x32.mat"), {"X": x, "y": y})


def test_real_mode_reads_torchvision_layout(tmp_path: Path):
    _fake_real_root(tmp_path)
    dm = TwoDomainDigits(root=str(tmp_path), batch_size=4, val_fraction=0.2)
    assert dm.image_shape == (3, 32, 32) and dm.domain_names == ("MNIST", "SVHN")
    dm.setup("fit")
    # stratified: round(4 * 0.2) = round(3 * 0.2) = 1 per class held out for validation
    assert [len(d) for d in dm.train_datasets] == [30, 20]
    assert [len(d) for d in dm.val_datasets] == [10, 10]
    assert [len(d) for d in dm.test_datasets] == [20, 10]
    assert sorted(set(dm.test_datasets[1].labels.tolist())) == list(range(10))
    x, _, d = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and d.tolist().count(0) == 2
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    mnist = x[d == 0]
    assert torch.equal(mnist[:, 0], mnist[:, 1])  # grey MNIST repeated on 3 channels
    from scipy.io import loadmat

    raw = loadmat(str(tmp_path / "test_32x32.mat"))["X"]
    first = torch.from_numpy(raw[..., 0]).permute(2, 0, 1).float() / 255
    assert torch.allclose(dm.test_datasets[1][0][0], first)
    small = TwoDomainDigits(root=str(tmp_path), image_size=16)
    small.setup()
    assert small.test_datasets[0][0][0].shape == (3, 16, 16)


def test_workers_give_the_same_batches():
    dm = TwoDomainDigits(batching="separate", batch_size=32, seed=2)
    workers = TwoDomainDigits(batching="separate", batch_size=32, seed=2, num_workers=1)
    for a, b in zip(dm.train_dataloader(), workers.train_dataloader(), strict=True):
        assert all(
            torch.equal(u, v)
            for pa, pb in zip(a, b, strict=True)
            for u, v in zip(pa, pb, strict=True)
        )


class _DigitsProbe(BoringNormModel):
    """A linear classifier that checks each training batch's feed and the val loaders' domains."""

    def __init__(self, batching: str) -> None:
        super().__init__(body=torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 10)))
        self.batching = batching
        self.val_domains: set[tuple[int, int]] = set()
        self.steps = 0

    def training_step(self, batch, batch_idx):
        parts = batch if self.batching == "separate" else [batch]
        if self.batching == "separate":
            assert [p[2].unique().tolist() for p in parts] == [[0], [1]]
        else:
            assert batch[2].bincount().tolist() == [4, 4]
        self.steps += 1
        return sum(torch.nn.functional.cross_entropy(self(x), y) for x, y, _ in parts)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.val_domains.update((dataloader_idx, int(k)) for k in batch[2].unique())


def test_lightning_fit_single_process_both_feeds(make_trainer):
    for batching in ("mixed", "separate"):
        model = _DigitsProbe(batching)
        trainer = make_trainer(
            max_steps=3, limit_val_batches=2, num_sanity_val_steps=0, val_check_interval=3
        )
        trainer.fit(model, datamodule=TwoDomainDigits(batching=batching, batch_size=8))
        assert model.steps == 3
        assert model.val_domains == {(0, 0), (1, 1)}


def test_lightning_cli_builds_it():
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    cli = LightningCLI(
        L.LightningModule,
        TwoDomainDigits,
        run=False,
        args=["--data.batching", "separate", "--data.batch_size", "6", "--data.image_size", "12"],
    )
    assert cli.datamodule.batching == "separate" and cli.datamodule.image_shape == (3, 12, 12)


def _ddp_train_batches(rank: int, world_size: int) -> list[list[int]]:
    dm = TwoDomainDigits(batch_size=64, seed=5)
    loader = dm.train_dataloader()
    assert (loader.batch_sampler.num_replicas, loader.batch_sampler.rank) == (world_size, rank)
    return [x.sum((1, 2, 3)).tolist() for x, _, _ in loader]


@pytest.mark.ddp
def test_ddp_ranks_get_disjoint_equal_halves():
    results = run_ddp(_ddp_train_batches, world_size=2)
    dm = TwoDomainDigits(batch_size=64, seed=5)
    dm.setup()
    data = torch.utils.data.ConcatDataset(dm.train_datasets)
    sums = torch.stack([data[i][0].sum() for i in range(len(data))])
    sizes = [len(d) for d in dm.train_datasets]
    for r, got in enumerate(results):
        reference = list(MixingBatchSampler(sizes, 64, seed=5, num_replicas=2, rank=r))
        assert len(got) == len(reference) == 1259 // 32 // 2
        for batch, indices in zip(got, reference, strict=True):
            assert torch.allclose(torch.tensor(batch).sort().values, sums[indices].sort().values)
