"""``TwoDomainDigits``: two digit domains with a real covariate shift, for the BN experiments.

Embedded mode (default, no download): domain 0 is scikit-learn's bundled 8x8 digits, domain 1 a
"street" domain made from the same images (colour, contrast inversion, textured background,
neighbouring digits, scale/shift, noise). ``root=`` switches to real MNIST (domain 0) and SVHN
(domain 1) read from disk in torchvision's layout; nothing is ever downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset, default_collate

from lightning_norms._shared import check_int
from lightning_norms.data.sampler import MixingBatchSampler

__all__ = ["TwoDomainDigits", "make_street"]

_NAME = "TwoDomainDigits"
STREET_SEED = 2017
"""Seed of the street domain's random recipe (fixed: the data set does not change with ``seed``)."""

MNIST_FILES = (
    "MNIST/raw/train-images-idx3-ubyte",
    "MNIST/raw/train-labels-idx1-ubyte",
    "MNIST/raw/t10k-images-idx3-ubyte",
    "MNIST/raw/t10k-labels-idx1-ubyte",
)
SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")


def _resize(images: Tensor, size: int) -> Tensor:
    """Bilinear (antialiased when shrinking) resize of ``[N, C, H, W]`` float images."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    shrink = images.shape[-1] > size
    return F.interpolate(
        images, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink
    )


def _shift_scale(images: Tensor, scale: Tensor, tx: Tensor, ty: Tensor) -> Tensor:
    """Zoom by ``scale`` (>1 enlarges) and shift by ``tx, ty`` (fractions of the half-width)."""
    n = images.shape[0]
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = 1.0 / scale
    theta[:, 1, 1] = 1.0 / scale
    theta[:, 0, 2] = -tx / scale
    theta[:, 1, 2] = -ty / scale
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def make_street(digits: Tensor, size: int, seed: int = STREET_SEED) -> Tensor:
    """Turn grey digits into a "street numbers" domain (SVHN-like covariate shift), seeded.

    The recipe, per image, with one ``torch.Generator`` seeded ``seed`` (so the result is
    the same on every run, process and rank):

    1. the digit (``[0, 1]``, white on black) is resized bilinearly to ``size x size``, zoomed
       by a factor in ``U(0.9, 1.1)`` and shifted by up to ``±3%`` of the image in x and y;
    2. parts of two other random digits show at the left and right edges (house numbers have
       neighbours), shifted out by ``U(0.68, 0.8)`` of the image width, at 60% strength; the
       ink mask ``m`` is the pixelwise maximum;
    3. low contrast on a bright background, as house numbers photographed in the street: one
       grey background level ``b ~ U(0.4, 0.9)`` and an ink contrast ``c ~ U(0.2, 0.45)``; the
       ink is ``b + c`` or ``b - c`` (half each, at random), flipped to the other side when it
       would leave ``[0, 1]``; both get the same small tint ``U(-0.05, 0.05)`` per RGB channel;
    4. ``image = background * (1 - m) + ink * m`` plus a smooth texture (4x4 uniform noise of
       amplitude 0.08 per channel, upsampled bilinearly) and pixel noise ``N(0, 0.03^2)``,
       clipped to ``[0, 1]``.

    The shift is large, as from MNIST to SVHN: the digits are white ink (contrast 1) on black,
    pixel mean 0.31 and per-image std 0.38 at 8x8; the street digits are mostly dark (about
    three in four: light ink is flipped when it would pass 1) or light ink of contrast 0.2-0.45
    on a grey background, pixel mean 0.59 and per-image std 0.11. The same BatchNorm
    statistics cannot serve both: a small CNN fed domain-pure batches through one BN loses
    5 points of mean accuracy against mixed batches (``lightning-norms report``).

    Args:
        digits: grey digit images ``[N, H, W]`` or ``[N, 1, H, W]`` with values in ``[0, 1]``.
        size: output height and width.
        seed: seed of the recipe. Default :data:`STREET_SEED`.

    Shape:
        ``[N, H, W]`` or ``[N, 1, H, W]`` -> ``[N, 3, size, size]``, float32 in ``[0, 1]``.

    Raises:
        ValueError: ``digits`` not 3-D/4-D with one channel, empty, or ``size < 4``.

    Example:
        >>> street = make_street(torch.rand(5, 8, 8), size=16)
        >>> street.shape, bool(street.min() >= 0), bool(street.max() <= 1)
        (torch.Size([5, 3, 16, 16]), True, True)
    """
    if digits.dim() == 3:
        digits = digits.unsqueeze(1)
    if digits.dim() != 4 or digits.shape[1] != 1 or digits.shape[0] == 0:
        raise ValueError(
            f"make_street: `digits` must be [N, H, W] or [N, 1, H, W] with N >= 1, "
            f"got shape {tuple(digits.shape)}"
        )
    if size < 4:
        raise ValueError(f"make_street: `size` must be >= 4, got {size}")
    g = torch.Generator().manual_seed(seed)
    n = digits.shape[0]
    base = _resize(digits.float(), size)

    def uniform(low: float, high: float, *shape: int) -> Tensor:
        return low + (high - low) * torch.rand(*shape, generator=g)

    digit = _shift_scale(
        base, uniform(0.9, 1.1, n), uniform(-0.06, 0.06, n), uniform(-0.06, 0.06, n)
    )
    neighbours = []
    for side in (-1.0, 1.0):
        other = base[torch.randint(n, (n,), generator=g)]
        shift = side * uniform(1.35, 1.6, n)
        neighbours.append(_shift_scale(other, torch.ones(n), shift, uniform(-0.1, 0.1, n)))
    mask = torch.maximum(digit, 0.6 * torch.maximum(*neighbours)).clamp(0, 1)

    background = uniform(0.4, 0.9, n, 1)
    contrast = uniform(0.2, 0.45, n, 1)
    sign = torch.where(torch.rand(n, 1, generator=g) < 0.5, -1.0, 1.0)
    ink = background + sign * contrast
    ink = torch.where((ink < 0) | (ink > 1), background - sign * contrast, ink)
    tint = uniform(-0.05, 0.05, n, 3)
    background = (background + tint).clamp(0, 1).view(n, 3, 1, 1)
    ink = (ink + tint).clamp(0, 1).view(n, 3, 1, 1)
    texture = _resize(uniform(-0.08, 0.08, n, 3, 4, 4), size)
    noise = 0.03 * torch.randn(n, 3, size, size, generator=g)
    return (background * (1 - mask) + ink * mask + texture + noise).clamp(0, 1)


class _DomainDataset(Dataset):
    """``(x, y, domain)`` samples of one domain; uint8 images are scaled to ``[0, 1]`` here."""

    def __init__(self, images: Tensor, labels: Tensor, domain: int) -> None:
        self.images = images
        self.labels = labels
        self.domain = domain
        self._domain = torch.tensor(domain, dtype=torch.long)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        x = self.images[index]
        if x.dtype == torch.uint8:
            x = x.float().div_(255)
        if x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        return x, self.labels[index], self._domain


def _collate_separate(samples: list[Any]) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Collate a mixed batch, then split it into one domain-pure batch per domain id."""
    x, y, d = default_collate(samples)
    return [(x[d == k], y[d == k], d[d == k]) for k in range(TwoDomainDigits.num_domains)]


def _stratified_split(labels: Tensor, fractions: Sequence[float], seed: int) -> list[Tensor]:
    """Split indices class by class: ``round(n_c * f)`` to each fraction, the rest first."""
    g = torch.Generator().manual_seed(seed)
    parts: list[list[Tensor]] = [[] for _ in range(len(fractions) + 1)]
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        start = 0
        for k, f in enumerate(fractions, start=1):
            count = round(idx.numel() * f)
            parts[k].append(idx[start : start + count])
            start += count
        parts[0].append(idx[start:])
    return [torch.cat(p).sort().values for p in parts]


def _to_uint8(images: Tensor, size: int, chunk: int = 8192) -> Tensor:
    """Resize uint8 ``[N, C, H, W]`` images to ``size`` (in chunks, to bound memory)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images.contiguous()
    out = [
        _resize(part.float(), size).round_().clamp_(0, 255).to(torch.uint8)
        for part in images.split(chunk)
    ]
    return torch.cat(out)


def _missing_files(root: Path) -> list[str]:
    return [str(root / f) for f in (*MNIST_FILES, *SVHN_FILES) if not (root / f).is_file()]


def _check_batching(batching: Any, batch_size: Any, num_workers: Any, split_seed: Any) -> None:
    """Refuse a bad ``batching``, a bad integer argument, or an odd mixed ``batch_size``."""
    if batching not in ("mixed", "separate"):
        raise ValueError(f"{_NAME}: `batching` must be 'mixed' or 'separate', got {batching!r}")
    for name, value, low in (
        ("batch_size", batch_size, 1),
        ("num_workers", num_workers, 0),
        ("split_seed", split_seed, 0),
    ):
        check_int(name, value, low, where=_NAME)
    if batching == "mixed" and batch_size % 2:
        raise ValueError(
            f"{_NAME}: `batch_size` must be even for batching='mixed' (an exact 50/50 mix), "
            f"got {batch_size}"
        )


def _resolve_seed(seed: Any) -> int:
    """``seed``, or Lightning's global seed (``PL_GLOBAL_SEED``, else 0) for ``None``; checked."""
    if seed is None:
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    return check_int("seed", seed, 0, where=_NAME)


def _check_fractions(val_fraction: Any, test_fraction: Any, embedded: bool) -> None:
    """Each fraction in ``[0, 1)``; embedded data also need ``val + test < 1``."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not (isinstance(value, (int, float)) and 0 <= value < 1):
            raise ValueError(f"{_NAME}: `{name}` must be in [0, 1), got {value!r}")
    if embedded and val_fraction + test_fraction >= 1:
        raise ValueError(
            f"{_NAME}: `val_fraction` + `test_fraction` must be < 1, got "
            f"{val_fraction} + {test_fraction}"
        )


def _resolve_image_size(image_size: Any, embedded: bool) -> int:
    """``image_size``, or the default (8 embedded, 32 real) for ``None``; an integer >= 8."""
    if image_size is None:
        image_size = 8 if embedded else 32
    return check_int("image_size", image_size, 8, where=_NAME)


def _check_root(root: str | os.PathLike[str]) -> None:
    """Raise ``FileNotFoundError`` listing every MNIST/SVHN file missing under ``root``."""
    missing = _missing_files(Path(root))
    if missing:
        raise FileNotFoundError(
            f"{_NAME}: root={str(root)!r} lacks {len(missing)} file(s): "
            + ", ".join(missing)
            + ". Expected torchvision's layout: ROOT/MNIST/raw/ with the four "
            "uncompressed idx files and ROOT/train_32x32.mat, ROOT/test_32x32.mat "
            "(torchvision.datasets.MNIST(ROOT, download=True) and SVHN(ROOT, "
            "split='train'/'test', download=True) write them). Nothing is downloaded "
            "here; pass root=None for the embedded digits."
        )


def _load_real(root: Path, size: int) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """(train images, train labels, test images, test labels) for MNIST and SVHN, uint8."""
    import numpy as np
    from scipy.io import loadmat
    from torchvision.datasets.mnist import read_image_file, read_label_file

    mnist = []
    for split in ("train", "t10k"):
        images = read_image_file(str(root / f"MNIST/raw/{split}-images-idx3-ubyte"))
        labels = read_label_file(str(root / f"MNIST/raw/{split}-labels-idx1-ubyte"))
        mnist += [_to_uint8(images.unsqueeze(1), size), labels.long()]
    svhn = []
    for split in ("train", "test"):
        mat = loadmat(str(root / f"{split}_32x32.mat"))
        images = torch.from_numpy(np.ascontiguousarray(np.transpose(mat["X"], (3, 2, 0, 1))))
        labels = torch.from_numpy(mat["y"].astype(np.int64).reshape(-1))
        svhn += [_to_uint8(images, size), torch.where(labels == 10, 0, labels)]
    return [tuple(mnist), tuple(svhn)]  # type: ignore[list-item]


class TwoDomainDigits(L.LightningDataModule):
    """Two digit domains (clean digits and "street" digits) for the BatchNorm experiments.

    The shared-tower BN pitfall: one network trained on MNIST + SVHN, fed either one batch
    holding both domains or one domain-pure batch per tower. This DataModule serves both feeds
    from two domains with a real covariate shift, and one test loader per domain.

    Data:
        - embedded (``root=None``, default; no download): domain 0 ("digits") is scikit-learn's
          bundled 8x8 digits (1797 images), scaled to ``[0, 1]``, resized bilinearly to
          ``image_size`` and repeated on 3 channels (white on black); domain 1 ("street") is
          :func:`make_street` of the same images (seeded with :data:`STREET_SEED`, fixed: the
          data never change with ``seed``). One stratified split of the 1797 image indices
          (``split_seed``) is used by both domains, so no digit is in training in one domain and
          in test in the other. Default ``image_size`` 8 (the digits' native size; larger sizes
          only interpolate): ``image_shape == (3, 8, 8)``.
        - real (``root=DIR``): domain 0 MNIST, domain 1 SVHN, read from torchvision's layout
          (``DIR/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``, uncompressed, and
          ``DIR/{train,test}_32x32.mat``, as written by ``torchvision.datasets.MNIST(DIR,
          download=True)`` and ``SVHN(DIR, split=..., download=True)``; never downloaded here).
          Both resized to ``image_size`` (default 32), MNIST repeated on 3 channels, uint8 in
          memory, ``[0, 1]`` floats out. Validation is a stratified ``val_fraction`` of each
          training set; test is each official test set (``test_fraction`` is not used).

    Batches (every sample is ``(x, y, domain)``: ``x`` float ``[3, H, W]`` in ``[0, 1]``, ``y``
    long class 0..9, ``domain`` long 0/1):
        - ``batching="mixed"``: the train loader yields ``(x[N,3,H,W], y[N], domain[N])`` with
          ``N = batch_size`` and exactly ``batch_size / 2`` of each domain, shuffled
          (:class:`MixingBatchSampler`, 50/50, ``drop_last``); ``batch_size`` must be even.
        - ``batching="separate"``: the train loader yields ``[(x0, y0, d0), (x1, y1, d1)]``, two
          domain-pure batches of ``batch_size`` each (the same sampler with ``2 * batch_size``,
          split by domain), so a step sees ``2 * batch_size`` samples.
        - ``val_dataloader()`` / ``test_dataloader()``: a list of two loaders, index = domain id
          (``dataloader_idx == domain``), ``batch_size`` per batch, in order.
        ``batch_size`` is per device. Under DDP each rank gets disjoint training batches of the
        same composition and the same count (see :class:`MixingBatchSampler`); Lightning's
        default ``use_distributed_sampler=True`` shards the val/test loaders as usual (its
        ``DistributedSampler`` repeats a few samples to even out the ranks: test on one device
        for exact per-domain figures).
        The order of the training batches follows ``seed`` and the epoch (Lightning calls
        ``set_epoch``), the same with any ``num_workers``.

    Args:
        root: directory holding MNIST and SVHN (see above). Default ``None``: embedded data.
        batching: ``"mixed"`` or ``"separate"``. Default ``"mixed"``.
        batch_size: per device; mixed: the whole batch, separate: per domain. Default ``64``.
        num_workers: DataLoader workers. Default ``0``.
        seed: seed of the training order. Default ``None``: the global seed set by
            ``lightning.seed_everything`` (``PL_GLOBAL_SEED``), else 0.
        split_seed: seed of the train/val/test split. Default ``0``.
        val_fraction: share of each class held out for validation. Default ``0.1``.
        test_fraction: share of each class held out for test (embedded mode). Default ``0.2``.
        image_size: height and width of the images. Default ``None``: 8 embedded, 32 real.

    Attributes:
        num_domains: ``2``.
        num_classes: ``10``.
        image_shape: ``(3, H, W)``.
        domain_names: ``("digits", "street")``, or ``("MNIST", "SVHN")`` with ``root``.

    Raises:
        ValueError: a bad ``batching``, ``batch_size`` (odd when mixed), ``num_workers``,
            ``seed``, fractions (each in ``[0, 1)``, sum below 1) or ``image_size`` (< 8).
        FileNotFoundError: ``root`` given but files missing; the message lists every missing
            file and the expected layout.

    Example:
        >>> dm = TwoDomainDigits(batch_size=8)
        >>> dm.setup("fit")
        >>> x, y, d = next(iter(dm.train_dataloader()))
        >>> x.shape, d.tolist().count(0), dm.image_shape
        (torch.Size([8, 3, 8, 8]), 4, (3, 8, 8))
        >>> [len(loader.dataset) for loader in dm.test_dataloader()]
        [359, 359]
    """

    num_domains: int = 2
    num_classes: int = 10

    def __init__(
        self,
        root: str | None = None,
        batching: Literal["mixed", "separate"] = "mixed",
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int | None = None,
        split_seed: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        _check_batching(batching, batch_size, num_workers, split_seed)
        seed = _resolve_seed(seed)
        _check_fractions(val_fraction, test_fraction, embedded=root is None)
        image_size = _resolve_image_size(image_size, embedded=root is None)
        if root is not None:
            _check_root(root)
        self.save_hyperparameters()
        self.root = None if root is None else str(root)
        self.batching = batching
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.split_seed = split_seed
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.image_shape: tuple[int, int, int] = (3, image_size, image_size)
        self.domain_names: tuple[str, str] = (
            ("digits", "street") if root is None else ("MNIST", "SVHN")
        )
        self.train_datasets: list[_DomainDataset] = []
        self.val_datasets: list[_DomainDataset] = []
        self.test_datasets: list[_DomainDataset] = []

    def _build_embedded(self) -> None:
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:
            raise ImportError(
                f"{_NAME}: the embedded digits come from scikit-learn, which is missing; "
                'install it with `pip install "lightning-norms[recipes]"` (or pass `root=` '
                "for real MNIST + SVHN)"
            ) from err

        bunch = load_digits()
        grey = torch.as_tensor(bunch.images, dtype=torch.float32).div_(16).unsqueeze(1)
        labels = torch.as_tensor(bunch.target, dtype=torch.long)
        size = self.image_shape[-1]
        domains = [
            _resize(grey, size).clamp_(0, 1).expand(-1, 3, -1, -1).contiguous(),
            make_street(grey, size),
        ]
        train, val, test = _stratified_split(
            labels, (self.val_fraction, self.test_fraction), self.split_seed
        )
        for store, idx in (
            (self.train_datasets, train),
            (self.val_datasets, val),
            (self.test_datasets, test),
        ):
            store[:] = [_DomainDataset(x[idx], labels[idx], k) for k, x in enumerate(domains)]

    def _build_real(self, root: str) -> None:
        for k, (x_tr, y_tr, x_te, y_te) in enumerate(_load_real(Path(root), self.image_shape[-1])):
            train, val = _stratified_split(y_tr, (self.val_fraction,), self.split_seed)
            self.train_datasets.append(_DomainDataset(x_tr[train], y_tr[train], k))
            self.val_datasets.append(_DomainDataset(x_tr[val], y_tr[val], k))
            self.test_datasets.append(_DomainDataset(x_te, y_te, k))

    def setup(self, stage: str | None = None) -> None:
        """Build the data once (cheap: embedded data are made in well under a second)."""
        if self.train_datasets:
            return
        if self.root is None:
            self._build_embedded()
        else:
            self._build_real(self.root)

    def train_dataloader(self) -> DataLoader:
        """Mixed or separate training batches (see the class docstring)."""
        self.setup()
        per_step = self.batch_size if self.batching == "mixed" else 2 * self.batch_size
        sampler = MixingBatchSampler(
            [len(d) for d in self.train_datasets], per_step, ratios=[1, 1], seed=self.seed
        )
        return DataLoader(
            ConcatDataset(self.train_datasets),
            batch_sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=_collate_separate if self.batching == "separate" else None,
            persistent_workers=self.num_workers > 0,
        )

    def _eval_loaders(self, datasets: list[_DomainDataset]) -> list[DataLoader]:
        self.setup()
        return [
            DataLoader(d, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
            for d in datasets
            if len(d) > 0
        ]

    def val_dataloader(self) -> list[DataLoader]:
        """One validation loader per domain (``dataloader_idx == domain``)."""
        return self._eval_loaders(self.val_datasets)

    def test_dataloader(self) -> list[DataLoader]:
        """One test loader per domain (``dataloader_idx == domain``)."""
        return self._eval_loaders(self.test_datasets)
