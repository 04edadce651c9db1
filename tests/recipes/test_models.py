"""The recipes' models: the two feeds' objectives, what BN sees in each, micro-batches,
BatchRenorm's warm-up, domain routing and the CNN's norm layers (built by ``create_norm``)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from lightning_norms import BatchRenorm1d, DomainBatchNorm2d, LayerNorm2d
from lightning_norms.recipes.models import VARIANTS, DigitsClassifier, SmallCNN, norm_layer


def _split(batch: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, ...]]:
    x, y, d = batch
    return [(x[d == k], y[d == k], d[d == k]) for k in (0, 1)]


def _grads(model: nn.Module, batch: object) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = model.training_step(batch, 0)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def _mixed_batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, 8, 8, generator=g)
    x[1::2] = 1 - x[1::2] * 0.5  # domain 1: another mean and spread
    return x, torch.randint(0, 10, (n,), generator=g), torch.tensor([0, 1] * (n // 2))


@pytest.mark.parametrize("variant", ["none", "layer2d", "group", "cosine"])
def test_separate_feed_has_the_mixed_objective_without_batch_statistics(variant: str) -> None:
    """Batch-independent nets: the separate step's loss and gradients equal the mixed step's."""
    torch.manual_seed(0)
    mixed = DigitsClassifier(variant=variant, feed="mixed", image_shape=(3, 8, 8))
    separate = DigitsClassifier(variant=variant, feed="separate", image_shape=(3, 8, 8))
    separate.load_state_dict(mixed.state_dict())
    batch = _mixed_batch()
    loss_m, grads_m = _grads(mixed, batch)
    loss_s, grads_s = _grads(separate, _split(batch))
    torch.testing.assert_close(loss_s, loss_m)
    for gs, gm in zip(grads_s, grads_m, strict=True):
        torch.testing.assert_close(gs, gm, rtol=1e-4, atol=1e-6)


def test_separate_feed_changes_batchnorm_training() -> None:
    """With a shared BN the same samples give another loss and other gradients: each domain is
    normalised with its own batch statistics instead of the mixture's."""
    torch.manual_seed(0)
    mixed = DigitsClassifier(variant="mixed", image_shape=(3, 8, 8))
    separate = DigitsClassifier(variant="separate", image_shape=(3, 8, 8))
    separate.load_state_dict(mixed.state_dict())
    batch = _mixed_batch()
    loss_m, grads_m = _grads(mixed, batch)
    loss_s, grads_s = _grads(separate, _split(batch))
    assert abs(loss_m.item() - loss_s.item()) > 1e-3
    assert not torch.allclose(grads_m[0], grads_s[0], rtol=1e-2, atol=1e-5)


def test_mixed_eval_uses_the_mixture_statistics() -> None:
    """After training with separate batches, the running mean of the first BN lies between the
    per-domain means (the mixture) and differs from both by more than the tolerance."""
    torch.manual_seed(0)
    model = DigitsClassifier(variant="separate", image_shape=(3, 8, 8), bn_momentum=None)
    x, y, d = _mixed_batch(64)
    conv, bn = model.net.features[0], model.net.features[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.training_step(_split((x, y, d)), 0)
    with torch.no_grad():
        h = conv(x)
    mean0 = h[d == 0].mean(dim=(0, 2, 3))
    mean1 = h[d == 1].mean(dim=(0, 2, 3))
    # cumulative average (momentum=None) over the two domain batches = the mixture's mean
    torch.testing.assert_close(bn.running_mean, (mean0 + mean1) / 2, rtol=1e-4, atol=1e-5)
    assert (mean0 - mean1).abs().max() > 0.05


@pytest.mark.parametrize(
    ("feed", "micro_batches"), [("separate", 1), ("mixed", 4), ("separate", 2)]
)
def test_renorm_warmup_counts_training_steps(feed: str, micro_batches: int) -> None:
    """BatchRenorm's clip limits ramp over `renorm_warmup` optimizer steps, however many times a
    step calls the layer (one forward per domain, micro-batches): after 2 of 4 warm-up steps
    every layer is half-way, r_max = 1 + (3 - 1) / 2 = 2 and d_max = 5 / 2 (Ioffe 2017)."""
    from lightning_norms.functional import renorm_limits
    from lightning_norms.renorm import BatchRenorm1d, BatchRenorm2d

    torch.manual_seed(0)
    model = DigitsClassifier(
        variant="renorm", feed=feed, renorm_warmup=4, micro_batches=micro_batches,
        image_shape=(3, 8, 8),
    )  # fmt: skip
    batch = _mixed_batch(32)
    for _ in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.training_step(_split(batch) if feed == "separate" else batch, 0)
    layers = [m for m in model.modules() if isinstance(m, (BatchRenorm1d, BatchRenorm2d))]
    assert len(layers) == 4
    for m in layers:
        r_max, d_max = renorm_limits(m.r_max, m.d_max, m.num_batches_tracked, m.warmup_steps)
        assert float(r_max) == pytest.approx(2.0) and float(d_max) == pytest.approx(2.5)


def test_micro_batches_normalise_each_chunk_on_its_own() -> None:
    """micro_batches=k: the loss is the mean of the k chunks' losses, each chunk through BN alone
    (its own batch statistics), as k devices without synced BN."""
    torch.manual_seed(0)
    model = DigitsClassifier(variant="mixed", micro_batches=4, image_shape=(3, 8, 8))
    x, y, d = _mixed_batch(32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = model.training_step((x, y, d), 0)
    chunks = zip(x.chunk(4), y.chunk(4), strict=True)
    ref = torch.stack([nn.functional.cross_entropy(model.net(xc), yc) for xc, yc in chunks]).mean()
    torch.testing.assert_close(loss, ref)
    whole = nn.functional.cross_entropy(model.net(x), y)
    assert abs(whole.item() - loss.item()) > 1e-3
    with pytest.raises(ValueError, match="micro_batches"):
        model.training_step((x[:30], y[:30], d[:30]), 0)


def test_split_variant_routes_domains_in_train_and_eval() -> None:
    """split: a mixed batch gives each sample what its own domain-only batch gives."""
    torch.manual_seed(0)
    model = DigitsClassifier(variant="split", image_shape=(3, 8, 8))
    x, _, d = _mixed_batch()
    for train in (True, False):
        twin = copy.deepcopy(model).train(train)
        out = twin(x, d)
        for k in (0, 1):
            solo = copy.deepcopy(model).train(train)
            torch.testing.assert_close(out[d == k], solo(x[d == k], k), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="domain"):
        model(x)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_small_cnn_size(variant: str) -> None:
    model = DigitsClassifier(variant=variant, image_shape=(3, 8, 8))
    n = sum(p.numel() for p in model.net.parameters())
    assert 3_000 <= n <= 100_000
    assert model(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])).shape == (4, 10)


def test_small_cnn_rejects_unknown_norm() -> None:
    with pytest.raises(ValueError, match="norm"):
        SmallCNN((3, 8, 8), 10, norm="instance")
    with pytest.raises(ValueError, match="variant"):
        DigitsClassifier(variant="batch")


@pytest.mark.parametrize(
    ("kind", "dims", "reference"),
    [
        ("batch", 2, lambda: nn.BatchNorm2d(6, momentum=0.2)),
        ("batch", 1, lambda: nn.BatchNorm1d(6, momentum=0.2)),
        ("domain", 2, lambda: DomainBatchNorm2d(6, 3, momentum=0.2)),
        (
            "renorm",
            1,
            lambda: BatchRenorm1d(6, momentum=0.2, warmup_steps=7),
        ),
        ("layer2d", 2, lambda: LayerNorm2d(6)),
        ("group", 2, lambda: nn.GroupNorm(2, 6)),
        ("cosine", 2, nn.Identity),
        ("none", 1, nn.Identity),
    ],
)
def test_norm_layer_is_create_norm_with_the_recipe_settings(
    kind: str, dims: int, reference: object
) -> None:
    """Each kind is the layer built directly with the recipe's settings (momentum 0.2, 3 domains,
    warm-up 7, 4 groups reduced to gcd(6, 4) = 2)."""
    layer = norm_layer(
        kind, 6, dims=dims, num_domains=3, bn_momentum=0.2, renorm_warmup=7, num_groups=4
    )
    expected = reference()  # type: ignore[operator]
    assert type(layer) is type(expected) and repr(layer) == repr(expected)
    with pytest.raises(ValueError, match="kind"):
        norm_layer("instance", 6)


def test_norm_layer_layer2d_on_vectors_is_a_layernorm_over_the_features() -> None:
    """``layer2d`` in the head (``dims=1``) normalises each sample over its features, as
    ``nn.LayerNorm`` does (affine included)."""
    torch.manual_seed(0)
    layer = norm_layer("layer2d", 6, dims=1)
    reference = nn.LayerNorm(6)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
        reference.load_state_dict(layer.state_dict())
    x = torch.randn(5, 6) * 3 + 1
    torch.testing.assert_close(layer(x), reference(x))
