"""The recipes' models: the small digits CNN (its norm layers built by ``create_norm``) and the
classifier LightningModule every classification study trains.

Every recipe trains the same kind of network: a few ``conv -> norm -> ReLU`` blocks, global
average pooling and a linear classifier (a few thousand to ~100k parameters, fast on two CPU
cores). Only the normalisation layer changes between variants, built by
:func:`lightning_norms.create_norm` (:func:`norm_layer` maps a recipe's norm kind onto it).

The :class:`DigitsClassifier` LightningModule accepts both training batch formats of
:class:`lightning_norms.data.TwoDomainDigits`:

* ``batching="mixed"``: one batch ``(x, y, domain)`` holding both domains (50/50);
* ``batching="separate"``: a list ``[(x0, y0, d0), (x1, y1, d1)]`` of domain-pure batches; the
  model runs one forward per domain and the step's loss is the mean of the per-domain mean losses,
  which equals the mixed batch's mean loss (same samples, same objective) so that without
  BatchNorm both feeds give identical gradients. With a shared BatchNorm this is the pitfall of
  shared towers: every forward normalises with one domain's batch statistics, while the running
  averages used at test time converge to the mixture.

Validation and test loaders come one per domain (``dataloader_idx == domain``); accuracy is
measured per domain with torchmetrics' ``MulticlassAccuracy`` and averaged over domains.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

import lightning_norms as ln
from lightning_norms._shared import check_int
from lightning_norms.convert import create_norm

__all__ = [
    "ACTIVATIONS",
    "COSINE_LOGIT_SCALE",
    "FEEDS",
    "NORM_KINDS",
    "VARIANTS",
    "DigitsClassifier",
    "Feed",
    "SmallCNN",
    "Variant",
    "accuracy_record",
    "norm_layer",
]

NORM_KINDS = ("batch", "domain", "renorm", "layer2d", "group", "cosine", "none")

#: variant name -> (normalisation kind, training feed). ``separate`` is the pitfall; the
#: batch-independent alternatives (and BatchRenorm, whose r/d correction pulls training towards
#: the running statistics) are fed the same domain-pure batches to show which survive it.
VARIANTS: dict[str, tuple[str, str]] = {
    "mixed": ("batch", "mixed"),
    "separate": ("batch", "separate"),
    "split": ("domain", "mixed"),
    "renorm": ("renorm", "separate"),
    "layer2d": ("layer2d", "separate"),
    "group": ("group", "separate"),
    "cosine": ("cosine", "separate"),
    "none": ("none", "separate"),
}

FEEDS = ("mixed", "separate")

#: the activations :class:`SmallCNN` offers
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid}

Variant = Literal["mixed", "separate", "split", "renorm", "layer2d", "group", "cosine", "none"]
Feed = Literal["mixed", "separate"]

#: the scale applied to the cosine classifier's outputs (cosines lie in [-1, 1]; softmax needs a
#: temperature to reach confident predictions).
COSINE_LOGIT_SCALE = 10.0


def norm_layer(
    kind: str,
    num_channels: int,
    *,
    dims: int = 2,
    num_domains: int = 2,
    bn_momentum: float | None = 0.1,
    renorm_warmup: int = 100,
    num_groups: int = 4,
) -> nn.Module:
    """The normalisation layer of a recipe's norm ``kind``, built by ``create_norm``.

    ``"cosine"`` and ``"none"`` have no norm layer (``nn.Identity``); ``"layer2d"`` on feature
    vectors (``dims=1``) is ``GroupNorm`` with one group, the same normalisation over the
    channels; ``"group"`` takes ``gcd(num_channels, num_groups)`` groups.

    Args:
        kind: one of ``NORM_KINDS``.
        num_channels: ``C`` of the ``N, C, H, W`` (``dims=2``) or ``N, C`` (``dims=1``) input.
        dims: 2 for conv feature maps, 1 for feature vectors. Default 2.
        num_domains: domains of ``DomainBatchNorm`` (default 2).
        bn_momentum: running-stat momentum of the BN variants (default 0.1; ``None`` =
            cumulative average).
        renorm_warmup: ``warmup_steps`` of ``BatchRenorm`` (default 100).
        num_groups: groups of ``nn.GroupNorm`` (default 4, reduced to divide ``num_channels``).

    Raises:
        ValueError: unknown ``kind`` or ``dims``.

    Example:
        >>> norm_layer("group", 6, num_groups=4)
        GroupNorm(2, 6, eps=1e-05, affine=True...)
    """
    if dims not in (1, 2):
        raise ValueError(f"norm_layer: `dims` must be 1 or 2, got {dims!r}")
    if kind not in NORM_KINDS:
        raise ValueError(f"norm_layer: `kind` must be one of {NORM_KINDS}, got {kind!r}")
    options: dict[str, dict[str, Any]] = {
        "batch": {"momentum": bn_momentum},
        "domain": {"num_domains": num_domains, "momentum": bn_momentum},
        "renorm": {"momentum": bn_momentum, "warmup_steps": renorm_warmup},
        "group": {"num_groups": math.gcd(num_channels, max(1, num_groups))},
    }
    if kind == "layer2d" and dims == 1:
        return create_norm("group", num_channels, dims=1, num_groups=1)
    if kind in ("cosine", "none"):
        return create_norm("none", num_channels)
    return create_norm(kind, num_channels, dims=dims, **options.get(kind, {}))


def _conv(kind: str, cin: int, cout: int) -> nn.Module:
    if kind == "cosine":
        return ln.CosineConv2d(cin, cout, 3, padding=1)
    # a conv followed by a normalisation with its own shift drops its bias (Ioffe & Szegedy 2015)
    return nn.Conv2d(cin, cout, 3, padding=1, bias=kind == "none")


def _linear(kind: str, cin: int, cout: int) -> nn.Module:
    if kind == "cosine":
        return ln.CosineLinear(cin, cout)
    return nn.Linear(cin, cout, bias=kind == "none")


class SmallCNN(nn.Module):
    """``conv-norm-ReLU`` blocks, 2x2 max-pooling down to 4x4, GAP, then an MLP head.

    The head is ``linear -> norm -> ReLU -> linear`` (``hidden`` features; the VGG-BN /
    Inception-BN style of normalising the fully connected layers too) or a single linear layer
    with ``hidden=0``.

    Args:
        image_shape: ``(C, H, W)`` of the inputs.
        num_classes: output classes.
        norm: normalisation kind (see :func:`norm_layer`); ``"cosine"`` also swaps the convs for
            ``CosineConv2d`` and the linear layers for ``CosineLinear`` (the logits scaled by
            ``COSINE_LOGIT_SCALE``).
        width: channels of the first block; later blocks use ``2 * width``. Default 16.
        hidden: features of the head's hidden layer (default 64; 0 = linear head).
        activation: ``"relu"`` (default) or ``"sigmoid"`` (the lecture's hard case).
        **norm_kwargs: forwarded to :func:`norm_layer`.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        num_classes: int,
        norm: str = "batch",
        width: int = 16,
        hidden: int = 64,
        activation: str = "relu",
        **norm_kwargs: Any,
    ) -> None:
        super().__init__()
        if norm not in NORM_KINDS:
            raise ValueError(f"SmallCNN: `norm` must be one of {NORM_KINDS}, got {norm!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"SmallCNN: `activation` must be one of {list(ACTIVATIONS)}, got {activation!r}"
            )
        act = ACTIVATIONS[activation]
        channels, height, _ = (int(s) for s in image_shape)
        layers: list[nn.Module] = []
        cin, cout = channels, width
        size = height
        while True:
            layers += [_conv(norm, cin, cout), norm_layer(norm, cout, **norm_kwargs), act()]
            cin, cout = cout, 2 * width
            if size <= 4:
                break
            layers += [_conv(norm, cin, cout), norm_layer(norm, cout, **norm_kwargs), act()]
            layers.append(nn.MaxPool2d(2))
            cin = cout
            size //= 2
        self.features = nn.Sequential(*layers)
        self.cosine = norm == "cosine"
        head: list[nn.Module] = []
        if hidden > 0:
            head += [
                _linear(norm, cin, hidden),
                norm_layer(norm, hidden, dims=1, **norm_kwargs),
                act(),
            ]
            cin = hidden
        head.append(
            ln.CosineLinear(cin, num_classes) if self.cosine else nn.Linear(cin, num_classes)
        )
        self.head = nn.Sequential(*head)

    def forward(self, x: Tensor) -> Tensor:
        out = self.head(self.features(x).mean(dim=(2, 3)))
        return out * COSINE_LOGIT_SCALE if self.cosine else out


def _check_choices(
    variant: str, feed: str | None, schedule: str, optimizer: str, micro_batches: int
) -> None:
    """``ValueError`` naming the first of :class:`DigitsClassifier`'s choices that is not one."""
    choices: dict[str, tuple[str | None, list[str | None]]] = {
        "variant": (variant, list(VARIANTS)),
        "feed": (feed, [None, *FEEDS]),
        "schedule": (schedule, ["cosine", "constant"]),
        "optimizer": (optimizer, ["adam", "sgd"]),
    }
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"DigitsClassifier: `{name}` must be one of {allowed}, got {value!r}")
    check_int("micro_batches", micro_batches, 1, where="DigitsClassifier")


class DigitsClassifier(L.LightningModule):
    """A small CNN trained on both domains of ``TwoDomainDigits``; one norm variant per run.

    Args:
        variant: a key of ``VARIANTS`` (sets the norm kind and, unless ``feed`` is given, the feed).
        feed: ``"mixed"`` or ``"separate"`` training batches; ``None`` = the variant's default.
        width: channels of the first conv block (default 16).
        hidden: features of the normalised hidden layer of the head (default 64; 0 = none).
        lr: Adam learning rate (default 3e-3), the same for every variant.
        weight_decay: Adam weight decay (default 0).
        schedule: ``"cosine"`` (default: the learning rate anneals to 0 over the run, per step, so
            the weights settle and the running averages catch up with them: the comparison is
            not blurred by EMA lag, which ``recipes.precise_bn`` studies on its own) or
            ``"constant"``.
        bn_momentum: running-stat momentum of the BN variants (default 0.1).
        renorm_warmup: ``BatchRenorm2d`` warm-up in *training steps* (default 100: a short run
            has a few hundred steps, so the clip limits reach r_max=3, d_max=5 early in
            training). A layer called several times per step (the separate feed, micro-batches)
            counts every call, so the layers get ``renorm_warmup * calls_per_step``.
        num_groups: ``GroupNorm`` groups (default 4).
        micro_batches: BN statistics over each of this many equal chunks of every forward's
            batch, the loss averaged over the chunks (default 1: the whole batch). A batch of
            32 with 8 micro-batches is 8 devices of 4 samples each without synced statistics,
            one optimizer step on all 32 (Ioffe 2017's small-minibatch setting).
        activation: ``"relu"`` (default) or ``"sigmoid"``.
        optimizer: ``"adam"`` (default) or ``"sgd"`` (momentum 0.9).
        image_shape, num_classes, num_domains: the data's, linked from the DataModule by the CLI.
    """

    def __init__(
        self,
        variant: Variant = "mixed",
        feed: Feed | None = None,
        width: int = 16,
        hidden: int = 64,
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        schedule: Literal["cosine", "constant"] = "cosine",
        bn_momentum: float = 0.1,
        renorm_warmup: int = 100,
        num_groups: int = 4,
        micro_batches: int = 1,
        activation: Literal["relu", "sigmoid"] = "relu",
        optimizer: Literal["adam", "sgd"] = "adam",
        image_shape: tuple[int, int, int] = (1, 8, 8),
        num_classes: int = 10,
        num_domains: int = 2,
    ) -> None:
        super().__init__()
        _check_choices(variant, feed, schedule, optimizer, micro_batches)
        self.save_hyperparameters()
        # plain attributes too: LightningCLI replaces ``hparams`` of a subclass with its own args
        self.variant = variant
        self.lr = lr
        self.weight_decay = weight_decay
        self.schedule = schedule
        self.bn_momentum = bn_momentum
        self.num_classes = num_classes
        self.num_domains = num_domains
        self.optimizer_name = optimizer
        self.micro_batches = micro_batches
        self.norm, default_feed = VARIANTS[variant]
        self.feed = feed or default_feed
        #: forwards through every norm layer per training step (separate feed: one per domain)
        self.calls_per_step = micro_batches * (num_domains if self.feed == "separate" else 1)
        self.net = SmallCNN(
            image_shape,
            num_classes,
            norm=self.norm,
            width=width,
            hidden=hidden,
            activation=activation,
            num_domains=num_domains,
            bn_momentum=bn_momentum,
            renorm_warmup=renorm_warmup * self.calls_per_step,
            num_groups=num_groups,
        )
        self._routes_domains = self.norm == "domain"
        self.val_acc = nn.ModuleList(
            MulticlassAccuracy(num_classes, average="micro") for _ in range(num_domains)
        )
        self.test_acc = nn.ModuleList(
            MulticlassAccuracy(num_classes, average="micro") for _ in range(num_domains)
        )

    def forward(self, x: Tensor, domain: Tensor | int | None = None) -> Tensor:
        """Logits for ``x``; ``domain`` (int or per-sample ids) routes DomainBatchNorm layers."""
        if not self._routes_domains:
            return self.net(x)
        if domain is None:
            raise ValueError("DigitsClassifier: the `split` variant needs `domain` ids")
        with ln.domain(self.net, domain):
            return self.net(x)

    def _loss(self, batch: Sequence[Tensor]) -> Tensor:
        x, y, d = batch
        if self.micro_batches == 1:
            return F.cross_entropy(self(x, d), y)
        if len(x) % self.micro_batches:
            raise ValueError(
                f"DigitsClassifier: a batch of {len(x)} does not split into "
                f"micro_batches={self.micro_batches} equal chunks"
            )
        chunks = zip(*(t.chunk(self.micro_batches) for t in (x, y, d)), strict=True)
        return torch.stack([F.cross_entropy(self(xc, dc), yc) for xc, yc, dc in chunks]).mean()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        separate = not isinstance(batch[0], Tensor)
        if separate != (self.feed == "separate"):
            got = "a list of per-domain batches" if separate else "one mixed batch"
            raise ValueError(
                f"DigitsClassifier: feed={self.feed!r} but the train loader yields {got}; "
                f"build the data with batching={self.feed!r}"
            )
        if separate:
            losses = [self._loss(b) for b in batch]
            loss = torch.stack(losses).mean()
            for k, part in enumerate(losses):
                self.log(f"train/loss_domain{k}", part, prog_bar=False)
        else:
            loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _eval_step(self, batch: Sequence[Tensor], idx: int, metrics: nn.ModuleList) -> None:
        x, y, d = batch
        metric: MulticlassAccuracy = metrics[idx]  # type: ignore[assignment]
        metric.update(self(x, d).argmax(dim=1), y)

    def validation_step(
        self, batch: Sequence[Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._eval_step(batch, dataloader_idx, self.val_acc)

    def test_step(self, batch: Sequence[Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx, self.test_acc)

    def _log_accuracy(self, stage: str, metrics: nn.ModuleList) -> None:
        accs = []
        metric: MulticlassAccuracy
        for k, metric in enumerate(metrics):  # type: ignore[assignment]
            acc = metric.compute()
            metric.reset()
            accs.append(acc)
            self.log(f"{stage}/acc_domain{k}", acc, prog_bar=stage == "val")
        self.log(f"{stage}/acc", torch.stack(accs).mean(), prog_bar=stage == "val")

    def on_validation_epoch_end(self) -> None:
        self._log_accuracy("val", self.val_acc)

    def on_test_epoch_end(self) -> None:
        self._log_accuracy("test", self.test_acc)

    def configure_optimizers(self) -> Any:
        opt: torch.optim.Optimizer
        if self.optimizer_name == "sgd":
            opt = torch.optim.SGD(
                self.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay
            )
        else:
            opt = torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self.schedule == "constant":
            return opt
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def accuracy_record(metrics: dict[str, Any], num_domains: int, stage: str = "test") -> dict:
    """``{acc_domain0, ..., acc}`` as floats from a Trainer's ``callback_metrics``."""
    out = {f"acc_domain{k}": float(metrics[f"{stage}/acc_domain{k}"]) for k in range(num_domains)}
    out["acc"] = float(metrics[f"{stage}/acc"])
    return out
