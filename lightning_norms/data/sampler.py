"""``MixingBatchSampler``: every batch an exact, fixed mix of several sources.

BatchNorm normalises each example with the statistics of its batch, so a batch must be a fair
sample of the data (Ioffe & Szegedy 2015, arXiv:1502.03167, treat mini-batches as samples of
the training set). A sampler that draws
batches at random from a ``ConcatDataset`` gives fair batches only on average; this one gives
every batch the exact share of every source, on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from fractions import Fraction
from numbers import Rational, Real
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, Sampler

from lightning_norms._shared import check_int

__all__ = ["MixingBatchSampler"]

_NAME = "MixingBatchSampler"


def _apportion(weights: Sequence[Fraction], total: int) -> list[int]:
    """Largest-remainder (Hamilton) apportionment of ``total`` seats to ``weights`` (sum 1).

    Each share gets ``floor(total * w)``; the seats left go one each to the largest fractional
    remainders, ties to the lower index. Exact rational arithmetic, so equal weights give equal
    shares whenever ``total`` allows it.
    """
    exact = [w * total for w in weights]
    shares = [math.floor(e) for e in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in order[: total - sum(shares)]:
        shares[i] += 1
    return shares


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{_NAME}: `{name}` must be a bool, got {value!r}")
    return value


def _as_fraction(k: int, value: Any) -> Fraction:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{_NAME}: `ratios[{k}]` must be a real number, got {value!r}")
    if not math.isfinite(float(value)) or value < 0:
        raise ValueError(f"{_NAME}: `ratios[{k}]` must be finite and >= 0, got {value!r}")
    # limit_denominator turns the float 0.1 into exactly 1/10, so quotas come out as intended.
    # Fraction() takes a Rational or a float: other reals (numpy.float32) go through float.
    exact = value if isinstance(value, Rational) else float(value)
    return Fraction(exact).limit_denominator(10**9)


def _sequence(name: str, value: Any, what: str) -> list[Any]:
    """``value`` as a list (tensors and arrays via ``tolist``); a string or a scalar is refused."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{_NAME}: `{name}` must be a sequence of {what}, got {value!r}")
    return list(value)


def _check_sizes(source_sizes: Any) -> list[int]:
    """The validated ``source_sizes``: at least one source, each an integer ``>= 0``.

    A ``Sampler`` here means Lightning re-created a DataLoader built outside a
    ``*_dataloader`` hook: the ``TypeError`` says what to do instead.
    """
    if isinstance(source_sizes, Sampler):
        raise TypeError(
            f"{_NAME}: got a sampler ({type(source_sizes).__name__}) as `source_sizes`. "
            "Lightning passes one when it re-creates a batch sampler whose arguments it did "
            "not record (a subclass with its own `__init__`, created outside a "
            "`*_dataloader` hook or first imported inside one). Pass "
            "`Trainer(use_distributed_sampler=False)`: the sampler shards by rank itself."
        )
    sizes = _sequence("source_sizes", source_sizes, "ints")
    if len(sizes) == 0:
        raise ValueError(f"{_NAME}: `source_sizes` must name at least one source, got []")
    return [check_int(f"source_sizes[{k}]", n, 0, where=_NAME) for k, n in enumerate(sizes)]


def _check_ratios(ratios: Any, count: int) -> tuple[list[Any], list[Fraction]]:
    """The ratios as given (default: all 1) and their weights ``ratios[i] / sum(ratios)``.

    Raises ``ValueError`` for a length other than ``count``, a negative/NaN/inf entry or an
    all-zero list.
    """
    given = [1] * count if ratios is None else _sequence("ratios", ratios, "numbers")
    if len(given) != count:
        raise ValueError(
            f"{_NAME}: `ratios` has {len(given)} entries but `source_sizes` has "
            f"{count}, got ratios={given!r}"
        )
    fracs = [_as_fraction(k, r) for k, r in enumerate(given)]
    total = sum(fracs)
    if total == 0:
        raise ValueError(f"{_NAME}: `ratios` must not be all zero, got {given!r}")
    return given, [f / total for f in fracs]


def _check_quotas(
    ratios: list[Any], weights: list[Fraction], batch_size: int, sizes: list[int]
) -> list[int]:
    """The per-batch quotas (:func:`_apportion` of ``batch_size``), checked.

    Every source with a positive ratio must get at least one seat and hold an example.
    """
    active = [k for k, r in enumerate(ratios) if r > 0]
    if batch_size < len(active):
        raise ValueError(
            f"{_NAME}: `batch_size`={batch_size} is smaller than the number of sources "
            f"with a positive ratio ({len(active)}); every such source needs >= 1 per batch"
        )
    quotas = _apportion(weights, batch_size)
    zero = [k for k in active if quotas[k] == 0]
    if zero:
        raise ValueError(
            f"{_NAME}: `ratios`={ratios!r} with `batch_size`={batch_size} gives "
            f"quotas {quotas}: source(s) {zero} would never appear; raise their ratio "
            "or the batch size"
        )
    empty = [k for k in active if sizes[k] == 0]
    if empty:
        raise ValueError(
            f"{_NAME}: `source_sizes`={sizes} has empty source(s) {empty} with a positive ratio"
        )
    return quotas


def _check_world(
    num_replicas: Any, rank: Any, sampler: Sampler | None
) -> tuple[int | None, int | None]:
    """``num_replicas`` and ``rank``: as given, else the ``sampler``'s, else ``None``.

    ``None`` means "read from ``torch.distributed`` whenever the sampler is used".
    """
    if num_replicas is None:
        num_replicas = getattr(sampler, "num_replicas", None)
    if rank is None:
        rank = getattr(sampler, "rank", None)
    world = num_replicas if num_replicas is None else check_int(
        "num_replicas", num_replicas, 1, where=_NAME
    )
    return world, None if rank is None else check_int("rank", rank, 0, where=_NAME)


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def _record_arguments(owner: BatchSampler, **arguments: Any) -> None:
    """Keep the arguments where Lightning looks for them to re-create the batch sampler.

    Lightning's ``use_distributed_sampler`` re-creates a ``BatchSampler`` subclass from the
    arguments its patched ``__init__`` records (``__pl_saved_*``), with
    ``sampler=DistributedSampler(...)``; it patches only the classes that exist when it enters
    a ``*_dataloader`` hook. Recording them here too makes the re-creation work wherever the
    sampler was imported or created (inside a hook, outside one, first imported inside one).
    What Lightning recorded itself (it sets these before ``__init__`` runs) is kept.
    """
    if hasattr(owner, "__pl_saved_args") or type(owner).__init__ is not _INIT:
        return  # Lightning recorded them itself / a subclass's own arguments are unknown here
    object.__setattr__(owner, "__pl_saved_args", ())
    object.__setattr__(owner, "__pl_saved_kwargs", arguments)
    object.__setattr__(owner, "__pl_saved_arg_names", ())
    object.__setattr__(owner, "__pl_saved_default_kwargs", {})


class _EpochView(Sampler[int]):
    """The flat index stream of a ``MixingBatchSampler`` (its ``.sampler``).

    Lightning calls ``set_epoch`` on ``dataloader.batch_sampler.sampler`` (never on the batch
    sampler itself) at the start of every epoch; this view forwards it.
    """

    def __init__(self, owner: MixingBatchSampler) -> None:
        self._owner = owner

    def __iter__(self) -> Iterator[int]:
        for batch in self._owner:
            yield from batch

    def __len__(self) -> int:
        return self._owner.num_samples

    def set_epoch(self, epoch: int) -> None:
        self._owner.set_epoch(epoch)


class MixingBatchSampler(BatchSampler):
    """Batches of indices into ``ConcatDataset(sources)`` with every source in its exact quota.

    The fix for BatchNorm's first pitfall ("is each training batch a fair sample of the data?",
    Ioffe & Szegedy 2015): random batches from a concatenation are fair only on average, so with
    several sources (domains, real/fake) BatchNorm still sees a different mixture in every batch.
    Here every batch holds exactly the same number of examples of each source.

    Quotas: with weights ``w_i = ratios[i] / sum(ratios)`` (default: equal), the integer quotas
    ``q_i`` are the largest-remainder apportionment of ``batch_size`` (``floor(batch_size * w_i)``
    each, the rest one by one to the largest remainders, ties to the lower source index), so
    ``sum(q_i) == batch_size``. A source with a positive ratio must get ``q_i >= 1``.

    An epoch: each source's indices are permuted (``shuffle=True``) with a generator seeded
    ``seed + epoch``, identically on every rank; global batch ``b`` takes the ``b``-th run of
    ``q_i`` indices of every source and is shuffled inside. The number of full batches is
    ``B = min_i floor(n_i / q_i)`` over sources with ``q_i > 0`` (the epoch ends when any source
    can no longer fill its quota; no index is used twice in an epoch). Under DDP the full
    batches are dealt round-robin, global batch ``b`` to rank ``b % num_replicas``; the last
    ``B % num_replicas`` full batches are dropped so that every rank gets exactly
    ``F = B // num_replicas`` of them.

    ``drop_last=False`` adds one last, smaller batch per rank built from what is left,
    ``R_i = n_i - F * num_replicas * q_i`` indices of source ``i``, of which each rank may use
    ``a_i = floor(R_i / num_replicas)``: its size is the largest ``m < batch_size`` whose
    apportionment ``c_i(m)`` of the same ratios fits, ``c_i(m) <= a_i`` for every source, and
    its composition is ``c_i(m)`` (the same on every rank, disjoint indices). When no ``m >= 1``
    fits there is no last batch. ``len()`` counts it, so every rank has the same ``len()``.

    ``shuffle=False``: sources are read in order and a batch lists source 0's quota, then source
    1's, ... (no shuffling at all, for evaluation).

    Lightning (verified with Lightning 2.6, ``strategy="ddp"``): give it as a DataLoader's
    ``batch_sampler``, wherever the DataLoader or the sampler is created or this module
    imported (inside a ``*_dataloader`` hook or outside, first imported inside one). With the
    default ``Trainer(use_distributed_sampler=True)``, Lightning re-creates a custom
    ``BatchSampler`` subclass from the arguments it was built with plus
    ``sampler=DistributedSampler(...)``; the sampler records its own arguments where Lightning
    reads them (Lightning records them only for classes that existed when it entered the
    hook), and the re-created sampler takes ``num_replicas`` and ``rank`` from the injected
    sampler (unless given explicitly), never uses its order, and yields the same batches.
    ``Trainer(use_distributed_sampler=False)`` also works: Lightning then leaves it alone and
    the sampler reads rank and world size from ``torch.distributed`` when it is used. (A
    subclass with its own ``__init__`` must be created inside a hook, after it was imported,
    or used with ``use_distributed_sampler=False``; otherwise Lightning calls it with a sampler
    as first argument, which raises a ``TypeError`` saying so.) Lightning calls ``set_epoch``
    on ``dataloader.batch_sampler.sampler`` each epoch; ``self.sampler`` (the flat view of this
    rank's indices) forwards it here, so every epoch is reshuffled.

    Args:
        source_sizes: number of examples of each source, in ``ConcatDataset`` order.
        batch_size: examples per batch (per rank), split into the quotas.
        ratios: relative share of each source, ``>= 0``, finite, not all zero. Default ``None``:
            equal shares.
        shuffle: permute each source every epoch and shuffle inside each batch. Default ``True``.
        drop_last: drop what cannot fill a full batch. Default ``True``; ``False`` adds the last
            smaller batch described above.
        seed: base seed; epoch ``e`` uses ``seed + e``. Default ``0``.
        num_replicas: number of ranks. Default ``None``: the world size of the initialised
            ``torch.distributed`` group, else 1, read whenever the sampler is used (so a sampler
            built before the process group is initialised still shards correctly).
        rank: this rank. Default ``None``: ``torch.distributed``'s rank, else 0 (read likewise).
        sampler: for Lightning's re-instantiation only (see above): a ``DistributedSampler``
            whose ``num_replicas``/``rank`` are used when those arguments are ``None``. Its
            order is never used. Default ``None``.

    Shape:
        Each batch is a ``list[int]`` of length ``batch_size`` (the last one shorter when
        ``drop_last=False``); ``len(sampler)`` batches per epoch on every rank.

    Raises:
        ValueError: empty or negative ``source_sizes``; ``batch_size`` not a positive integer or
            smaller than the number of sources with a positive ratio; ``ratios`` of the wrong
            length, negative, NaN/inf or all zero; a positive ratio whose quota is 0; a source
            too small for a single batch per rank; ``rank`` outside ``[0, num_replicas)``.
        TypeError: called with a sampler in place of ``source_sizes`` (Lightning re-creating a
            subclass whose arguments it did not record).

    Example:
        >>> s = MixingBatchSampler([6, 12], batch_size=3, ratios=[1, 2], seed=0)
        >>> s.quotas, len(s)
        ([1, 2], 6)
        >>> [sum(i < 6 for i in batch) for batch in s]
        [1, 1, 1, 1, 1, 1]
        >>> sorted(i for batch in s for i in batch) == list(range(18))
        True
    """

    def __init__(
        self,
        source_sizes: Sequence[int],
        batch_size: int,
        ratios: Sequence[float] | None = None,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        sampler: Sampler | None = None,
    ) -> None:
        sizes = _check_sizes(source_sizes)
        self.batch_size = check_int("batch_size", batch_size, 1, where=_NAME)
        self.shuffle = _check_bool("shuffle", shuffle)
        self.drop_last = _check_bool("drop_last", drop_last)
        self.seed = check_int("seed", seed, 0, where=_NAME)
        given, self.weights = _check_ratios(ratios, len(sizes))
        self.quotas = _check_quotas(given, self.weights, self.batch_size, sizes)
        self._num_replicas, self._rank = _check_world(num_replicas, rank, sampler)
        self.source_sizes = sizes
        self.offsets = [sum(sizes[:k]) for k in range(len(sizes))]
        self.epoch = 0
        self._global_full = min(n // q for n, q in zip(sizes, self.quotas, strict=True) if q > 0)
        self._layouts: dict[int, tuple[int, list[int]]] = {}
        self._check_fits()
        _record_arguments(
            self,
            source_sizes=sizes,
            batch_size=self.batch_size,
            ratios=given,
            shuffle=self.shuffle,
            drop_last=self.drop_last,
            seed=self.seed,
            num_replicas=num_replicas,
            rank=rank,
            sampler=sampler,
        )

    def _check_fits(self) -> None:
        """Refuse an explicit ``rank >= num_replicas`` and sources too small for one batch."""
        if self._rank is not None and self._rank >= self.num_replicas:
            raise ValueError(
                f"{_NAME}: `rank`={self._rank} must be < `num_replicas`={self.num_replicas}"
            )
        if len(self) == 0:
            raise ValueError(
                f"{_NAME}: `source_sizes`={self.source_sizes} cannot fill a single batch of "
                f"quotas {self.quotas} per rank on {self.num_replicas} rank(s)"
            )

    @property
    def num_replicas(self) -> int:
        """Number of ranks: the argument, else the world size of ``torch.distributed``, else 1.

        Read at every use, so a sampler built before the process group exists still shards.
        """
        if self._num_replicas is not None:
            return self._num_replicas
        return dist.get_world_size() if _dist_ready() else 1

    @property
    def rank(self) -> int:
        """This rank: the argument, else ``torch.distributed``'s rank, else 0."""
        rank = self._rank
        if rank is None:
            rank = dist.get_rank() if _dist_ready() else 0
        if rank >= self.num_replicas:
            raise ValueError(f"{_NAME}: `rank`={rank} must be < `num_replicas`={self.num_replicas}")
        return rank

    def _layout(self) -> tuple[int, list[int]]:
        """Full batches per rank and the last batch's quotas, for the current world size."""
        world = self.num_replicas
        if world not in self._layouts:
            full = self._global_full // world
            last = [0] * len(self.source_sizes)
            if not self.drop_last:
                left = zip(self.source_sizes, self.quotas, strict=True)
                avail = [(n - full * world * q) // world for n, q in left]
                for m in range(self.batch_size - 1, 0, -1):
                    shares = _apportion(self.weights, m)
                    if all(c <= a for c, a in zip(shares, avail, strict=True)):
                        last = shares
                        break
            self._layouts[world] = (full, last)
        return self._layouts[world]

    @property
    def num_full_batches(self) -> int:
        """Full batches per rank and epoch."""
        return self._layout()[0]

    @property
    def last_quotas(self) -> list[int]:
        """Per-source counts of the last, smaller batch (all zero: no such batch)."""
        return self._layout()[1]

    @property
    def sampler(self) -> _EpochView:  # type: ignore[override]
        """The flat index stream of this rank's batches; its ``set_epoch`` is this sampler's."""
        return _EpochView(self)

    @property
    def num_samples(self) -> int:
        """Indices this rank yields per epoch (all batches together)."""
        full, last = self._layout()
        return full * self.batch_size + sum(last)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch``: the permutations use the seed ``seed + epoch``."""
        self.epoch = check_int("epoch", epoch, 0, where=_NAME)

    def __len__(self) -> int:
        full, last = self._layout()
        return full + (1 if sum(last) > 0 else 0)

    def _inner_shuffle(self, batches: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if not self.shuffle or batches.numel() == 0:
            return batches
        keys = torch.rand(batches.shape, generator=generator)
        return batches.gather(1, keys.argsort(dim=1))

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        world, rank = self.num_replicas, self.rank
        full, last_quotas = self._layout()
        full_parts, last_parts = [], []
        for size, offset, q, c in zip(
            self.source_sizes, self.offsets, self.quotas, last_quotas, strict=True
        ):
            if q == 0:
                continue
            if self.shuffle:
                order = torch.randperm(size, generator=generator) + offset
            else:
                order = torch.arange(offset, offset + size)
            used = full * world * q
            full_parts.append(order[:used].view(full * world, q))
            last_parts.append(order[used : used + world * c].view(world, c))
        batches = self._inner_shuffle(torch.cat(full_parts, dim=1), generator)
        yield from batches[rank::world].tolist()
        last = self._inner_shuffle(torch.cat(last_parts, dim=1), generator)[rank]
        if last.numel() > 0:
            yield last.tolist()

    def __repr__(self) -> str:
        return (
            f"{_NAME}(source_sizes={self.source_sizes}, batch_size={self.batch_size}, "
            f"quotas={self.quotas}, shuffle={self.shuffle}, drop_last={self.drop_last}, "
            f"seed={self.seed}, num_replicas={self._num_replicas}, rank={self._rank})"
        )


_INIT = MixingBatchSampler.__init__
