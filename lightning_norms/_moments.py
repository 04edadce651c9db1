"""Exact per-channel moments: counts, means and centred sums of squares, merged with Chan's formula.

Private tensor math behind :func:`lightning_norms.stats.recompute_bn_stats`. A set of moments is a
triple ``(count[G], mean[G, C], m2[G, C])`` in float64, one row per group (a domain of a
``DomainBatchNorm`` layer, or a single group for plain BN), where ``m2`` is the sum of squared
deviations from the group mean. Two sets merge exactly (Chan, Golub & LeVeque 1979):

    n = n_a + n_b,  delta = mean_b - mean_a,
    mean = mean_a + delta * n_b / n,  m2 = m2_a + m2_b + delta**2 * n_a * n_b / n

so the merged statistics equal those of the concatenated data, whatever the batch sizes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

Moments = tuple[Tensor, Tensor, Tensor]

_STATS_DTYPES = (torch.float32, torch.float64)


def zero_moments(num_groups: int, num_channels: int, device: torch.device) -> Moments:
    """Empty moments (count 0) for ``num_groups`` groups of ``num_channels`` channels.

    Example:
        >>> n, mean, m2 = zero_moments(2, 3, torch.device("cpu"))
        >>> n.tolist(), mean.shape, m2.dtype
        ([0.0, 0.0], torch.Size([2, 3]), torch.float64)
    """
    count = torch.zeros(num_groups, dtype=torch.float64, device=device)
    mean = torch.zeros(num_groups, num_channels, dtype=torch.float64, device=device)
    return count, mean, torch.zeros_like(mean)


def batch_moments(x: Tensor, ids: Tensor | None = None, num_groups: int = 1) -> Moments:
    """Per-channel count, mean and centred sum of squares of ``x`` (channels on dim 1).

    Two passes over ``x`` (mean, then squared deviations from it) in float32 (float64 input stays
    float64; fp16/bf16 is upcast), results returned in float64. With ``ids`` (one group id per
    sample) the moments are computed per group with segment sums; groups without samples get
    count 0 and zero mean/m2.

    Args:
        x: activations ``[N, C, *]``.
        ids: optional ``LongTensor[N]`` of group ids in ``[0, num_groups)``. Default: ``None``.
        num_groups: number of groups when ``ids`` is given. Default: ``1``.

    Shape:
        - Output: ``count[G]``, ``mean[G, C]``, ``m2[G, C]`` with ``G = num_groups``.

    Example:
        >>> n, mean, m2 = batch_moments(torch.tensor([[1.0], [3.0]]))
        >>> n.tolist(), mean.tolist(), m2.tolist()
        ([2.0], [[2.0]], [[2.0]])
        >>> n, mean, m2 = batch_moments(torch.tensor([[1.0], [3.0], [5.0]]),
        ...                             torch.tensor([0, 1, 1]), num_groups=3)
        >>> n.tolist(), mean.tolist(), m2.tolist()
        ([1.0, 2.0, 0.0], [[1.0], [4.0], [0.0]], [[0.0], [2.0], [0.0]])
    """
    xf = x if x.dtype in _STATS_DTYPES else x.float()
    num_channels = x.shape[1]
    if ids is None:
        dims = [0, *range(2, x.dim())]
        shape = [1, num_channels] + [1] * (x.dim() - 2)
        mean = xf.mean(dims)
        m2 = (xf - mean.view(shape)).square().sum(dims)
        count = torch.full((1,), x.numel() // num_channels, dtype=torch.float64, device=x.device)
        return count, mean.double()[None], m2.double()[None]
    xs = xf.reshape(x.shape[0], num_channels, -1)
    per_sample = xs.shape[2]
    count = torch.bincount(ids, minlength=num_groups).to(torch.float64) * per_sample
    sums = xs.new_zeros(num_groups, num_channels).index_add_(0, ids, xs.sum(2))
    mean = sums / count.clamp_min(1.0).to(xf.dtype)[:, None]
    sq = (xs - mean[ids][:, :, None]).square().sum(2)
    m2 = xs.new_zeros(num_groups, num_channels).index_add_(0, ids, sq)
    return count, mean.double(), m2.double()


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Chan's exact merge of two sets of moments (float64); empty groups are neutral.

    Example:
        >>> x = torch.tensor([[1.0], [2.0], [4.0], [7.0], [8.0]])
        >>> n, mean, m2 = merge_moments(batch_moments(x[:2]), batch_moments(x[2:]))
        >>> ref_n, ref_mean, ref_m2 = batch_moments(x)
        >>> bool(torch.allclose(mean, ref_mean) and torch.allclose(m2, ref_m2)), n.tolist()
        (True, [5.0])
    """
    n_a, mean_a, m2_a = a
    n_b, mean_b, m2_b = b
    n = n_a + n_b
    safe_n = n.clamp_min(1.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / safe_n)[:, None]
    m2 = m2_a + m2_b + delta.square() * (n_a * n_b / safe_n)[:, None]
    return n, mean, m2


def merge_stacked(counts: Tensor, means: Tensor, m2s: Tensor) -> Moments:
    """Exact merge of ``K`` stacked sets of moments at once (float64; empty parts are neutral).

    ``n = sum_k n_k``, ``mean = sum_k n_k mean_k / n``,
    ``m2 = sum_k (m2_k + n_k (mean_k - mean)**2)``: Chan's formula for ``K`` parts.

    Shape:
        - Input: ``counts[K, G]``, ``means[K, G, C]``, ``m2s[K, G, C]``.
        - Output: ``count[G]``, ``mean[G, C]``, ``m2[G, C]``.

    Example:
        >>> x = torch.tensor([[1.0], [2.0], [4.0], [7.0], [8.0]])
        >>> parts = [batch_moments(x[:2]), batch_moments(x[2:3]), batch_moments(x[3:])]
        >>> n, mean, m2 = merge_stacked(*(torch.stack(p) for p in zip(*parts)))
        >>> ref_n, ref_mean, ref_m2 = batch_moments(x)
        >>> bool(torch.allclose(mean, ref_mean) and torch.allclose(m2, ref_m2)), n.tolist()
        (True, [5.0])
    """
    n = counts.sum(0)
    weights = counts[..., None]
    mean = (weights * means).sum(0) / n.clamp_min(1.0)[:, None]
    m2 = (m2s + weights * (means - mean).square()).sum(0)
    return n, mean, m2


def all_reduce_moments(moments: list[Moments], group: dist.ProcessGroup | None = None) -> None:
    """Merge every rank's moments in place so each rank holds the moments of all ranks' data.

    Two float64 all-reduces over one packed buffer: counts and sums first, which give the global
    means; then each rank's ``m2 + n * (mean - global_mean)**2``, the exact parallel merge. Every
    rank must call this with the same list layout (same groups and channels), including ranks
    that saw no data (count 0), so the collectives always match.

    Example:
        >>> moments = [batch_moments(torch.ones(2, 3))]
        >>> all_reduce_moments(moments) if dist.is_available() and dist.is_initialized() else None
    """
    if not moments:
        return
    device = moments[0][0].device
    counts = [n.to(device) for n, _, _ in moments]
    means = [mean.to(device) for _, mean, _ in moments]
    first = torch.cat(
        [*counts, *((n[:, None] * mean).flatten() for n, mean in zip(counts, means, strict=True))]
    )
    dist.all_reduce(first, group=group)
    sizes = [n.numel() for n in counts] + [mean.numel() for mean in means]
    parts = first.split(sizes)
    k = len(moments)
    global_counts = parts[:k]
    global_means = [
        (s.view_as(mean) / n.clamp_min(1.0)[:, None])
        for s, n, mean in zip(parts[k:], global_counts, means, strict=True)
    ]
    second = torch.cat(
        [
            (m2.to(device) + n[:, None] * (mean - g_mean).square()).flatten()
            for (_, _, m2), n, mean, g_mean in zip(
                moments, counts, means, global_means, strict=True
            )
        ]
    )
    dist.all_reduce(second, group=group)
    m2_parts = second.split([mean.numel() for mean in means])
    for i, (n, mean, m2) in enumerate(moments):
        n.copy_(global_counts[i])
        mean.copy_(global_means[i])
        m2.copy_(m2_parts[i].view_as(m2))
