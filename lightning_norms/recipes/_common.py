"""Shared recipe code: the norm-layer factory, the small digits CNN and the classifier module.

Every recipe trains the same kind of network: a few ``conv -> norm -> ReLU`` blocks, global
average pooling and a linear classifier (a few thousand to ~100k parameters, fast on two CPU
cores). Only the normalisation layer changes between variants, built by :func:`make_norm`.

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

import contextlib
import json
import logging
import math
import multiprocessing as mp
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler
from torchmetrics.classification import MulticlassAccuracy

import lightning_norms as ln

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


def make_norm(
    kind: str,
    num_channels: int,
    *,
    dims: int = 2,
    num_domains: int = 2,
    bn_momentum: float | None = 0.1,
    renorm_warmup: int = 100,
    num_groups: int = 4,
) -> nn.Module:
    """Return the normalisation layer ``kind`` for ``num_channels`` channels or features.

    Args:
        kind: one of ``NORM_KINDS`` (``"cosine"`` and ``"none"`` give ``nn.Identity``).
        num_channels: ``C`` of the ``N, C, H, W`` (``dims=2``) or ``N, C`` (``dims=1``) input.
        dims: 2 for conv feature maps, 1 for feature vectors (``layer2d`` becomes
            ``nn.LayerNorm(C)``, the same normalisation over the channels). Default 2.
        num_domains: domains of ``DomainBatchNorm`` (default 2).
        bn_momentum: running-stat momentum of the BN variants (default 0.1; ``None`` =
            cumulative average).
        renorm_warmup: ``warmup_steps`` of ``BatchRenorm`` (default 100).
        num_groups: groups of ``nn.GroupNorm`` (default 4, reduced to divide ``num_channels``).

    Raises:
        ValueError: unknown ``kind`` or ``dims``.
    """
    if dims not in (1, 2):
        raise ValueError(f"make_norm: `dims` must be 1 or 2, got {dims!r}")
    if kind == "batch":
        return (nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d)(num_channels, momentum=bn_momentum)
    if kind == "domain":
        domain_cls = ln.DomainBatchNorm2d if dims == 2 else ln.DomainBatchNorm1d
        return domain_cls(num_channels, num_domains, momentum=bn_momentum)
    if kind == "renorm":
        renorm_cls = ln.BatchRenorm2d if dims == 2 else ln.BatchRenorm1d
        return renorm_cls(num_channels, momentum=bn_momentum, warmup_steps=renorm_warmup)
    if kind == "layer2d":
        return ln.LayerNorm2d(num_channels) if dims == 2 else nn.LayerNorm(num_channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(num_channels, max(1, num_groups)), num_channels)
    if kind in ("cosine", "none"):
        return nn.Identity()
    raise ValueError(f"make_norm: `kind` must be one of {NORM_KINDS}, got {kind!r}")


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
        norm: normalisation kind (see :func:`make_norm`); ``"cosine"`` also swaps the convs for
            ``CosineConv2d`` and the linear layers for ``CosineLinear`` (the logits scaled by
            ``COSINE_LOGIT_SCALE``).
        width: channels of the first block; later blocks use ``2 * width``. Default 16.
        hidden: features of the head's hidden layer (default 64; 0 = linear head).
        activation: ``"relu"`` (default) or ``"sigmoid"`` (the lecture's hard case).
        **norm_kwargs: forwarded to :func:`make_norm`.
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
            layers += [_conv(norm, cin, cout), make_norm(norm, cout, **norm_kwargs), act()]
            cin, cout = cout, 2 * width
            if size <= 4:
                break
            layers += [_conv(norm, cin, cout), make_norm(norm, cout, **norm_kwargs), act()]
            layers.append(nn.MaxPool2d(2))
            cin = cout
            size //= 2
        self.features = nn.Sequential(*layers)
        self.cosine = norm == "cosine"
        head: list[nn.Module] = []
        if hidden > 0:
            head += [
                _linear(norm, cin, hidden),
                make_norm(norm, hidden, dims=1, **norm_kwargs),
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


def has_domain_bn(model: nn.Module) -> bool:
    """Whether ``model`` holds a ``DomainBatchNorm`` layer (which needs domain ids)."""
    from lightning_norms.domain_bn import DomainBatchNorm2d

    return any(isinstance(m, DomainBatchNorm2d) for m in model.modules())


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
        if variant not in VARIANTS:
            raise ValueError(
                f"DigitsClassifier: `variant` must be one of {list(VARIANTS)}, got {variant!r}"
            )
        if schedule not in ("cosine", "constant"):
            raise ValueError(
                f"DigitsClassifier: `schedule` must be 'cosine' or 'constant', got {schedule!r}"
            )
        if feed is not None and feed not in FEEDS:
            raise ValueError(f"DigitsClassifier: `feed` must be one of {FEEDS}, got {feed!r}")
        if optimizer not in ("adam", "sgd"):
            raise ValueError(
                f"DigitsClassifier: `optimizer` must be 'adam' or 'sgd', got {optimizer!r}"
            )
        if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or (
            micro_batches < 1
        ):
            raise ValueError(
                f"DigitsClassifier: `micro_batches` must be an integer >= 1, got {micro_batches!r}"
            )
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


#: torch threads per process a recipe uses unless told otherwise: the models are tiny, so on a
#: shared or small CPU one thread is fastest (a 2-epoch run: 2 min with torch's default, 20 s
#: with one thread on 2 cores); set ``--threads`` (or ``LIGHTNING_NORMS_THREADS``) for big data
DEFAULT_THREADS = 1


def default_threads() -> int:
    """``LIGHTNING_NORMS_THREADS`` when set, else :data:`DEFAULT_THREADS`."""
    import os

    value = os.environ.get("LIGHTNING_NORMS_THREADS", "")
    return int(value) if value.strip().isdigit() and int(value) > 0 else DEFAULT_THREADS


class RecipeCLI(LightningCLI):
    """The recipes' LightningCLI: adds ``--threads`` (torch threads, set before training)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--threads",
            type=int,
            default=default_threads(),
            help="torch threads per process (default 1, or LIGHTNING_NORMS_THREADS: the "
            "recipes' models are tiny; raise it for real MNIST/SVHN on a many-core CPU)",
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        threads = int(config["threads"])
        if threads < 1:
            raise ValueError(f"{type(self).__name__}: `--threads` must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def recipe_cli(
    cli_class: type[LightningCLI],
    model_class: type[L.LightningModule],
    datamodule_class: type[L.LightningDataModule],
    name: str,
    max_epochs: int,
    args: Any = None,
    run: bool = True,
) -> Any:
    """A recipe's LightningCLI with the shared defaults: seed 0, deterministic, ``runs/<name>``."""
    return cli_class(
        model_class,
        datamodule_class,
        seed_everything_default=0,
        trainer_defaults={
            "max_epochs": max_epochs,
            "deterministic": True,
            "default_root_dir": f"runs/{name}",
        },
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def study_trainer(
    max_epochs: int, trainer_kwargs: dict[str, Any] | None = None, validate: bool = False
) -> L.Trainer:
    """The quiet single-process CPU trainer a study run uses (no logger, no checkpoints).

    ``validate=False`` also switches off the validation loop; ``trainer_kwargs`` override all.
    """
    options: dict[str, Any] = {
        "max_epochs": max_epochs,
        "deterministic": True,
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "accelerator": "cpu",
        "devices": 1,
    }
    if not validate:
        options.update(limit_val_batches=0, num_sanity_val_steps=0)
    options.update(trainer_kwargs or {})
    return L.Trainer(**options)


@rank_zero_only
def write_json(path: str | Path, record: Any) -> None:
    """Write ``record`` as indented JSON to ``path`` (rank zero only), creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


@contextlib.contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Set ``torch.set_num_threads`` for the block (``None`` leaves it), restoring it after."""
    if num_threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def forward_train_batch(model: nn.Module, batch: Any) -> None:
    """Run a training batch of either feed through ``model`` (the ``forward_fn`` for PreciseBN;
    ``model`` a :class:`DigitsClassifier`)."""
    device = next(model.parameters()).device
    parts = [batch] if isinstance(batch[0], Tensor) else list(batch)
    for x, _, d in parts:
        model(x.to(device), d.to(device))


@torch.no_grad()
def evaluate(model: DigitsClassifier, loaders: Sequence[Any]) -> dict[str, float]:
    """Per-domain and mean test accuracy of ``model`` in eval mode (loader ``k`` = domain ``k``).

    A plain loop (no Trainer) for the recipes that compare several sets of statistics on one
    set of weights; the training flag is restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        out: dict[str, float] = {}
        for k, loader in enumerate(loaders):
            metric = MulticlassAccuracy(
                model.num_classes, average="micro", sync_on_compute=False
            ).to(model.device)
            for x, y, d in loader:
                x, y, d = x.to(model.device), y.to(model.device), d.to(model.device)
                metric.update(model(x, d).argmax(dim=1), y)
            out[f"acc_domain{k}"] = float(metric.compute())
        out["acc"] = sum(out.values()) / len(loaders)
        return out
    finally:
        model.train(was_training)


class EpochProgress(L.Callback):
    """Reports every finished training epoch as ``sink.put(key)`` (a queue, or a local sink)."""

    def __init__(self, sink: Any, key: int) -> None:
        self._sink = sink
        self._key = key

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sink.put(self._key)


class _BarSink:
    def __init__(self, bar: Any) -> None:
        self._bar = bar

    def put(self, key: int) -> None:
        self._bar.update(1)


def _run_task(fn: Callable[..., dict], task: dict[str, Any], sink: Any, key: int, threads: int):
    """Run ``fn(**task)`` quietly with an epoch reporter; used in-process and in workers."""
    task = dict(task)
    trainer_kwargs = dict(task.pop("trainer_kwargs", None) or {})
    trainer_kwargs.setdefault("enable_progress_bar", False)
    trainer_kwargs["callbacks"] = [*trainer_kwargs.get("callbacks", []), EpochProgress(sink, key)]
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    with torch_threads(threads), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        try:
            return fn(**task, trainer_kwargs=trainer_kwargs)
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def run_tasks(
    fn: Callable[..., dict],
    tasks: Sequence[dict[str, Any]],
    *,
    epochs_per_task: int,
    jobs: int = 1,
    threads: int = 1,
    desc: str = "training",
    progress: bool = True,
    on_result: Callable[[dict], str] | None = None,
) -> list[dict]:
    """Run ``fn(**task, trainer_kwargs=...)`` for every task, ``jobs`` processes at a time.

    One progress bar counts the training epochs of all runs; ``on_result(record)`` returns the
    line printed as each run finishes. Results come back in the order of ``tasks`` (every run
    seeds itself, so they do not depend on ``jobs``). Workers are spawned (safe with torch).
    """
    from tqdm.auto import tqdm

    results: list[dict | None] = [None] * len(tasks)
    bar = tqdm(total=len(tasks) * epochs_per_task, desc=desc, unit="epoch", disable=not progress)
    try:
        if jobs <= 1:
            sink = _BarSink(bar)
            for i, task in enumerate(tasks):
                record = _run_task(fn, task, sink, i, threads)
                results[i] = record
                if on_result is not None:
                    bar.write(on_result(record))
            return results  # type: ignore[return-value]
        ctx = mp.get_context("spawn")
        with ctx.Manager() as manager, ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            queue = manager.Queue()
            futures = {
                pool.submit(_run_task, fn, task, queue, i, threads): i
                for i, task in enumerate(tasks)
            }
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                while not queue.empty():
                    queue.get()
                    bar.update(1)
                for fut in done:
                    record = fut.result()
                    results[futures[fut]] = record
                    if on_result is not None:
                        bar.write(on_result(record))
        return results  # type: ignore[return-value]
    finally:
        bar.close()


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
        from lightning_norms.data import TwoDomainDigits

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
        import os

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
