"""The recipes' single-domain data: one domain of ``TwoDomainDigits``, shuffled or class-sorted.

:class:`SingleDomainDigits` feeds the small-batch, lecture and GAN studies;
:class:`ClassSortedBatchSampler` makes Ioffe 2017's non-i.i.d. batches (a few classes each).
The two-domain data module itself is :class:`lightning_norms.data.TwoDomainDigits`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from lightning_norms.data import TwoDomainDigits

__all__ = ["ClassSortedBatchSampler", "SingleDomainDigits"]


class _EpochView(Sampler[int]):
    """Flat view of a batch sampler's indices; forwards ``set_epoch`` (Lightning calls it)."""

    def __init__(self, owner: ClassSortedBatchSampler) -> None:
        self._owner = owner

    def __iter__(self) -> Iterator[int]:
        for batch in self._owner:
            yield from batch

    def __len__(self) -> int:
        return len(self._owner) * self._owner.batch_size

    def set_epoch(self, epoch: int) -> None:
        self._owner.set_epoch(epoch)


class ClassSortedBatchSampler(BatchSampler):
    """Non-i.i.d. batches: each holds ``batch_size / classes_per_batch`` examples of each of
    ``classes_per_batch`` randomly chosen classes (Ioffe 2017's second setting).

    Every epoch (seeded ``seed + epoch``) each class's indices are shuffled and cut into chunks
    of ``batch_size // classes_per_batch``; the chunks are shuffled and grouped into batches
    (so a batch may repeat a class). Under DDP, batch ``b`` goes to rank ``b % world_size`` and
    every rank gets the same count; rank and world size come from the ``DistributedSampler``
    Lightning injects (``sampler=``), else from ``torch.distributed``.

    Raises:
        ValueError: ``batch_size`` not a multiple of ``classes_per_batch``, or either < 1.
    """

    def __init__(
        self,
        labels: Sequence[int] | Tensor,
        batch_size: int,
        classes_per_batch: int = 2,
        seed: int = 0,
        sampler: Sampler | None = None,
    ) -> None:
        if classes_per_batch < 1 or batch_size < 1 or batch_size % classes_per_batch:
            raise ValueError(
                "ClassSortedBatchSampler: `batch_size` must be a positive multiple of "
                f"`classes_per_batch`, got {batch_size} and {classes_per_batch}"
            )
        self.labels = torch.as_tensor(labels).long()
        self.batch_size = batch_size
        self.drop_last = True
        self.classes_per_batch = classes_per_batch
        self.seed = seed
        self.epoch = 0
        self._dist = sampler
        self.sampler = _EpochView(self)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _world(self) -> tuple[int, int]:
        world = getattr(self._dist, "num_replicas", None)
        rank = getattr(self._dist, "rank", None)
        if world is None or rank is None:
            ready = torch.distributed.is_available() and torch.distributed.is_initialized()
            world = torch.distributed.get_world_size() if ready else 1
            rank = torch.distributed.get_rank() if ready else 0
        return int(world), int(rank)

    def _all_batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        chunk = self.batch_size // self.classes_per_batch
        chunks: list[Tensor] = []
        for c in torch.unique(self.labels).tolist():
            idx = torch.nonzero(self.labels == c).flatten()
            idx = idx[torch.randperm(len(idx), generator=g)]
            chunks += list(idx[: len(idx) - len(idx) % chunk].split(chunk))
        order = torch.randperm(len(chunks), generator=g).tolist()
        k = self.classes_per_batch
        groups = [order[i : i + k] for i in range(0, len(order) - len(order) % k, k)]
        return [torch.cat([chunks[j] for j in grp]).tolist() for grp in groups]

    def __iter__(self) -> Iterator[list[int]]:
        world, rank = self._world()
        batches = self._all_batches()
        per_rank = len(batches) // world
        yield from batches[rank::world][:per_rank]

    def __len__(self) -> int:
        world, _ = self._world()
        return len(self._all_batches()) // world


class _Recast(Dataset):
    """``(x, y, domain)`` from one domain's dataset, optionally greyscale and/or in [-1, 1]."""

    def __init__(self, base: Any, grey: bool, tanh_range: bool) -> None:
        self.base = base
        self.labels: Tensor = base.labels
        self.grey = grey
        self.tanh_range = tanh_range

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        x, y, d = self.base[index]
        if self.grey:
            x = x.mean(dim=0, keepdim=True)
        if self.tanh_range:
            x = x * 2 - 1
        return x, y, d


class SingleDomainDigits(L.LightningDataModule):
    """One domain of ``TwoDomainDigits`` (same split), with shuffled or class-sorted batches.

    Args:
        domain: which domain (0 digits / MNIST, 1 street / SVHN). Default 0.
        root: real data directory, as ``TwoDomainDigits(root=...)``. Default ``None``: embedded.
        batch_size: per device. Default 32.
        order: ``"shuffled"`` (i.i.d. batches) or ``"class_sorted"``
            (:class:`ClassSortedBatchSampler`). Default ``"shuffled"``.
        classes_per_batch: classes in a class-sorted batch. Default 2.
        image_size: default ``None``: 8 (the digits' native size) embedded, 32 real.
        grey: average the colour channels into one. Default ``False``.
        tanh_range: map images from ``[0, 1]`` to ``[-1, 1]`` (for a tanh generator).
        seed: seed of the training order; default ``None``: the global seed, else 0.
        num_workers: DataLoader workers. Default 0.

    Test/val loaders: a list with one loader (``dataloader_idx == 0``), as the classifier
    module expects; batches are ``(x, y, domain)``.
    """

    num_domains: int = 1
    num_classes: int = 10

    def __init__(
        self,
        domain: int = 0,
        root: str | None = None,
        batch_size: int = 32,
        order: Literal["shuffled", "class_sorted"] = "shuffled",
        classes_per_batch: int = 2,
        image_size: int | None = None,
        grey: bool = False,
        tanh_range: bool = False,
        seed: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if order not in ("shuffled", "class_sorted"):
            raise ValueError(
                f"SingleDomainDigits: `order` must be 'shuffled' or 'class_sorted', got {order!r}"
            )
        if domain not in (0, 1):
            raise ValueError(f"SingleDomainDigits: `domain` must be 0 or 1, got {domain!r}")
        if image_size is None and root is None:
            image_size = 8
        self.source = TwoDomainDigits(
            root=root, batch_size=max(2, batch_size + batch_size % 2), image_size=image_size
        )
        self.domain = domain
        self.batch_size = batch_size
        self.order = order
        self.classes_per_batch = classes_per_batch
        self.grey = grey
        self.tanh_range = tanh_range
        self.seed = seed
        self.num_workers = num_workers
        channels, height, width = self.source.image_shape
        self.image_shape: tuple[int, int, int] = (1 if grey else channels, height, width)
        self.domain_names = (self.source.domain_names[domain],)
        self._cache: dict[str, tuple[Tensor, Tensor]] = {}

    def _dataset(self, split: str) -> _Recast:
        self.source.setup()
        base = getattr(self.source, f"{split}_datasets")[self.domain]
        return _Recast(base, self.grey, self.tanh_range)

    def _seed(self) -> int:
        return self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))

    def train_dataloader(self) -> DataLoader:
        """Shuffled (``drop_last``) or class-sorted training batches of ``(x, y, domain)``."""
        data = self._dataset("train")
        if self.order == "class_sorted":
            sampler = ClassSortedBatchSampler(
                data.labels, self.batch_size, self.classes_per_batch, seed=self._seed()
            )
            return DataLoader(data, batch_sampler=sampler, num_workers=self.num_workers)
        gen = torch.Generator().manual_seed(self._seed())
        return DataLoader(
            data,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            generator=gen,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> list[DataLoader]:
        """One validation loader (this domain)."""
        return [DataLoader(self._dataset("val"), batch_size=256, num_workers=self.num_workers)]

    def test_dataloader(self) -> list[DataLoader]:
        """One test loader (this domain)."""
        return [DataLoader(self._dataset("test"), batch_size=256, num_workers=self.num_workers)]

    def _tensors(self, split: str) -> tuple[Tensor, Tensor]:
        if split not in self._cache:
            x, y, _ = next(iter(DataLoader(self._dataset(split), batch_size=10**9)))
            self._cache[split] = (x, y)
        return self._cache[split]

    def train_tensors(self) -> tuple[Tensor, Tensor]:
        """All training images and labels of this domain as two tensors (cached)."""
        return self._tensors("train")

    def test_tensors(self) -> tuple[Tensor, Tensor]:
        """All test images and labels of this domain as two tensors (cached)."""
        return self._tensors("test")
