"""``mix_real_fake``: one shuffled real/fake batch for a GAN discriminator with BatchNorm."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["mix_real_fake"]


def mix_real_fake(
    real: Tensor, fake: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Concatenate a real and a fake batch and shuffle them into one discriminator batch.

    The shared-tower BN pitfall, for GANs: a discriminator fed alternating all-real and
    all-fake batches normalises each with its own batch statistics, so BatchNorm itself tells
    real from fake in training, while its running averages (used at test time) converge to the
    mixture. Feeding one batch that holds both makes every BN layer see the real/fake mixture.

    Formula: ``x = cat([real, fake])[perm]`` with ``perm`` a random permutation of
    ``range(len(real) + len(fake))``, and ``is_real = (perm < len(real))``. Undo it with
    ``inv = perm.argsort()`` (``x[inv] == cat([real, fake])``), or scatter an output back:
    ``out_unshuffled = torch.empty_like(out); out_unshuffled[perm] = out``; then the first
    ``len(real)`` rows belong to ``real``. Gradients flow back to ``real`` and ``fake``.

    Args:
        real: real examples, ``[N_r, *]``.
        fake: generated examples, ``[N_f, *]``, same trailing shape, dtype and device as ``real``.
        generator: optional ``torch.Generator`` for the permutation. Default ``None``: the
            default generator of ``real``'s device. A generator on another device than
            ``real`` draws the permutation there and moves it (a few bytes) to ``real``'s device.

    Shape:
        - x: ``[N_r + N_f, *]``, on ``real``'s device.
        - is_real: ``[N_r + N_f]``, float labels (1 real, 0 fake) in ``real``'s dtype when it is a
          floating dtype, else ``float32`` — a ready target for
          ``binary_cross_entropy_with_logits``; ``is_real.bool()`` masks the real rows.
        - perm: ``[N_r + N_f]`` long, on ``real``'s device.

    Raises:
        TypeError: ``real``/``fake`` not tensors, or ``generator`` not a ``torch.Generator``.
        ValueError: zero-dimensional or empty inputs, or ``real`` and ``fake`` differing in
            trailing shape, dtype or device.

    Example:
        >>> real, fake = torch.ones(3, 2), torch.zeros(2, 2)
        >>> x, is_real, perm = mix_real_fake(real, fake, torch.Generator().manual_seed(0))
        >>> x.shape, bool((x[:, 0] == is_real).all())
        (torch.Size([5, 2]), True)
        >>> bool(torch.equal(x[perm.argsort()], torch.cat([real, fake])))
        True
    """
    for name, t in (("real", real), ("fake", fake)):
        if not isinstance(t, Tensor):
            raise TypeError(f"mix_real_fake: `{name}` must be a Tensor, got {type(t).__name__}")
        if t.dim() == 0 or t.shape[0] == 0:
            raise ValueError(
                f"mix_real_fake: `{name}` must be a batch [N, *] with N >= 1, "
                f"got shape {tuple(t.shape)}"
            )
    if real.shape[1:] != fake.shape[1:]:
        raise ValueError(
            "mix_real_fake: `real` and `fake` must have the same shape after the batch dim, got "
            f"{tuple(real.shape)} and {tuple(fake.shape)}"
        )
    if real.dtype != fake.dtype:
        raise ValueError(
            "mix_real_fake: `real` and `fake` must share a dtype, got "
            f"{real.dtype} and {fake.dtype}"
        )
    if real.device != fake.device:
        raise ValueError(
            "mix_real_fake: `real` and `fake` must be on one device, got "
            f"{real.device} and {fake.device}"
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"mix_real_fake: `generator` must be a torch.Generator, got {type(generator).__name__}"
        )
    n_real, total = real.shape[0], real.shape[0] + fake.shape[0]
    if generator is None:
        perm = torch.randperm(total, device=real.device)
    else:
        perm = torch.randperm(total, generator=generator, device=generator.device)
        perm = perm.to(real.device)
    x = torch.cat([real, fake])[perm]
    label_dtype = real.dtype if real.is_floating_point() else torch.float32
    is_real = (perm < n_real).to(label_dtype)
    return x, is_real, perm
