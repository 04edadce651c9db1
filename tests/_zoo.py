"""Shared helpers of the model-zoo tests (``test_zoo.py``, ``test_zoo_ddp.py``).

Real models (torchvision and timm, ``weights=None``: nothing is downloaded), the
``convert_norms`` targets with their keyword arguments, deterministic non-trivial BatchNorm
state (so carrying it over is checked, not the fresh ``0 / 1`` statistics), and the small
residual network with inplace activations the DDP tests train.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models.resnet import BasicBlock
from torchvision.ops.misc import FrozenBatchNorm2d

import lightning_norms
from lightning_norms import convert_norms
from tests._layers import randomise, uniform

NUM_CLASSES = 10


def _timm(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)

    return build


def _tv(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        return getattr(torchvision.models, name)(weights=None, num_classes=NUM_CLASSES)

    return build


ZOO: dict[str, Callable[[], nn.Module]] = {
    "tv_resnet18": _tv("resnet18"),
    "tv_mobilenet_v3_small": _tv("mobilenet_v3_small"),
    "tv_efficientnet_b0": _tv("efficientnet_b0"),
    "tv_regnet_x_400mf": _tv("regnet_x_400mf"),
    "tv_densenet121": _tv("densenet121"),
    "timm_efficientnet_b0": _timm("efficientnet_b0"),
    "timm_mobilenetv3_small_100": _timm("mobilenetv3_small_100"),
    "timm_regnety_002": _timm("regnety_002"),
}

# convert_norms target -> its keyword arguments (API.md)
TARGETS: dict[str, dict[str, object]] = {
    "domain": {"num_domains": 2},
    "renorm": {},
    "layer2d": {},
    "group": {"num_groups": 1},
    "batch": {},
    "frozen": {},
}
# targets whose eval output equals the BatchNorm model's eval output
EVAL_EXACT = ("domain", "renorm", "batch", "frozen")


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every BatchNorm-type layer (``_BatchNorm`` or ``FrozenBatchNorm2d``), named, in order."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, (_BatchNorm, FrozenBatchNorm2d))
    ]


def build(name: str, seed: int = 0) -> nn.Module:
    """Zoo model ``name`` with seeded weights and seeded non-trivial BatchNorm state, in eval."""
    torch.manual_seed(seed)
    model = ZOO[name]()
    randomise_bn(model, seed)
    return model.eval()


ZOO_BN_STATE = {
    "weight": uniform(0.75, 1.25),
    "bias": uniform(-0.1, 0.1),
    "running_mean": uniform(-0.1, 0.1),
    "running_var": uniform(0.5, 1.5),
}


def randomise_bn(model: nn.Module, seed: int) -> None:
    """Set every BN layer's affine and running stats to seeded values near ``1 / 0``.

    Moderate values (mean ``+-0.1``, var in ``[0.5, 1.5]``, weight in ``[0.75, 1.25]``) keep a
    121-layer DenseNet's activations in range while making every layer's state distinct.
    """
    randomise((bn for _, bn in norm_layers(model)), ZOO_BN_STATE, seed=seed + 1000)


def inputs(seed: int = 0, n: int = 2, size: int = 64) -> tuple[Tensor, Tensor, Tensor]:
    """A seeded image batch, class labels and mixed per-sample domain ids (both domains)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    ids = torch.arange(n) % 2
    return x, y, ids[torch.randperm(n, generator=gen)]


def convert(model: nn.Module, target: str) -> nn.Module:
    """``convert_norms(model, target, **TARGETS[target])``."""
    return convert_norms(model, target, **TARGETS[target])


def run(model: nn.Module, x: Tensor, ids: int | Tensor | None) -> Tensor:
    """``model(x)``, inside ``lightning_norms.domain(model, ids)`` unless ``ids`` is None."""
    if ids is None:
        return model(x)
    with lightning_norms.domain(model, ids):
        return model(x)


@contextmanager
def deterministic() -> Iterator[None]:
    """Seed the RNG (dropout, drop-path) so two runs of a forward draw the same masks."""
    state = torch.get_rng_state()
    torch.manual_seed(1234)
    try:
        yield
    finally:
        torch.set_rng_state(state)


# --- the gradient-penalty tests' critic (float64) ---


GP_IDS = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])


class Critic(nn.Module):
    """conv -> norm -> SiLU -> strided conv -> norm -> SiLU -> mean -> linear, as a GAN's D."""

    def __init__(self, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.norm1 = norm(4)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.norm2 = norm(4)
        self.head = nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = F.silu(self.norm1(self.conv1(x)))
        h = F.silu(self.norm2(self.conv2(h)))
        return self.head(h.mean((2, 3)))


def make_critic(norm: Callable[[int], nn.Module]) -> Critic:
    """A seeded float64 critic in training mode, its norms' affine and running stats random."""
    torch.manual_seed(0)
    critic = Critic(norm).double().train()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in (critic.norm1, critic.norm2):
            layer.weight.copy_(torch.rand(layer.weight.shape, generator=gen) + 0.5)
            layer.bias.copy_(torch.rand(layer.bias.shape, generator=gen) - 0.5)
            layer.running_mean.copy_(torch.rand(layer.running_mean.shape, generator=gen) - 0.5)
            layer.running_var.copy_(torch.rand(layer.running_var.shape, generator=gen) + 0.5)
    return critic


def interpolates() -> Tensor:
    """WGAN-GP's ``x_hat``: 8 random interpolations between "real" and "fake" images."""
    gen = torch.Generator().manual_seed(2)
    real = torch.randn(8, 3, 6, 6, dtype=torch.float64, generator=gen) * 2 + 1
    fake = torch.randn(8, 3, 6, 6, dtype=torch.float64, generator=gen)
    alpha = torch.rand(8, 1, 1, 1, dtype=torch.float64, generator=gen)
    return alpha * real + (1 - alpha) * fake


def gradient_penalty(
    model: nn.Module, x_hat: Tensor, ids: int | Tensor | None, total: int | None = None
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """WGAN-GP: ``sum((|dD/dx_hat| - 1)^2) / total``, backpropagated to the parameters.

    ``total`` (default: the batch size) is the global batch size when a rank holds a part.
    """
    x_hat = x_hat.clone().requires_grad_(True)
    out = run(model, x_hat, ids)
    (grad,) = torch.autograd.grad(out.sum(), x_hat, create_graph=True)
    penalty = (grad.flatten(1).norm(dim=1) - 1).square().sum() / (total or x_hat.shape[0])
    penalty.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return penalty.detach(), grad.detach(), grads


# --- the DDP tests' model: torchvision BasicBlocks (inplace ReLU, `out += identity`) ---


class ResidualNet(nn.Module):
    """Stem + a BatchNorm ``BasicBlock`` + a ``BasicBlock`` with ``DomainBatchNorm2d`` + head.

    Both blocks are torchvision's own (``ReLU(inplace=True)`` after each norm and
    ``out += identity``); the second is converted to domain BN (2 domains, ``sync`` as asked).
    """

    def __init__(self, sync: bool) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.block = BasicBlock(8, 8)
        self.domain_block = convert_norms(BasicBlock(8, 8), "domain", num_domains=2, sync=sync)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.domain_block(self.block(self.stem(x)))
        return self.head(h.mean((2, 3)))


def residual_sample(i: int) -> tuple[Tensor, int, int]:
    """Sample ``i`` of the DDP data: ``(x, label, domain)``.

    Odd indices (rank 1's under Lightning's unshuffled ``DistributedSampler``) are scaled and
    shifted, so unsynced statistics would differ between the ranks; the domain id
    ``(i // 2) % 2`` puts both domains on both ranks.
    """
    gen = torch.Generator().manual_seed(i)
    x = torch.randn(3, 6, 6, generator=gen) * (1 + i % 2) + 2 * (i % 2)
    return x, i % 2, (i // 2) % 2
