"""Real 2-process gloo DDP: a Lightning fit with ``NormSync``, and gradient penalties.

A 2-process gloo DDP fit with ``NormSync`` on torchvision residual blocks (inplace ReLU).

``Trainer(accelerator="cpu", devices=2, strategy="ddp", plugins=[NormSync()])`` trains
``tests._zoo.ResidualNet`` — a torchvision ``BasicBlock`` with ``nn.BatchNorm2d`` (turned into a
synced layer by the plugin) and one converted to ``DomainBatchNorm2d(sync=True)``, both with
``ReLU(inplace=True)`` and ``out += identity`` after the norms — for two steps on rank-dependent
data. The reference is one process training the same network on the concatenated global batch:
synced statistics and DDP's averaged gradients make the two runs the same computation, so the
running statistics and weights must agree (float32 rounding of the all-reduced sums), and both
ranks must end bit-identical.

The gradient penalty (WGAN-GP, double backward) through each synced layer on two ranks, each
holding half of the batch, must give the penalty and the parameter gradients (summed over the
ranks, as DDP's all-reduce does) of one process running the same layers on the whole batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lightning_norms
from lightning_norms import BatchRenorm2d, DomainBatchNorm2d
from lightning_norms.distributed import SyncedBatchNorm2d
from tests._dist import run_ddp, run_script
from tests._zoo import (
    GP_IDS,
    ResidualNet,
    gradient_penalty,
    interpolates,
    make_critic,
    residual_sample,
)

pytestmark = [pytest.mark.ddp, pytest.mark.slow]

STEPS = 2
LOCAL_BATCH = 4
WORLD_SIZE = 2
LR = 0.1

SCRIPT = f"""
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from lightning.pytorch import LightningModule, Trainer

import lightning_norms
from tests._zoo import ResidualNet, residual_sample


class Data(Dataset):
    def __len__(self):
        return {STEPS * LOCAL_BATCH * WORLD_SIZE}

    def __getitem__(self, i):
        return (*residual_sample(i), i)


class Module(LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = ResidualNet(sync=True)
        self.synced = set()
        self.seen = []

    def training_step(self, batch, batch_idx):
        x, y, d, i = batch
        self.synced.add(type(self.net.block.bn1).__name__)
        self.seen.append(i.tolist())
        with lightning_norms.domain(self.net, d):
            return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr={LR})

    def train_dataloader(self):
        return DataLoader(Data(), batch_size={LOCAL_BATCH}, shuffle=False)


model = Module()
trainer = Trainer(
    strategy="ddp", accelerator="cpu", devices={WORLD_SIZE}, max_steps={STEPS},
    plugins=[lightning_norms.NormSync()], logger=False, enable_checkpointing=False,
    enable_progress_bar=False, enable_model_summary=False,
)
trainer.fit(model)
assert model.synced == {{"SyncedBatchNorm2d"}}, model.synced
torch.save((model.net.state_dict(), model.seen), f"state_{{trainer.global_rank}}.pt")
"""


def _reference(batches: list[list[int]]) -> dict[str, torch.Tensor]:
    """One process, same init, each step on the global batch (both ranks' samples)."""
    torch.manual_seed(0)
    net = ResidualNet(sync=False).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    for indices in batches:
        samples = [residual_sample(i) for i in indices]
        x = torch.stack([s[0] for s in samples])
        y = torch.tensor([s[1] for s in samples])
        d = torch.tensor([s[2] for s in samples])
        optimizer.zero_grad()
        with lightning_norms.domain(net, d):
            F.cross_entropy(net(x), y).backward()
        optimizer.step()
    return net.state_dict()


def test_ddp_fit_with_normsync_matches_single_process_global_batch(tmp_path):
    run_script(SCRIPT, tmp_path)
    states, seen = zip(
        *(torch.load(tmp_path / f"state_{r}.pt") for r in range(WORLD_SIZE)), strict=True
    )
    # the samples each rank trained on, per step (the DistributedSampler's shuffled split)
    assert all(len(steps) == STEPS for steps in seen)
    global_batches = [seen[0][step] + seen[1][step] for step in range(STEPS)]
    assert sorted(i for batch in global_batches for i in batch) == list(
        range(STEPS * LOCAL_BATCH * WORLD_SIZE)
    )
    expected = _reference(global_batches)
    assert states[0].keys() == states[1].keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(states[0][key], states[1][key]), key  # both ranks identical
        torch.testing.assert_close(
            states[0][key], value, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}"
        )
    # the control: rank 0 alone on its own batches (what unsynced layers would see) ends far
    # from the global-batch statistics, so the comparison above can fail
    local = _reference(list(seen[0]))
    for key in ("block.bn1.running_var", "domain_block.bn2.running_mean"):
        assert not torch.allclose(local[key], expected[key], rtol=1e-2, atol=1e-3), key


# synced layer -> per-sample domain ids of the whole batch (None: not a domain layer)
SYNCED = {
    "synced_bn": (SyncedBatchNorm2d, None),
    "domain_sync_mixed_ids": (lambda c: DomainBatchNorm2d(c, num_domains=2, sync=True), GP_IDS),
    "renorm_sync": (
        lambda c: BatchRenorm2d(c, r_max=1.5, d_max=0.5, warmup_steps=0, sync=True),
        None,
    ),
}
HALVES = (torch.tensor([0, 2, 4, 6]), torch.tensor([1, 3, 5, 7]))


def _penalty_on_rank(rank: int, world_size: int) -> dict[str, tuple]:
    """Every synced case on this rank's half: ``(penalty part, d penalty / d params)``."""
    results = {}
    for case, (norm, ids) in SYNCED.items():
        rows = HALVES[rank]
        local_ids = None if ids is None else ids[rows]
        penalty, _, grads = gradient_penalty(
            make_critic(norm), interpolates()[rows], local_ids, total=len(GP_IDS)
        )
        results[case] = (penalty, grads)
    return results


@pytest.mark.xdist_group("zoo_ddp_penalty")  # one worker: the module fixture spawns once
@pytest.mark.parametrize("case", list(SYNCED))
def test_gradient_penalty_through_synced_layers_matches_single_process(case, ranks):
    norm, ids = SYNCED[case]
    expected_penalty, _, expected = gradient_penalty(make_critic(norm), interpolates(), ids)
    parts = [rank_results[case] for rank_results in ranks]
    torch.testing.assert_close(sum(p for p, _ in parts), expected_penalty, rtol=1e-9, atol=1e-12)
    for name, value in expected.items():
        if value is None:  # the head's bias: dD/dx does not depend on it
            assert all(grads[name] is None for _, grads in parts)
            continue
        summed = sum(grads[name] for _, grads in parts)
        torch.testing.assert_close(
            summed, value, rtol=1e-7, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, tuple]]:
    """One 2-rank spawn for every case (spawning is the slow part)."""
    return run_ddp(_penalty_on_rank)
