"""A small DCGAN on the digits: what the discriminator's BatchNorm sees decides the samples.

GAN discriminators fed alternating all-real / all-fake batches fall into the same BatchNorm
trap as domain-pure towers (``recipes.two_domain``): the discriminator's BN normalises each
batch with its own statistics, so a batch-level difference between real and fake images is
normalised away in training, and the two kinds are never compared under one normalisation. Three
ways to feed the discriminator (``--model.mode``):

* ``alternating``: one forward of an all-real batch, one of an all-fake batch (the pitfall);
* ``mixed``: one forward of a shuffled 50/50 batch from ``lightning_norms.data.mix_real_fake``;
* ``split``: the same mixed batch through a ``DomainBatchNorm2d`` discriminator, real images as
  domain 0 and fakes as domain 1 (BN statistics per kind, every weight shared, one shared affine
  so that a per-kind shift cannot leak the label);
* ``none``: the mixed batch through a discriminator without normalisation (the control).

In training, ``alternating`` and ``split`` normalise the same way: each kind by its own batch
statistics under one affine (the discriminator's running averages are never used); they differ
only in how the batch is assembled. ``mixed`` is the one feed where real and fake share one
normalisation. After ``fit`` each record also gives ``kind_gap``: how far apart real and fake
images sit at the input of the discriminator's first normalised layer (mean over channels of
``|mean_real - mean_fake| / pooled std``), the per-kind shift that per-kind statistics erase.

Sample quality is measured offline after ``fit``: a digits classifier trained inside the recipe
on the real training digits labels 1000 samples; the report gives its mean confidence, the number
of classes covered (>= 2 % of samples), the effective number of classes (exp of the entropy of
the class histogram) and the MMD between samples and real test digits in the classifier's feature
space (RBF kernel, median bandwidth), next to the same figures for real test digits. Sample grids
go to ``<output_dir>/<mode>_seed<seed>.png`` and the record to ``<mode>_seed<seed>.json``.

Run::

    python -m recipes.gan fit --model.mode mixed --trainer.max_epochs 60
    python -m recipes.gan fit --model.mode alternating --seed_everything 1
    python -m recipes.gan fit --model.mode split --data.root /data --trainer.accelerator gpu
    python -m recipes.gan fit --trainer.devices 2 --trainer.accelerator cpu \
        --trainer.strategy ddp_find_unused_parameters_true

(DDP needs ``ddp_find_unused_parameters_true``: each of the two manual-optimisation steps
leaves the other network's parameters without gradients.)
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningArgumentParser
from torch import Tensor, nn

import lightning_norms as ln
from lightning_norms.data import mix_real_fake
from lightning_norms.recipes.data import SingleDomainDigits
from lightning_norms.recipes.models import SmallCNN
from lightning_norms.recipes.runner import RecipeCLI, recipe_cli, run_grid, write_json
from lightning_norms.recipes.verdict import Comparison, compare
from lightning_norms.recipes.writer import (
    StudyReport,
    by_seed,
    group_by,
    mean_std,
    plot_bars,
    study_head,
    verdict_section,
)

__all__ = [
    "EPOCHS",
    "MODES",
    "SEEDS",
    "DigitsGAN",
    "Discriminator",
    "GanCLI",
    "GanDigits",
    "Generator",
    "cli_main",
    "kind_gap",
    "plot",
    "run_study",
    "sample_quality",
    "train_judge",
    "verdicts",
]

MODES = ("alternating", "mixed", "split", "none")
#: epochs per run (the CLI's default and the study's)
EPOCHS = 60
#: seeds of the study (``lightning-norms report --study gan``): MMD² varies a lot between seeds
SEEDS = 5


class GanDigits(SingleDomainDigits):
    """Real digits for the GAN: one domain, greyscale, in ``[-1, 1]`` (the generator's tanh).

    Args:
        domain, root, image_size, seed, num_workers: as :class:`SingleDomainDigits`.
        batch_size: real images per step (the discriminator sees as many fakes). Default 64.
    """

    def __init__(
        self,
        domain: int = 0,
        root: str | None = None,
        batch_size: int = 64,
        image_size: int | None = None,
        seed: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__(
            domain=domain,
            root=root,
            batch_size=batch_size,
            image_size=image_size,
            grey=True,
            tanh_range=True,
            seed=seed,
            num_workers=num_workers,
        )


class Generator(nn.Module):
    """DCGAN generator: ``z -> linear -> (2x2 or 4x4) -> transposed convs (BN, ReLU) -> tanh``."""

    def __init__(self, z_dim: int, image_shape: tuple[int, int, int], width: int = 32) -> None:
        super().__init__()
        channels, height, _ = image_shape
        ups = max(1, int(math.log2(height)) - 1)
        self.start = height // 2**ups
        self.width = width * 2 ** (ups - 1)
        self.fc = nn.Sequential(
            nn.Linear(z_dim, self.width * self.start**2, bias=False),
            nn.BatchNorm1d(self.width * self.start**2),
            nn.ReLU(),
        )
        layers: list[nn.Module] = []
        cin = self.width
        for i in range(ups):
            last = i == ups - 1
            cout = channels if last else cin // 2
            layers.append(nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=last))
            layers += [nn.Tanh()] if last else [nn.BatchNorm2d(cout), nn.ReLU()]
            cin = cout
        self.body = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        h = self.fc(z).view(z.shape[0], self.width, self.start, self.start)
        return self.body(h)


class Discriminator(nn.Module):
    """DCGAN discriminator: strided convs with LeakyReLU; a norm after all convs but the first.

    Args:
        image_shape: ``(C, H, W)``.
        width: channels of the first conv.
        norm: ``"batch"`` (``BatchNorm2d``), ``"split"`` (``DomainBatchNorm2d(C, 2,
            shared_affine=True)``, domain 0 real, 1 fake: the affine is shared so that no
            per-kind shift hands the real/fake label to the discriminator) or ``"none"``.

    Raises:
        ValueError: ``norm`` is none of these.
    """

    def __init__(
        self, image_shape: tuple[int, int, int], width: int = 32, norm: str = "batch"
    ) -> None:
        super().__init__()
        if norm not in ("batch", "split", "none"):
            raise ValueError(
                f"Discriminator: `norm` must be 'batch', 'split' or 'none', got {norm!r}"
            )
        channels, height, _ = image_shape
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        size, cin = height // 2, width
        while size > 2:
            cout = 2 * cin
            layer: nn.Module = nn.Identity()
            if norm == "batch":
                layer = nn.BatchNorm2d(cout)
            elif norm == "split":
                layer = ln.DomainBatchNorm2d(cout, 2, shared_affine=True)
            conv = nn.Conv2d(cin, cout, 4, 2, 1, bias=norm == "none")
            layers += [conv, layer, nn.LeakyReLU(0.2)]
            cin, size = cout, size // 2
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(cin * size * size, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x).flatten(1)).squeeze(1)


class DigitsGAN(L.LightningModule):
    """DCGAN with manual optimisation; ``mode`` sets how the discriminator sees real and fake.

    Args:
        mode: ``"alternating"``, ``"mixed"``, ``"split"`` or ``"none"`` (the module docstring).
        z_dim: latent size (default 16).
        width: channels of the discriminator's first conv and the generator's last hidden layer.
        lr: Adam learning rate of both networks (default 2e-3: a short run on tiny images).
        image_shape: ``(C, H, W)``, linked from the data by the CLI.
    """

    def __init__(
        self,
        mode: Literal["alternating", "mixed", "split", "none"] = "mixed",
        z_dim: int = 16,
        width: int = 32,
        lr: float = 2e-3,
        image_shape: tuple[int, int, int] = (1, 8, 8),
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"DigitsGAN: `mode` must be one of {MODES}, got {mode!r}")
        self.save_hyperparameters()
        # plain attributes too: LightningCLI replaces ``hparams`` of a subclass with its own args
        self.mode = mode
        self.z_dim = z_dim
        self.lr = lr
        self.automatic_optimization = False
        channels, height, width_px = (int(s) for s in image_shape)
        shape = (channels, height, width_px)
        self.generator = Generator(z_dim, shape, width)
        norm = {"split": "split", "none": "none"}.get(mode, "batch")
        self.discriminator = Discriminator(shape, width, norm=norm)

    def forward(self, z: Tensor) -> Tensor:
        return self.generator(z)

    def _discriminate(self, real: Tensor, fake: Tensor) -> tuple[Tensor, Tensor]:
        """Discriminator logits for ``real`` and ``fake``, fed as ``mode`` says."""
        d = self.discriminator
        if self.mode == "alternating":
            return d(real), d(fake)
        x, is_real, _ = mix_real_fake(real, fake)
        real_rows = is_real.bool()
        if self.mode == "split":
            with ln.domain(d, (~real_rows).long()):
                out = d(x)
        else:
            out = d(x)
        return out[real_rows], out[~real_rows]

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt_g, opt_d = self.optimizers()  # type: ignore[attr-defined,misc]
        real = batch[0]
        z = torch.randn(real.shape[0], self.z_dim, device=real.device)
        fake = self.generator(z)

        out_real, out_fake = self._discriminate(real, fake.detach())
        loss_d = F.binary_cross_entropy_with_logits(
            out_real, torch.ones_like(out_real)
        ) + F.binary_cross_entropy_with_logits(out_fake, torch.zeros_like(out_fake))
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(loss_d)
        opt_d.step()

        _, out_fake = self._discriminate(real, fake)
        loss_g = F.binary_cross_entropy_with_logits(out_fake, torch.ones_like(out_fake))
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss_g)
        opt_g.step()
        self.log_dict({"loss_d": loss_d, "loss_g": loss_g}, prog_bar=True)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        betas = (0.5, 0.999)
        return [
            torch.optim.Adam(self.generator.parameters(), lr=self.lr, betas=betas),
            torch.optim.Adam(self.discriminator.parameters(), lr=self.lr, betas=betas),
        ]

    @torch.no_grad()
    def sample(self, num: int, seed: int = 0) -> Tensor:
        """``num`` samples from the generator in eval mode, from a fixed latent seed."""
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn(num, self.z_dim, generator=gen).to(self.device)
        was_training = self.generator.training
        self.generator.eval()
        try:
            return self.generator(z)
        finally:
            self.generator.train(was_training)


def train_judge(
    data: SingleDomainDigits, epochs: int = 8, seed: int = 0, width: int = 16
) -> tuple[SmallCNN, float]:
    """Train the offline judge: a BN ``SmallCNN`` on the real training digits; returns it and its
    real test accuracy. Plain torch loop, seeded, in eval mode on return."""
    gen = torch.Generator().manual_seed(seed)
    x, y = data.train_tensors()
    torch.manual_seed(seed)
    judge = SmallCNN(tuple(x.shape[1:]), data.num_classes, norm="batch", width=width)
    opt = torch.optim.Adam(judge.parameters(), lr=3e-3)
    judge.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for idx in order.split(64):
            if len(idx) < 2:
                continue
            loss = F.cross_entropy(judge(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    judge.eval()
    xt, yt = data.test_tensors()
    with torch.no_grad():
        acc = (judge(xt).argmax(1) == yt).float().mean().item()
    return judge, acc


def _features(judge: SmallCNN, x: Tensor) -> Tensor:
    return judge.features(x).mean(dim=(2, 3))


def _mmd2(a: Tensor, b: Tensor) -> float:
    """Unbiased squared MMD with an RBF kernel, bandwidth = median pairwise distance of ``b``."""
    bandwidth = torch.cdist(b, b).median().clamp_min(1e-6)

    def k(u: Tensor, v: Tensor) -> Tensor:
        return torch.exp(-torch.cdist(u, v).pow(2) / (2 * bandwidth**2))

    kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
    n, m = len(a), len(b)
    return float(
        (kaa.sum() - kaa.diagonal().sum()) / (n * (n - 1))
        + (kbb.sum() - kbb.diagonal().sum()) / (m * (m - 1))
        - 2 * kab.mean()
    )


@torch.no_grad()
def sample_quality(judge: SmallCNN, images: Tensor, reference: Tensor) -> dict[str, float]:
    """Judge ``images``: confidence, classes covered, effective classes, MMD to ``reference``."""
    judge = judge.to(images.device)
    probs = judge(images).softmax(dim=1)
    counts = torch.bincount(probs.argmax(1), minlength=probs.shape[1]).float()
    share = counts / counts.sum()
    entropy = -(share[share > 0] * share[share > 0].log()).sum()
    return {
        "confidence": float(probs.max(1).values.mean()),
        "classes_covered": int((share >= 0.02).sum()),
        "effective_classes": float(entropy.exp()),
        "mmd": _mmd2(_features(judge, images), _features(judge, reference.to(images.device))),
    }


def save_grid(images: Tensor, path: str | Path, nrow: int = 16, scale: int = 4) -> None:
    """Save ``images`` in ``[-1, 1]`` as a PNG grid, upscaled ``scale`` x (nearest)."""
    from torchvision.utils import save_image

    up = F.interpolate(images.float().cpu(), scale_factor=scale, mode="nearest")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(up, path, nrow=nrow, normalize=True, value_range=(-1, 1), padding=2, pad_value=1)


@torch.no_grad()
def kind_gap(discriminator: Discriminator, real: Tensor, fake: Tensor) -> float:
    """Mean over channels of ``|mean_real - mean_fake| / pooled std`` at the input of the
    discriminator's first normalised layer (the output of its second conv), each kind through
    the first convs on its own."""
    convs = [m for m in discriminator.body if isinstance(m, nn.Conv2d)]
    if len(convs) < 2:
        raise ValueError("kind_gap: the discriminator needs a second conv (images >= 8 px)")
    stop = list(discriminator.body).index(convs[1]) + 1
    head = discriminator.body[:stop]
    a, b = head(real).transpose(0, 1).flatten(1), head(fake).transpose(0, 1).flatten(1)
    pooled = ((a.var(dim=1) + b.var(dim=1)) / 2).clamp_min(1e-12).sqrt()
    return float(((a.mean(dim=1) - b.mean(dim=1)).abs() / pooled).mean())


def evaluate_gan(
    model: DigitsGAN, data: SingleDomainDigits, seed: int, num_samples: int = 1000
) -> tuple[dict[str, float], Tensor]:
    """Train the judge, sample ``num_samples`` images, return their quality figures and them."""
    judge, judge_acc = train_judge(data, seed=seed)
    samples = model.sample(num_samples, seed=seed).cpu()
    reference, _ = data.test_tensors()
    quality = sample_quality(judge, samples, reference)
    dev = model.device
    quality["kind_gap"] = kind_gap(
        model.discriminator, reference[:num_samples].to(dev), samples.to(dev)
    )
    real = sample_quality(judge, reference, data.train_tensors()[0])
    quality.update(
        judge_acc=judge_acc,
        real_confidence=real["confidence"],
        real_classes_covered=real["classes_covered"],
        real_effective_classes=real["effective_classes"],
        real_mmd=real["mmd"],
    )
    return quality, samples


class GanCLI(RecipeCLI):
    """LightningCLI for the GAN recipe: after ``fit``, judges the samples and saves the grid."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--output_dir", default="runs/gan", help="grids and records go here")
        parser.link_arguments("data.image_shape", "model.image_shape", apply_on="instantiate")

    def after_fit(self) -> None:
        trainer, model = self.trainer, self.model
        if trainer.interrupted or not trainer.is_global_zero:
            return
        config = self.options
        seed = config["seed_everything"]
        quality, samples = evaluate_gan(model, self.datamodule, seed=int(seed))
        out = Path(config["output_dir"])
        stem = f"{model.mode}_seed{seed}"
        save_grid(samples[:128], out / f"{stem}.png")
        self.record = {"mode": model.mode, "seed": seed, **quality}
        write_json(out / f"{stem}.json", self.record)
        self.say(f"samples: {out / stem}.png  quality: {quality}")


def cli_main(args: Any = None, run: bool = True, **options: Any) -> GanCLI:
    """Entry point: ``python -m recipes.gan fit --model.mode mixed ...``."""
    return recipe_cli(GanCLI, DigitsGAN, GanDigits, "gan", EPOCHS, args, run, **options)


def _table(records: list[dict], by_mode: dict[tuple, list[dict]]) -> list[str]:
    lines = [
        "Quality of 1000 samples judged by a digits classifier trained on the real digits: mean "
        "confidence, classes covered (>= 2 % of samples), effective number of classes "
        "(exp entropy), MMD² to real test digits in the classifier's features (lower is better). "
        "Grids: `<mode>_seed<seed>.png`. Kind gap: real vs fake at the input of the "
        "discriminator's first normalised layer (mean over channels of |mean difference| / "
        "pooled std), what per-kind statistics normalise away.",
        "",
        "| discriminator feed | confidence (%) | classes covered | effective classes "
        "| MMD² (x 1e-3) | kind gap |",
        "|---|---|---|---|---|---|",
    ]
    for (mode,), rows in by_mode.items():
        lines.append(
            f"| {mode} | {mean_std([r['confidence'] for r in rows])} | "
            f"{mean_std([r['classes_covered'] for r in rows], 1.0)} | "
            f"{mean_std([r['effective_classes'] for r in rows], 1.0)} | "
            f"{mean_std([r['mmd'] for r in rows], 1000.0, 1)} | "
            f"{mean_std([r.get('kind_gap', math.nan) for r in rows], 1.0, 2)} |"
        )
    real = records[0]
    lines.append(
        f"| real test digits | {100 * real['real_confidence']:.1f} | "
        f"{real['real_classes_covered']} | "
        f"{real['real_effective_classes']:.1f} | {1000 * real['real_mmd']:.1f} | |"
    )
    return lines


def verdicts(records: list[dict]) -> list[tuple[Comparison, float, str]]:
    """The study's claims as paired comparisons ``(comparison, scale, unit)``: every feed's MMD²
    against ``alternating`` (lower is better)."""
    mmd = {m: by_seed(rows, "mmd") for (m,), rows in group_by(records, ("mode",)).items()}
    return [
        (compare(f"`{m}` MMD² < `alternating` MMD²", mmd[m], mmd["alternating"], -1), 1000.0,
         " x 1e-3")
        for m in MODES[1:]
        if m in mmd and "alternating" in mmd
    ]  # fmt: skip


def plot(records: list[dict], path: Path, caption: str = "") -> None:
    """MMD² (x 1e-3) of every feed, one dot per seed, under the title naming the study."""
    groups = {m: [r["mmd"] for r in rows] for (m,), rows in group_by(records, ("mode",)).items()}
    plot_bars(
        groups,
        path,
        "MMD² to real test digits, x 1e-3 (lower is better)",
        "GAN study: how the DCGAN discriminator's BatchNorm is fed",
        1000.0,
        caption=caption,
    )


def run_study(args: argparse.Namespace) -> StudyReport:
    """DCGAN discriminator fed alternating / mixed / split / no-BN batches over seeds, through the
    CLI; the records, the sample-quality table, the verdicts and the MMD² plot (grids per run)."""
    runs = [
        {"model": {"mode": mode}, "seed_everything": s} for mode in MODES for s in range(args.seeds)
    ]
    records, wall = run_grid(cli_main, runs, args, desc="gan study")
    lines = [*_table(records, group_by(records, ("mode",))), *verdict_section(verdicts(records))]
    lines += [
        "",
        "`split` gives the discriminator per-kind BN statistics with one shared affine "
        "(`DomainBatchNorm2d(shared_affine=True)`), so the real/fake label reaches it only "
        "through the statistics, not through a per-kind shift. In training it normalises "
        "exactly as `alternating` does (each kind by its own batch statistics); `mixed` is "
        "the one feed where real and fake share one normalisation; `none` has no BN in the "
        "discriminator.",
    ]
    return StudyReport(
        records=records,
        title="DCGAN: how the discriminator's BatchNorm is fed",
        head=study_head(records, args.epochs, wall, args.jobs, args.threads),
        body=lines,
        plot=lambda path: plot(records, path),
        wall=wall,
    )


if __name__ == "__main__":
    cli_main()
