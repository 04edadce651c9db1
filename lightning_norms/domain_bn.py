"""Domain-split BatchNorm: share every weight, keep BatchNorm statistics per domain.

Li et al. 2016 (AdaBN, arXiv:1603.04779) and Chang et al. 2019 (Domain-Specific Batch
Normalization, arXiv:1906.03950): when training batches mix data sources (e.g. MNIST and
SVHN), one set of BatchNorm statistics describes neither source. ``DomainBatchNorm*d`` keeps
one set per domain (running statistics ``[num_domains, C]``, and affine parameters per domain
unless ``shared_affine=True``) and normalises every sample with its own domain's statistics,
in one call even for a mixed batch. ``domain(model, ids)`` routes models whose ``forward``
takes only ``x`` (torchvision ResNets) without changing them.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_norms import functional as LF
from lightning_norms._base import BatchNormBase
from lightning_norms._shared import check_int
from lightning_norms._tracing import eager
from lightning_norms.functional._domain import check_domains, expand_domains, host_ids

__all__ = ["DomainBatchNorm1d", "DomainBatchNorm2d", "DomainBatchNorm3d", "domain"]


class _DomainBatchNorm(BatchNormBase):
    """Common base of ``DomainBatchNorm1d/2d/3d``; see :class:`DomainBatchNorm2d`."""

    # per-layer bookkeeping, class-level defaults so modules pickled before they existed load
    _module_path: str = ""  # set by domain(): where the layer sits in the model it routes
    _last_ids: int | Tensor | None = None  # ids of the last forward routed by domain()
    _rare_seen: Tensor | None = None  # BoolTensor[D]: one-value domains seen, until warned
    _rare_warned: bool = False

    def __init__(
        self,
        num_features: int,
        num_domains: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        shared_affine: bool = False,
        *,
        sync: bool = False,
        process_group: Any = None,
    ) -> None:
        num_domains = check_int("num_domains", num_domains, 1, where=type(self).__name__)
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device=device,
            dtype=dtype,
            sync=sync,
            process_group=process_group,
        )
        self.num_domains = num_domains
        self.shared_affine = shared_affine
        self._domain_ids: int | Tensor | None = None
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        shape = (num_domains, num_features)
        if affine and not shared_affine:
            self.weight = nn.Parameter(torch.empty(shape, **factory))
            self.bias = nn.Parameter(torch.empty(shape, **factory))
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(shape, **factory))
            self.register_buffer("running_var", torch.ones(shape, **factory))
            self.register_buffer(
                "num_batches_tracked",
                torch.zeros(num_domains, dtype=torch.long, device=device),
            )
        self.reset_parameters()

    def _name(self) -> str:
        return f"{type(self).__name__}({self.num_features}, num_domains={self.num_domains})"

    def _ids(self, domain: int | Tensor | None) -> int | Tensor:
        """``domain``, or the ids set by :func:`domain`; raises naming the layer if neither.

        An activation-checkpointing recompute (a forward run inside a backward pass, after the
        ``with domain(...)`` block exited: Lightning's automatic optimisation) gets the ids of
        the layer's last forward routed by :func:`domain`, those the original forward used.
        """
        if domain is not None:
            return domain
        if self._domain_ids is not None:
            if eager():
                self._last_ids = self._domain_ids
            return self._domain_ids
        if self._last_ids is not None and torch._C._current_graph_task_id() != -1:
            return self._last_ids
        raise ValueError(
            f"{self._name()}: no domain given; call it as `layer(x, domain=ids)` or run the "
            "model inside `with lightning_norms.domain(model, ids):`"
        )

    def resolve_domain(self, x: Tensor, domain: int | Tensor | None = None) -> Tensor:
        """Per-sample domain ids for ``x``: validated ``LongTensor[N]`` on ``x``'s device.

        Args:
            x: the layer's input (only its batch size and device are used).
            domain: an ``int`` (broadcast over the batch), a ``LongTensor[N]``, or ``None``
                for the ids set by :func:`domain`. Default: ``None``.

        Raises:
            ValueError: ids not integer, not of shape ``[N]``, outside
                ``[0, num_domains)``, or none given and none set; the message names the layer.

        Example:
            >>> bn = DomainBatchNorm2d(3, num_domains=2)
            >>> bn.resolve_domain(torch.randn(4, 3, 2, 2), 1)
            tensor([1, 1, 1, 1])
        """
        ids = check_domains(self._ids(domain), x.shape[0], self.num_domains, self._name())
        return expand_domains(ids, x)

    def forward(self, input: Tensor, domain: int | Tensor | None = None) -> Tensor:
        self._check_input_dim(input)
        ids = self._ids(domain)
        rare = self._rare_record(input, ids)
        state = self._norm_state()
        out = LF.domain_batch_norm(
            x=input,
            domains=ids,
            num_domains=self.num_domains,
            running_mean=state.running_mean,
            running_var=state.running_var,
            weight=self.weight,
            bias=self.bias,
            training=state.training,
            momentum=self.momentum,
            eps=self.eps,
            num_batches_tracked=state.num_batches_tracked,
            sync=state.sync,
            process_group=state.process_group,
            name=self._name(),
            rare_domains=rare,
        )
        if rare is not None and rare.device.type == "cpu":  # a host read is free on CPU
            self._warn_rare()
        return out

    def _rare_record(self, x: Tensor, ids: int | Tensor) -> Tensor | None:
        """Where the kernel records one-value domains (device-side), until the layer warned.

        Nothing while ``torch.compile`` or a ``torch.func`` transform traces (a tensor made
        there must not outlive it), for an ``int`` domain (it raises instead), nor on CPU
        where no domain can have one value: more than one position per sample, or no domain
        with a single sample (:func:`host_ids`, shared with the range check), unless
        synchronised (global counts). So the record's host read on CPU happens only where a
        domain may have used its running statistics.
        """
        batch_stats = self.training or not self.track_running_stats
        if self._rare_warned or not batch_stats or not eager():
            return None
        if not isinstance(ids, Tensor) or ids.dim() == 0:
            return None
        local_cpu = x.device.type == "cpu" and ids.device.type == "cpu" and not self.sync_active()
        if local_cpu and not self._may_be_rare(x, ids):
            return None
        if self._rare_seen is None or self._rare_seen.device != x.device:
            self._rare_seen = torch.zeros(self.num_domains, dtype=torch.bool, device=x.device)
        return self._rare_seen

    @staticmethod
    def _may_be_rare(x: Tensor, ids: Tensor) -> bool:
        """Whether a domain of this local batch can have one value per channel (CPU ids)."""
        return x.shape[2:].numel() == 1 and 1 in host_ids(ids).rows.values()

    def _warn_rare(self) -> None:
        """Warn once that a domain with one value per channel used its running statistics.

        Reads the device-side record (one host read): right after the forward on CPU, where it
        is free; on accelerators at the next ``train()`` / ``eval()``, outside forward and
        backward. After the warning the layer records nothing more.
        """
        seen = self._rare_seen
        if self._rare_warned or seen is None or seen.is_meta or not bool(seen.any()):
            return
        self._rare_warned, self._rare_seen = True, None
        where = f"{self._module_path}: " if self._module_path else ""
        warnings.warn(
            f"{where}{self._name()}: domain(s) {seen.nonzero().flatten().tolist()} had one "
            "value per channel in a training batch; normalised with their running statistics "
            "(not updated, eval-mode gradient). Warned once per layer.",
            UserWarning,
            stacklevel=3,
        )

    def train(self, mode: bool = True) -> _DomainBatchNorm:
        self._warn_rare()
        return super().train(mode)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Load a plain BatchNorm state too: ``[C]`` (scalar counter) copied into every domain.

        ``[num_domains, C]`` states load as they are; other shapes reach torch's own check,
        which reports a size mismatch naming the key (``RuntimeError``).
        """
        own = {**self._parameters, **self._buffers}
        for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            value, mine = state_dict.get(prefix + key), own.get(key)
            if isinstance(value, Tensor) and mine is not None and value.shape == mine.shape[1:]:
                # a copy, not a stride-0 view: load_state_dict(assign=True) keeps the tensor
                state_dict[prefix + key] = value.expand_as(mine).clone()
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    @classmethod
    def from_batchnorm(
        cls, bn: _BatchNorm, num_domains: int, shared_affine: bool = False
    ) -> _DomainBatchNorm:
        """A domain-split copy of a (trained) BatchNorm: every domain starts from its state.

        Weight and bias are copied into every domain's row (or shared), running statistics and
        ``num_batches_tracked`` too; ``eps``, ``momentum``, device, dtype and the training flag
        are kept. In eval, every domain then computes exactly what ``bn`` did.

        Args:
            bn: an ``nn.BatchNorm1d/2d/3d`` (any ``_BatchNorm`` with ``[C]`` buffers).
            num_domains: number of domains.
            shared_affine: keep one weight/bias for all domains. Default: ``False``.

        Raises:
            TypeError: ``bn`` is not a BatchNorm with per-channel ``[C]`` state.

        Example:
            >>> bn = nn.BatchNorm2d(3).eval()
            >>> dbn = DomainBatchNorm2d.from_batchnorm(bn, num_domains=2)
            >>> x = torch.randn(2, 3, 4, 4)
            >>> torch.equal(dbn(x, domain=1), bn(x))
            True
        """
        if not isinstance(bn, _BatchNorm) or isinstance(bn, _DomainBatchNorm):
            raise TypeError(
                f"{cls.__name__}.from_batchnorm: expected an nn.BatchNorm1d/2d/3d, "
                f"got {type(bn).__name__}"
            )
        ref = bn.weight if bn.weight is not None else bn.running_mean
        new = cls(
            bn.num_features,
            num_domains,
            bn.eps,
            bn.momentum,
            bn.affine,
            bn.track_running_stats,
            device=None if ref is None else ref.device,
            dtype=None if ref is None else ref.dtype,
            shared_affine=shared_affine,
            sync=bool(getattr(bn, "sync", False)),
            process_group=getattr(bn, "process_group", None),
        )
        with torch.no_grad():
            pairs = [
                (new.weight, bn.weight),
                (new.bias, bn.bias),
                (new.running_mean, bn.running_mean),
                (new.running_var, bn.running_var),
                (new.num_batches_tracked, bn.num_batches_tracked),
            ]
            for dst, src in pairs:
                if dst is not None and src is not None:
                    dst.copy_(src.expand_as(dst))
        new.train(bn.training)
        return new

    def _extra_fields(self) -> list[str]:
        fields = [f"num_domains={self.num_domains}"]
        return [*fields, "shared_affine=True"] if self.shared_affine else fields


class DomainBatchNorm1d(_DomainBatchNorm):
    r"""Domain-split BatchNorm over a 2D ``(N, C)`` or 3D ``(N, C, L)`` input.

    Same arguments, buffers and behaviour as :class:`DomainBatchNorm2d`, for the inputs of
    ``nn.BatchNorm1d``.

    Shape:
        - Input: :math:`(N, C)` or :math:`(N, C, L)`
        - Output: same shape as input

    Example:
        >>> m = DomainBatchNorm1d(5, num_domains=2)
        >>> m(torch.randn(8, 5), domain=torch.tensor([0, 1] * 4)).shape
        torch.Size([8, 5])
    """

    _dims = 1


class DomainBatchNorm2d(_DomainBatchNorm):
    r"""Domain-split BatchNorm over a 4D ``(N, C, H, W)`` input: statistics per domain.

    Li et al. 2016, "Revisiting Batch Normalization For Practical Domain Adaptation" (AdaBN,
    arXiv:1603.04779); Chang et al. 2019, "Domain-Specific Batch Normalization for
    Unsupervised Domain Adaptation" (arXiv:1906.03950). A sample of domain :math:`d` gets

    .. math::

        y = \frac{x - \mu_d}{\sqrt{\sigma^2_d + \epsilon}}\, \gamma_d + \beta_d

    with the batch statistics of domain :math:`d`'s samples in training (the running ones of
    row :math:`d` in eval). A mixed batch gives exactly what each domain's sub-batch gives
    through its own ``nn.BatchNorm2d`` (outputs, gradients, running statistics), in one call:
    row statistics merged per domain by an index-add, one fused normalisation kernel, and a
    custom backward. An ``int`` domain is a single ``F.batch_norm`` on the row's views.

    Domain ids come from ``forward(x, domain)`` (an ``int`` or a ``LongTensor[N]``) or, when
    ``domain`` is ``None``, from the ``lightning_norms.domain(model, ids)`` context manager.

    Buffers: ``running_mean``/``running_var`` ``[num_domains, C]``; ``num_batches_tracked``
    ``LongTensor[num_domains]``, the number of training batches each domain appeared in (so
    ``momentum=None``, a cumulative average, is exact per domain; a domain absent from a batch
    keeps its statistics and its count). An empty batch, or a call that raises, leaves every
    buffer as it was. ``load_state_dict`` also takes a plain ``nn.BatchNorm2d`` state
    (``[C]`` tensors, scalar counter), copied into every domain as :meth:`from_batchnorm`.

    A rare domain never crashes training: with per-sample ids, a domain that has one value
    per channel (one sample at a 1x1 map, resnet layer4 at 32x32 input) is normalised with its
    running statistics (eval formula and eval-mode gradient) and leaves them and its
    ``num_batches_tracked`` entry untouched; the other domains are unaffected. The layer warns
    once (``UserWarning`` with its module path when :func:`domain` routed it): right away on
    CPU, at the next ``train()``/``eval()`` on accelerators (no host read in forward). Without
    running statistics such a domain gets ``beta``. An ``int`` domain of one value per channel
    raises like ``nn.BatchNorm2d``.

    Gradients of any order are exact (a gradient penalty through the layer, per-sample ids
    and ``sync`` included): the custom backward switches to differentiable ops when a graph
    of the gradient is asked for (``create_graph=True``). The output is never a view, so
    ``nn.ReLU(inplace=True)`` or ``out += identity`` after the layer are fine. A fp16/bf16
    module (or input under ``torch.autocast``) takes its statistics in fp32 and returns the
    input's dtype, as ``nn.BatchNorm2d``.

    With ``sync=True`` (or a ``process_group``), in training under ``torch.distributed``, the
    per-domain counts, means and sums of squared deviations are all-reduced (one fp64
    all-reduce) and the backward's sums too, so every rank normalises with the global
    statistics, on CPU (gloo) and GPU (nccl). Every rank joins the same collectives whatever
    domains it holds; a domain with one value per channel over all ranks follows the rule
    above on every rank. Eval uses the running statistics (no collectives).

    Transforms: ``torch.compile`` (no graph breaks, no recompile when only the domain
    composition changes), ``torch.func`` (``grad``, ``vmap``, ``functional_call``; training
    with running statistics under ``vmap`` is refused as for ``nn.BatchNorm2d``), activation
    checkpointing with :func:`domain` (see there), ``copy.deepcopy`` and pickling.

    Args:
        num_features: number of channels ``C``.
        num_domains: number of domains ``D``.
        eps: added to the variance. Default: ``1e-5``.
        momentum: running-average factor; ``None`` for a cumulative average. Default: ``0.1``.
        affine: learnable ``gamma``/``beta``. Default: ``True``.
        track_running_stats: keep running statistics; if ``False`` batch statistics (per
            domain) are used in eval too. Default: ``True``.
        device: parameter/buffer device. Default: ``None``.
        dtype: parameter/buffer dtype. Default: ``None``.
        shared_affine: one ``[C]`` weight/bias for all domains instead of ``[D, C]``.
            Default: ``False``.
        sync: all-reduce batch statistics across ranks (keyword only). Default: ``False``.
        process_group: group to reduce over, implies ``sync`` (keyword only).
            Default: ``None``.

    Shape:
        - Input: :math:`(N, C, H, W)`; ``domain``: ``int`` or :math:`(N)`
        - Output: same shape as input

    Raises:
        ValueError: wrong input rank or channels; domain ids not integer, not ``[N]``, outside
            ``[0, num_domains)`` (a device-side assert off CPU), or missing; an ``int``
            domain with one value per channel in training.

    Example:
        >>> m = DomainBatchNorm2d(3, num_domains=2)
        >>> x = torch.randn(6, 3, 4, 4)
        >>> ids = torch.tensor([0, 1, 1, 0, 1, 0])
        >>> y = m(x, domain=ids)
        >>> ref = nn.BatchNorm2d(3)(x[ids == 1])
        >>> torch.allclose(y[ids == 1], ref, atol=1e-5)
        True
        >>> m.running_mean.shape, m.num_batches_tracked
        (torch.Size([2, 3]), tensor([1, 1]))
    """

    _dims = 2


class DomainBatchNorm3d(_DomainBatchNorm):
    r"""Domain-split BatchNorm over a 5D ``(N, C, D, H, W)`` input.

    Same arguments, buffers and behaviour as :class:`DomainBatchNorm2d`, for the inputs of
    ``nn.BatchNorm3d``.

    Shape:
        - Input: :math:`(N, C, D, H, W)`
        - Output: same shape as input

    Example:
        >>> m = DomainBatchNorm3d(2, num_domains=3)
        >>> m(torch.randn(4, 2, 3, 3, 3), domain=2).shape
        torch.Size([4, 2, 3, 3, 3])
    """

    _dims = 3


@contextmanager
def domain(model: nn.Module, ids: int | Tensor) -> Iterator[nn.Module]:
    """Set the domain ids of every ``DomainBatchNorm`` inside ``model`` for a ``with`` block.

    For models whose ``forward`` takes only ``x`` (torchvision ResNets after
    ``convert_norms(model, "domain", num_domains=...)``): inside the block, every
    ``DomainBatchNorm*d`` called with ``domain=None`` uses ``ids``. The previous ids are
    restored on exit, also on error, so blocks nest. A model without ``DomainBatchNorm`` layers
    is left as it is (the same training code then runs a shared-BN baseline) with a
    ``UserWarning`` naming its class, as the ids route nothing. The block also names each
    layer by its module path (used in the layer's warnings).

    Activation checkpointing (``torch.utils.checkpoint`` either mode, timm's
    ``set_grad_checkpointing()``) with ``backward()`` after the block: the recompute runs
    inside the backward pass, where each layer uses the ids of its last forward routed by a
    block, those of the original forward. So several forwards under different blocks before
    one ``backward()`` (two views with different ids, both checkpointed) recompute with the
    last block's ids: pass ``domain=`` explicitly there. As for ``nn.BatchNorm2d``, the
    recompute updates the running statistics a second time.

    Not thread-safe: the ids are stored on the modules, so two threads running the same model
    object under different ``domain(...)`` blocks see each other's ids. Use one model replica
    per thread (DDP processes are fine) or pass ``domain=`` explicitly. Per-sample ids are not
    split by ``nn.DataParallel`` (the batch-size check then raises); an ``int`` works.

    Args:
        model: module whose ``DomainBatchNorm`` layers get the ids (it may be one itself).
        ids: an ``int`` (whole batch one domain) or ``LongTensor[N]`` of per-sample ids,
            checked by each layer against its input.

    Raises:
        ValueError: ``ids`` is neither an ``int`` nor an integer tensor.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), DomainBatchNorm2d(4, num_domains=2)).eval()
        >>> x = torch.randn(2, 3, 8, 8)
        >>> with domain(net, 1):
        ...     y = net(x)
        >>> torch.equal(y, net[1](net[0](x), domain=1))
        True
    """
    is_int = isinstance(ids, int) and not isinstance(ids, bool)
    is_int_tensor = isinstance(ids, Tensor) and not (
        ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex()
    )
    if not (is_int or is_int_tensor):
        raise ValueError(f"domain(): ids must be an int or an integer tensor, got {ids!r}")
    layers = [m for m in model.modules() if isinstance(m, _DomainBatchNorm)]
    if not layers:
        warnings.warn(
            f"domain(): {type(model).__name__} has no DomainBatchNorm layer; the ids route "
            "nothing (convert it first: convert_norms(model, 'domain', num_domains=...))",
            UserWarning,
            stacklevel=3,
        )
    for name, m in model.named_modules():
        if isinstance(m, _DomainBatchNorm) and name and not m._module_path:
            m._module_path = name
    previous = [m._domain_ids for m in layers]
    try:
        for m in layers:
            m._domain_ids = ids
        yield model
    finally:
        for m, old in zip(layers, previous, strict=True):
            m._domain_ids = old
