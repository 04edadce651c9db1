"""MixingBatchSampler: exact quotas, no repeats, DDP sharding, epochs, len, errors, Lightning."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from itertools import product
from pathlib import Path

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, TensorDataset

from lightning_norms.data import MixingBatchSampler
from tests._dist import run_ddp, run_script


def _source(index: int, sizes: list[int]) -> int:
    """Which source a ConcatDataset index belongs to (reference, written out)."""
    for k, end in enumerate(torch.tensor(sizes).cumsum(0).tolist()):
        if index < end:
            return k
    raise AssertionError(f"index {index} beyond {sum(sizes)}")


def _composition(batch: list[int], sizes: list[int]) -> list[int]:
    counts = [0] * len(sizes)
    for i in batch:
        counts[_source(i, sizes)] += 1
    return counts


def _reference_quotas(ratios: list[float], batch_size: int) -> list[int]:
    """Largest remainder, written independently: floors, then +1 by descending remainder."""
    total = sum(ratios)
    exact = [batch_size * r / total for r in ratios]
    quotas = [math.floor(e + 1e-9) for e in exact]
    rest = sorted(range(len(ratios)), key=lambda k: (-round(exact[k] - quotas[k], 9), k))
    for k in rest[: batch_size - sum(quotas)]:
        quotas[k] += 1
    return quotas


@pytest.mark.parametrize(
    ("sizes", "batch_size", "ratios", "quotas"),
    [
        ([50, 50], 10, None, [5, 5]),
        ([30, 90], 8, [1, 3], [2, 6]),
        ([40, 25, 60], 9, [2, 1, 3], [3, 2, 4]),
        ([40, 25, 60], 6, None, [2, 2, 2]),
        ([100, 100], 10, [0.1, 0.9], [1, 9]),
    ],
)
def test_every_batch_has_the_exact_quota(sizes, batch_size, ratios, quotas):
    s = MixingBatchSampler(sizes, batch_size, ratios=ratios, seed=3)
    assert s.quotas == quotas
    batches = list(s)
    expected_batches = min(n // q for n, q in zip(sizes, quotas, strict=True))
    assert len(batches) == expected_batches
    for batch in batches:
        assert len(batch) == batch_size
        assert _composition(batch, sizes) == quotas


def test_quotas_match_largest_remainder_reference():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        k = int(torch.randint(1, 5, (1,), generator=g))
        ratios = (torch.randint(1, 20, (k,), generator=g)).tolist()
        batch_size = int(torch.randint(k, 40, (1,), generator=g))
        expected = _reference_quotas(ratios, batch_size)
        if min(expected) == 0:
            with pytest.raises(ValueError, match="ratios"):
                MixingBatchSampler([1000] * k, batch_size, ratios=ratios)
            continue
        s = MixingBatchSampler([1000] * k, batch_size, ratios=ratios)
        assert s.quotas == expected
        assert sum(s.quotas) == batch_size


def test_batches_are_shuffled_inside_and_across_sources():
    s = MixingBatchSampler([64, 64], 16, seed=0)
    batches = list(s)
    # inside a batch the sources are interleaved, not source 0 then source 1
    layouts = {tuple(_source(i, [64, 64]) for i in b) for b in batches}
    assert tuple([0] * 8 + [1] * 8) not in layouts
    assert len(layouts) > 1
    # each source is permuted, not read in order
    firsts = [min(i for i in b if i < 64) for b in batches]
    assert firsts != sorted(firsts)


def test_shuffle_false_reads_in_order():
    s = MixingBatchSampler([6, 9], 5, ratios=[2, 3], shuffle=False)
    assert list(s) == [[0, 1, 6, 7, 8], [2, 3, 9, 10, 11], [4, 5, 12, 13, 14]]


COMBOS = list(
    product(
        [[10, 7, 30], [64, 64], [33, 101], [5, 5, 5, 5], [200]],
        [1, 4, 7],
        [True, False],
        [1, 2, 3],
        [True, False],
    )
)


@pytest.mark.parametrize(("sizes", "batch_size", "drop_last", "world", "shuffle"), COMBOS)
def test_len_no_repeats_and_ranks(sizes, batch_size, drop_last, world, shuffle):
    if batch_size < len(sizes):
        with pytest.raises(ValueError, match="batch_size"):
            MixingBatchSampler(sizes, batch_size)
        return
    try:
        samplers = [
            MixingBatchSampler(
                sizes, batch_size, None, shuffle, drop_last, 5, num_replicas=world, rank=r
            )
            for r in range(world)
        ]
    except ValueError as err:  # only legitimate reason: not one batch per rank
        assert "cannot fill a single batch" in str(err)
        quota = MixingBatchSampler(sizes, batch_size).quotas
        assert min(n // q for n, q in zip(sizes, quota, strict=True)) < world
        return
    per_rank = [list(s) for s in samplers]
    quotas = samplers[0].quotas
    seen: list[int] = []
    for s, batches in zip(samplers, per_rank, strict=True):
        assert len(batches) == len(s) == len(samplers[0])
        assert sum(len(b) for b in batches) == s.num_samples == len(list(s.sampler))
        for b in batches[: s.num_full_batches]:
            assert _composition(b, sizes) == quotas
        seen += [i for b in batches for i in b]
    assert len(seen) == len(set(seen)), "an index repeats within the epoch"
    assert all(0 <= i < sum(sizes) for i in seen)
    # same composition position by position on every rank (incl. the last, smaller batch)
    for position in range(len(samplers[0])):
        comps = [_composition(batches[position], sizes) for batches in per_rank]
        assert all(c == comps[0] for c in comps)
    # full batches: exactly floor(min_i n_i // q_i / world) per rank
    full = min(n // q for n, q in zip(sizes, quotas, strict=True)) // world
    assert samplers[0].num_full_batches == full
    assert len(samplers[0]) == full + (0 if drop_last else int(sum(samplers[0].last_quotas) > 0))


def test_ranks_take_the_single_process_batches_round_robin():
    sizes, ratios = [40, 25, 60], [2, 1, 3]
    single = list(MixingBatchSampler(sizes, 9, ratios=ratios, seed=7, num_replicas=1, rank=0))
    for world in (2, 3):
        for r in range(world):
            mine = list(
                MixingBatchSampler(sizes, 9, ratios=ratios, seed=7, num_replicas=world, rank=r)
            )
            full = len(single) // world
            assert len(mine) == full
            for j, batch in enumerate(mine):
                assert sorted(batch) == sorted(single[j * world + r])


@pytest.mark.parametrize(
    ("sizes", "batch_size", "ratios", "world", "last"),
    [
        # R = [1, 3] after 5 full batches: m=3 would need [2, 1] > [1, 3]; m=2 gives [1, 1]
        ([11, 13], 4, None, 1, [1, 1]),
        # quotas [2, 1, 4]; 2 full per rank; left [2, 3, 14] -> 1, 1, 7 per rank -> m=5: [1, 1, 3]
        ([10, 7, 30], 7, [2, 1, 4], 2, [1, 1, 3]),
        # nothing left
        ([10, 10], 4, None, 1, [0, 0]),
        # left [1, 0]: m=3 -> [2, 1] and m=2 -> [1, 1] do not fit; m=1 -> [1, 0] (tie to source 0)
        ([11, 10], 4, None, 1, [1, 0]),
    ],
)
def test_drop_last_false_last_batch(sizes, batch_size, ratios, world, last):
    samplers = [
        MixingBatchSampler(
            sizes, batch_size, ratios=ratios, drop_last=False, num_replicas=world, rank=r
        )
        for r in range(world)
    ]
    for s in samplers:
        assert s.last_quotas == last
        batches = list(s)
        if sum(last):
            assert _composition(batches[-1], sizes) == last
            assert len(batches) == s.num_full_batches + 1
        else:
            assert len(batches) == s.num_full_batches
    keep = MixingBatchSampler(sizes, batch_size, ratios=ratios, num_replicas=world, rank=0)
    assert len(keep) == samplers[0].num_full_batches


def test_set_epoch_reproducible_and_different():
    a = MixingBatchSampler([30, 50], 8, seed=1)
    b = MixingBatchSampler([30, 50], 8, seed=1)
    first = list(a)
    assert first == list(b) == list(a)
    a.set_epoch(1)
    second = list(a)
    assert second != first
    assert sorted(map(sorted, second)) != sorted(map(sorted, first))
    b.sampler.set_epoch(1)  # what Lightning calls: dataloader.batch_sampler.sampler.set_epoch
    assert b.epoch == 1 and list(b) == second
    a.set_epoch(0)
    assert list(a) == first
    assert list(MixingBatchSampler([30, 50], 8, seed=2)) != first


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"source_sizes": [10, 10], "batch_size": 4, "ratios": [1]}, "ratios"),
        ({"source_sizes": [10, 10], "batch_size": 4, "ratios": [1, -1]}, r"ratios\[1\]"),
        ({"source_sizes": [10, 10], "batch_size": 4, "ratios": [1, float("nan")]}, "ratios"),
        ({"source_sizes": [10, 10], "batch_size": 4, "ratios": [1, float("inf")]}, "ratios"),
        ({"source_sizes": [10, 10], "batch_size": 4, "ratios": [0, 0]}, "ratios"),
        ({"source_sizes": [10, 10], "batch_size": 4, "ratios": ["a", 1]}, "ratios"),
        ({"source_sizes": [100, 100], "batch_size": 4, "ratios": [1, 100]}, "quotas"),
        ({"source_sizes": [10, 10, 10], "batch_size": 2}, "batch_size"),
        ({"source_sizes": [10, 10], "batch_size": 0}, "batch_size"),
        ({"source_sizes": [10, 10], "batch_size": -4}, "batch_size"),
        ({"source_sizes": [10, 10], "batch_size": 2.5}, "batch_size"),
        ({"source_sizes": [10, 10], "batch_size": True}, "batch_size"),
        ({"source_sizes": [], "batch_size": 4}, "source_sizes"),
        ({"source_sizes": [10, -1], "batch_size": 4}, r"source_sizes\[1\]"),
        ({"source_sizes": [10, 0], "batch_size": 4}, "source_sizes"),
        ({"source_sizes": 10, "batch_size": 4}, "source_sizes"),
        ({"source_sizes": [1, 100], "batch_size": 4}, "single batch"),
        ({"source_sizes": [10, 10], "batch_size": 4, "num_replicas": 0}, "num_replicas"),
        ({"source_sizes": [10, 10], "batch_size": 4, "num_replicas": 2, "rank": 2}, "rank"),
        ({"source_sizes": [10, 10], "batch_size": 4, "rank": -1}, "rank"),
        ({"source_sizes": [10, 10], "batch_size": 4, "shuffle": "yes"}, "shuffle"),
        ({"source_sizes": [10, 10], "batch_size": 4, "drop_last": 1}, "drop_last"),
        ({"source_sizes": [10, 10], "batch_size": 4, "seed": -1}, "seed"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MixingBatchSampler(**kwargs)


def test_zero_ratio_source_is_never_used():
    s = MixingBatchSampler([10, 3, 10], 4, ratios=[1, 0, 1])
    assert s.quotas == [2, 0, 2]
    assert all(_composition(b, [10, 3, 10]) == [2, 0, 2] for b in s)
    assert len(s) == 5


def test_accepts_numpy_and_tensor_arguments():
    import numpy as np

    s = MixingBatchSampler(np.array([12, 24]), 6, ratios=torch.tensor([1.0, 2.0]))
    assert s.quotas == [2, 4] and len(s) == 6


def test_sampler_as_source_sizes_names_the_fix():
    with pytest.raises(TypeError, match="use_distributed_sampler=False"):
        MixingBatchSampler(DistributedSampler(range(10), num_replicas=2, rank=0), 4)


def test_dataloader_yields_the_sampler_batches():
    data = TensorDataset(torch.arange(30))
    s = MixingBatchSampler([10, 20], 6, ratios=[1, 2], seed=4)
    loader = DataLoader(data, batch_sampler=s)
    assert len(loader) == len(s) == 5
    assert [b[0].tolist() for b in loader] == list(s)


def test_lightning_reinstantiation_adopts_rank_from_injected_sampler():
    """What Lightning does to a DataLoader made in a `*_dataloader` hook under DDP."""
    from lightning.fabric.utilities.data import _replace_dunder_methods, _set_sampler_epoch
    from lightning.pytorch.utilities.data import _update_dataloader

    data = TensorDataset(torch.arange(40))
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = DataLoader(data, batch_sampler=MixingBatchSampler([10, 30], 4, ratios=[1, 3]))
    injected = DistributedSampler(data, num_replicas=2, rank=1, shuffle=True, seed=0)
    new = _update_dataloader(loader, injected)
    assert isinstance(new.batch_sampler, MixingBatchSampler)
    assert (new.batch_sampler.num_replicas, new.batch_sampler.rank) == (2, 1)
    reference = MixingBatchSampler([10, 30], 4, ratios=[1, 3], num_replicas=2, rank=1)
    assert [b[0].tolist() for b in new] == list(reference)
    _set_sampler_epoch(new, 3)
    assert new.batch_sampler.epoch == 3
    reference.set_epoch(3)
    assert [b[0].tolist() for b in new] == list(reference)


def _fresh_sampler_class() -> type:
    """``MixingBatchSampler`` as a class first created now (a first import of its module)."""
    import importlib.util

    from lightning_norms.data import sampler as module

    spec = importlib.util.spec_from_file_location("fresh_sampler", module.__file__)
    assert spec is not None and spec.loader is not None
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    return fresh.MixingBatchSampler


@pytest.mark.parametrize("where", ["first_imported_in_hook", "created_before_hook", "no_hook"])
def test_lightning_reinstantiation_wherever_it_was_imported_or_created(where: str):
    """Lightning records a BatchSampler's arguments only for classes that exist when it enters
    a `*_dataloader` hook; the sampler records them itself for every other case."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.utilities.data import _update_dataloader

    data = TensorDataset(torch.arange(40))
    if where == "no_hook":
        loader = DataLoader(data, batch_sampler=MixingBatchSampler([10, 30], 4, ratios=[1, 3]))
    else:
        early = MixingBatchSampler([10, 30], 4, ratios=[1, 3])
        with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
            if where == "first_imported_in_hook":
                early = _fresh_sampler_class()([10, 30], 4, ratios=[1, 3])
            loader = DataLoader(data, batch_sampler=early)
    new = _update_dataloader(loader, DistributedSampler(data, num_replicas=2, rank=1))
    assert type(new.batch_sampler) is type(loader.batch_sampler)
    assert (new.batch_sampler.num_replicas, new.batch_sampler.rank) == (2, 1)
    reference = MixingBatchSampler([10, 30], 4, ratios=[1, 3], num_replicas=2, rank=1)
    assert [b[0].tolist() for b in new] == list(reference)


def test_subclass_with_its_own_init_created_outside_a_hook_names_the_fix():
    from lightning.pytorch.utilities.data import _update_dataloader

    class Custom(MixingBatchSampler):
        def __init__(self, sizes, batch_size, **kwargs):
            super().__init__(sizes, batch_size, **kwargs)

    data = TensorDataset(torch.arange(40))
    loader = DataLoader(data, batch_sampler=Custom([10, 30], 4, ratios=[1, 3]))
    with pytest.raises(TypeError, match="use_distributed_sampler=False"):
        _update_dataloader(loader, DistributedSampler(data, num_replicas=2, rank=0))


def _ddp_defaults(rank: int, world_size: int, prebuilt: MixingBatchSampler) -> dict:
    built_here = MixingBatchSampler([20, 60], 8, ratios=[1, 3], seed=9)
    return {
        "here": (built_here.num_replicas, built_here.rank, list(built_here)),
        "prebuilt": (prebuilt.num_replicas, prebuilt.rank, list(prebuilt)),
    }


@pytest.mark.ddp
def test_rank_and_world_default_from_torch_distributed():
    # built before any process group exists, pickled into the ranks: still shards there
    prebuilt = MixingBatchSampler([20, 60], 8, ratios=[1, 3], seed=9)
    assert (prebuilt.num_replicas, prebuilt.rank, len(prebuilt)) == (1, 0, 10)
    results = run_ddp(_ddp_defaults, prebuilt, world_size=2)
    for key in ("here", "prebuilt"):
        per_rank = [r[key] for r in results]
        assert [(w, r) for w, r, _ in per_rank] == [(2, 0), (2, 1)]
        batches = [b for _, _, b in per_rank]
        assert len(batches[0]) == len(batches[1]) == 5
        for r, mine in enumerate(batches):
            assert mine == list(
                MixingBatchSampler([20, 60], 8, ratios=[1, 3], seed=9, num_replicas=2, rank=r)
            )
            assert all(_composition(b, [20, 60]) == [2, 6] for b in mine)
        flat = [i for b in batches[0] + batches[1] for i in b]
        assert len(flat) == len(set(flat)) == 80


LIGHTNING_SCRIPT = """
import json, sys
from pathlib import Path
import torch
import lightning as L
from torch.utils.data import DataLoader, Dataset
IMPORT_AT_TOP
from tests._boring import BoringNormModel, boring_trainer

SIZES, RATIOS, BATCH = [20, 45, 37], [1, 2, 1], 8


class Indices(Dataset):
    def __len__(self):
        return sum(SIZES)

    def __getitem__(self, i):
        return torch.tensor(i), torch.ones(2)


class Data(L.LightningDataModule):
    def train_dataloader(self):
        IMPORT_IN_HOOK
        sampler = MixingBatchSampler(SIZES, BATCH, ratios=RATIOS, seed=11)
        return DataLoader(Indices(), batch_sampler=sampler)


class Model(BoringNormModel):
    def __init__(self):
        super().__init__(body=torch.nn.Linear(2, 1))
        self.record = []

    def training_step(self, batch, batch_idx):
        bs = self.trainer.train_dataloader.batch_sampler
        assert type(bs).__name__ == "MixingBatchSampler", type(bs)
        self.record.append({
            "epoch": self.current_epoch, "indices": batch[0].tolist(),
            "world": bs.num_replicas, "rank": bs.rank, "len": len(bs),
            "sampler_epoch": bs.epoch,
        })
        return self(batch[1]).sum()

    def on_train_end(self):
        with open(f"record_{self.global_rank}.json", "w") as f:
            json.dump(self.record, f)


if __name__ == "__main__":
    trainer = boring_trainer(Path("."), strategy="ddp", devices=2, max_epochs=2)
    trainer.fit(Model(), datamodule=Data())
"""


IMPORT = "from lightning_norms.data import MixingBatchSampler"


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.parametrize("first_import", ["top", "in_hook"])
def test_lightning_ddp_fit_sees_exact_quotas_on_both_ranks(tmp_path: Path, first_import: str):
    # the default Trainer(use_distributed_sampler=True): Lightning re-creates the sampler, also
    # when the module is first imported inside train_dataloader() (issue 17, item 14)
    top, hook = (IMPORT, "pass") if first_import == "top" else ("", IMPORT)
    script = LIGHTNING_SCRIPT.replace("IMPORT_AT_TOP", top).replace("IMPORT_IN_HOOK", hook)
    run_script(script, tmp_path)
    sizes = [20, 45, 37]
    records = [json.loads((tmp_path / f"record_{r}.json").read_text()) for r in range(2)]
    for epoch in (0, 1):
        per_rank = [[s for s in rec if s["epoch"] == epoch] for rec in records]
        # quotas [2, 4, 2]; B = min(10, 11, 18) = 10 global batches -> 5 per rank
        assert [len(steps) for steps in per_rank] == [5, 5]
        flat = []
        for r, steps in enumerate(per_rank):
            reference = MixingBatchSampler(
                sizes, 8, ratios=[1, 2, 1], seed=11, num_replicas=2, rank=r
            )
            reference.set_epoch(epoch)
            assert [s["indices"] for s in steps] == list(reference)
            for s in steps:
                assert (s["world"], s["rank"], s["len"], s["sampler_epoch"]) == (2, r, 5, epoch)
                assert _composition(s["indices"], sizes) == [2, 4, 2]
                flat += s["indices"]
        assert len(flat) == len(set(flat)) == 80, "ranks overlap or an index repeats"
    epoch_sets = [
        sorted(i for s in records[0] if s["epoch"] == e for i in s["indices"]) for e in (0, 1)
    ]
    assert epoch_sets[0] != epoch_sets[1], "set_epoch did not reach the sampler"


def test_importing_the_sampler_does_not_import_lightning():
    code = (
        "import sys\n"
        "from lightning_norms.data import MixingBatchSampler, mix_real_fake\n"
        "assert 'lightning' not in sys.modules and 'pytorch_lightning' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_numpy_float_ratios_give_exact_quotas() -> None:
    import numpy as np

    ratios = [np.float32(0.25), np.float32(0.75)]
    sampler = MixingBatchSampler([40, 40], batch_size=8, ratios=ratios)
    assert sampler.quotas == [2, 6]
