"""Every registry entry (``tests/_registry.py``) under every transform users apply.

One test per transform, parametrised over the registry, as torch's ``test_modules.py`` runs
``module_db``: eager training and eval against the float64 reference on every sample input
(hard cases included), gradgradcheck, activation checkpointing (both modes, explicit ids and
``domain()``), ``torch.func`` (``grad``, ``functional_call``, ``vmap`` per-sample gradients),
``torch.compile`` (aot_eager on every entry, inductor on a subset), ``torch.export``,
``torch.onnx.export`` in onnxruntime, ``torch.jit.trace`` + save/load, deepcopy/pickle,
``state_dict`` round trips, plain-BN state loading, and a 2-rank gloo run against one process.
A transform an entry cannot support is skipped with the registry's reason; a known bug is a
strict xfail naming the issue-17 item (it fails once fixed: then drop the mark in the registry).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call, grad, vmap
from torch.utils.checkpoint import checkpoint

import lightning_norms as ln
from tests._dist import run_ddp
from tests._registry import (
    BY_NAME,
    F64,
    REGISTRY,
    LayerInfo,
    Sample,
    coverage_markdown,
    reference,
)

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*one value per channel:UserWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning"),
]

# (rtol, atol) against the float64 reference, by the dtype the layer runs in
TOL: dict[torch.dtype, tuple[float, float]] = {
    F64: (1e-7, 1e-9),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 4e-3),
    torch.bfloat16: (1e-2, 1.6e-2),
}


def _marks(info: LayerInfo, transform: str, variant: str = "") -> list[pytest.MarkDecorator]:
    """The registry's skip or strict xfail for ``transform`` (``"func"``, or ``"func[train]"``
    for one variant)."""
    for key in (f"{transform}[{variant}]", transform):
        if key in info.skips:
            return [pytest.mark.skip(reason=info.skips[key])]
        if key in info.xfails:
            return [pytest.mark.xfail(strict=True, reason=info.xfails[key])]
    return []


def _entries(
    transform: str,
    only: Callable[[LayerInfo], bool] = lambda _: True,
    variants: tuple[str, ...] = ("",),
) -> list[Any]:
    """``pytest.param(info, [variant])`` for every entry ``only`` keeps, with its marks."""
    return [
        pytest.param(
            info, *([v] if v else []), id=f"{info.name}-{v}" if v else info.name,
            marks=_marks(info, transform, v),
        )
        for info in REGISTRY
        if only(info)
        for v in variants
    ]


def _sample_cases(transform: str) -> list[Any]:
    cases = []
    for info in REGISTRY:
        for sample in info.samples:
            marks = _marks(info, transform)
            if transform == "train" and sample.xfail and not marks:
                marks = [pytest.mark.xfail(strict=True, reason=sample.xfail)]
            cases.append(pytest.param(info, sample, id=f"{info.name}-{sample.name}", marks=marks))
    return cases


def _state(layer: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


def _close(
    actual: Tensor, expected: Tensor, dtype: torch.dtype, what: str, plain: Tensor | None
) -> None:
    """Within the dtype's tolerance of the float64 truth or, where ``plain`` is given, no
    further from it than twice what torch's own ops reach in that dtype (BatchNorm with 3
    samples at mean 100 is ill-conditioned in float32; an entry that computes through torch's
    kernels in fp16/bf16 is held to torch's accuracy there)."""
    rtol, atol = TOL[dtype]
    expected = expected.detach().to(F64)
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    atol *= scale
    if plain is not None and expected.numel():
        atol = max(atol, 2 * float((plain.detach().to(F64) - expected).abs().max()))
    torch.testing.assert_close(
        actual.detach().to(F64), expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}"
    )


def _upstream(out: Tensor) -> Tensor:
    """A fixed non-uniform output gradient (a plain sum would hide BN's input gradient)."""
    gen = torch.Generator().manual_seed(7)
    return torch.randn(out.shape, generator=gen, dtype=F64)


def _run(layer: nn.Module, x: Tensor, sample: Sample) -> tuple[Tensor, Tensor]:
    """Output and input gradient of ``layer`` (parameter gradients land in ``.grad``)."""
    x = x.detach().clone().requires_grad_(True)
    out = layer(x, **sample.kwargs())
    out.backward(_upstream(out).to(out.dtype))
    return out, x.grad


def _results(info: LayerInfo, layer: nn.Module, sample: Sample, x: Tensor) -> dict[str, Tensor]:
    """The reference's output, gradients and buffers, in ``x``'s dtype."""
    x = x.detach().clone().requires_grad_(True)
    out, state = reference(info, layer, x, sample)
    out.backward(_upstream(out).to(out.dtype))
    found = {"output": out.detach(), "input gradient": x.grad}
    for name, p in state.named_parameters():
        found[f"gradient of {name}"] = torch.zeros_like(p) if p.grad is None else p.grad
    found.update((f"buffer {name}", b) for name, b in state.named_buffers())
    return found


def _check_against_reference(info: LayerInfo, layer: nn.Module, sample: Sample, seed: int) -> None:
    x = sample.make(seed)
    truth = _results(info, layer, sample, x.to(F64))
    as_torch = sample.dtype == torch.float32 or info.low_precision_as_torch
    plain = _results(info, layer, sample, x) if as_torch else {}
    out, x_grad = _run(layer, x, sample)
    assert out.dtype == x.dtype and out.shape == truth["output"].shape
    found = {"output": out, "input gradient": x_grad}
    for name, p in layer.named_parameters():
        found[f"gradient of {name}"] = p.grad
        p.grad = None
    found.update((f"buffer {name}", b) for name, b in layer.named_buffers())
    assert found.keys() == truth.keys()
    for what, value in found.items():
        _close(value, truth[what], sample.dtype, what, plain.get(what))


def _check_step(info: LayerInfo, layer: nn.Module, sample: Sample, seed: int) -> None:
    """One call against the reference; where the reference raises (one value per channel
    with batch statistics, as ``nn.BatchNorm*d``), the layer raises and changes nothing."""
    try:
        reference(info, layer, sample.make(seed).to(F64), sample)
    except ValueError as error:
        assert "value per channel" in str(error)
        before = _state(layer)
        with pytest.raises(ValueError, match="value per channel"):
            layer(sample.make(seed), **sample.kwargs())
        for key, value in layer.state_dict().items():
            assert torch.equal(value, before[key]), key
        return
    _check_against_reference(info, layer, sample, seed)


@pytest.mark.parametrize(("info", "sample"), _sample_cases("train"))
def test_train(info: LayerInfo, sample: Sample) -> None:
    """Two training steps against the reference (the second sees the first's running stats)."""
    layer = info.build(sample.dtype).train()
    for seed in (0, 1):
        _check_step(info, layer, sample, seed)


@pytest.mark.parametrize(("info", "sample"), _sample_cases("eval"))
def test_eval(info: LayerInfo, sample: Sample) -> None:
    _check_step(info, info.build(sample.dtype).eval(), sample, 0)


@pytest.mark.parametrize("info", _entries("autocast"))
def test_autocast_bf16(info: LayerInfo) -> None:
    """Statistics and norms in fp32 under autocast: bf16 accuracy against the truth."""
    layer = info.build().train()
    sample = info.default
    x = sample.make()
    truth = _results(info, layer, sample, x.to(F64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, x_grad = _run(layer, x, sample)
    found = {"output": out, "input gradient": x_grad}
    found.update((f"buffer {name}", b) for name, b in layer.named_buffers())
    for what, value in found.items():
        _close(value, truth[what], torch.bfloat16, what, None)


@pytest.mark.parametrize("precision", ["default", "bf16"])
@pytest.mark.parametrize("info", _entries("inplace"))
def test_inplace_after_the_layer(info: LayerInfo, precision: str) -> None:
    """``out += 1; relu_(out)`` after the layer (a ResNet block's ops): the same gradients as
    the out-of-place ops (the output is never a view that forbids it), in the default sample's
    precision and with a bf16 input (low-precision paths may take other kernels)."""
    sample, dtype = info.default, torch.float32
    if precision == "bf16":  # weights of the layers without statistics follow, as nn.Conv2d's
        sample = dataclasses.replace(sample, dtype=torch.bfloat16)
        dtype = torch.bfloat16 if info.kind == "cosine" else torch.float32
    grads = []
    for inplace in (False, True):
        layer = info.build(dtype).train()
        x = sample.make().requires_grad_(True)
        out = layer(x, **sample.kwargs())
        if inplace:
            out += 1
            torch.relu_(out)
        else:
            out = torch.relu(out + 1)
        out.backward(_upstream(out).to(out.dtype))
        grads.append([out.detach(), x.grad, *(p.grad for p in layer.parameters())])
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want)


# --- float64 gradients of every order ---


def _stateless(layer: nn.Module, kwargs: dict[str, Any]) -> tuple[Callable[..., Tensor], list]:
    """``f(x, *params)``: the layer with fresh copies of its buffers on every call (so the
    running statistics, the warm-up counter and hence BatchRenorm's ``r``, ``d`` stay fixed)."""
    names = [n for n, _ in layer.named_parameters()]
    buffers = {n: b.detach().clone() for n, b in layer.named_buffers()}

    def fn(x: Tensor, *params: Tensor) -> Tensor:
        state = {n: b.clone() for n, b in buffers.items()}
        state.update(zip(names, params, strict=True))
        return functional_call(layer, state, (x,), kwargs)

    params = [p.detach().clone().requires_grad_(True) for p in layer.parameters()]
    return fn, params


@pytest.mark.parametrize(("info", "mode"), _entries("gradgrad", variants=("train", "eval")))
def test_gradgrad(info: LayerInfo, mode: str) -> None:
    layer = info.build(F64).train(mode == "train")
    sample = info.small()
    if info.kind == "renorm" and layer.training and layer.running_mean is not None:
        with torch.no_grad():  # r, d at their clip limits: the constants autograd assumes
            layer.running_mean.fill_(-100.0)
            layer.running_var.fill_(1e-4)
    fn, params = _stateless(layer, sample.kwargs())
    inputs = [sample.make().to(F64).requires_grad_(True), *params]
    assert gradcheck(fn, inputs, atol=1e-6)
    assert gradgradcheck(fn, inputs, atol=1e-6)


# --- activation checkpointing ---


def _domain_ids(sample: Sample) -> Tensor | int | None:
    return sample.domain


@pytest.mark.parametrize(
    ("info", "mode"), _entries("checkpoint", variants=("nonreentrant", "reentrant"))
)
def test_checkpoint(info: LayerInfo, mode: str) -> None:
    reentrant = mode == "reentrant"
    """Outputs and gradients of a checkpointed training step equal the plain step's."""
    plain = info.build().train()
    ckpt = info.build().train()
    sample = info.default
    out, x_grad = _run(plain, sample.make(), sample)
    x = sample.make().requires_grad_(True)
    out_c = checkpoint(lambda t: ckpt(t, **sample.kwargs()), x, use_reentrant=reentrant)
    out_c.backward(_upstream(out_c).to(out_c.dtype))
    torch.testing.assert_close(out_c, out)
    torch.testing.assert_close(x.grad, x_grad)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, msg=lambda m, name=name: f"{name}: {m}")


def _per_sample_domain(info: LayerInfo) -> bool:
    return info.kind == "domain" and isinstance(info.default.domain, Tensor)


@pytest.mark.parametrize(
    ("info", "mode"), _entries("checkpoint", _per_sample_domain, ("nonreentrant", "reentrant"))
)
def test_checkpoint_with_domain_context(info: LayerInfo, mode: str) -> None:
    reentrant = mode == "reentrant"
    """Lightning's order: forward inside ``with domain(...)``, backward after the block."""
    plain = info.build().train()
    ckpt = info.build().train()
    sample = info.default
    out, x_grad = _run(plain, sample.make(), sample)
    x = sample.make().requires_grad_(True)
    with ln.domain(ckpt, sample.domain):
        out_c = checkpoint(ckpt, x, use_reentrant=reentrant)
    out_c.backward(_upstream(out_c).to(out_c.dtype))
    torch.testing.assert_close(out_c, out)
    torch.testing.assert_close(x.grad, x_grad)


# --- torch.func ---


@pytest.mark.parametrize(("info", "mode"), _entries("func", variants=("train", "eval")))
def test_func_grad_and_functional_call(info: LayerInfo, mode: str) -> None:
    training = mode == "train"
    layer = info.build().train(training)
    sample = info.default
    x = sample.make()
    fn, params = _stateless(layer, sample.kwargs())
    names = [n for n, _ in layer.named_parameters()]

    def loss(values: dict[str, Tensor], x: Tensor) -> Tensor:
        out = fn(x, *(values[n] for n in names))
        return (out * _upstream(out).to(out.dtype)).sum()

    values = dict(zip(names, params, strict=True))
    grads = grad(loss, argnums=(0, 1))(values, x)
    expected_out = fn(x, *params)
    fresh = info.build().train(training)
    torch.testing.assert_close(expected_out, fresh(x, **sample.kwargs()))
    x_leaf = x.clone().requires_grad_(True)
    total = loss(values, x_leaf)
    auto = torch.autograd.grad(total, [*params, x_leaf], allow_unused=True)
    got_all = [*grads[0].values(), grads[1]]
    for name, got, want in zip([*names, "input"], got_all, auto, strict=True):
        torch.testing.assert_close(got, want, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("info", _entries("vmap"))
def test_vmap_per_sample_gradients(info: LayerInfo) -> None:
    """Opacus-style per-sample gradients (eval: one sample's gradient is its own)."""
    layer = info.build().eval()
    sample = info.default
    x = sample.make()
    params = [p.detach() for p in layer.parameters()]
    names = [n for n, _ in layer.named_parameters()]
    ids = sample.domain
    per_sample = isinstance(ids, Tensor)
    ids_in = ids if per_sample else torch.zeros(x.shape[0], dtype=torch.long)
    gen = torch.Generator().manual_seed(3)
    ups = torch.randn(layer(x, **sample.kwargs()).shape, generator=gen)

    def loss(values: list[Tensor], xi: Tensor, di: Tensor, ui: Tensor) -> Tensor:
        kwargs = {"domain": di[None]} if per_sample else sample.kwargs()
        state = {**dict(layer.named_buffers()), **dict(zip(names, values, strict=True))}
        return (functional_call(layer, state, (xi[None],), kwargs)[0] * ui).sum()

    got = vmap(grad(loss), in_dims=(None, 0, 0, 0))(params, x, ids_in, ups)
    for i in range(x.shape[0]):
        kwargs = {"domain": ids[i : i + 1]} if per_sample else sample.kwargs()
        layer.zero_grad()
        (layer(x[i : i + 1], **kwargs)[0] * ups[i]).sum().backward()
        for name, g, p in zip(names, got, layer.parameters(), strict=True):
            torch.testing.assert_close(g[i], p.grad, msg=lambda m, name=name: f"{name}: {m}")


# --- torch.compile ---


@pytest.fixture
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _next_batch(sample: Sample, dynamic: bool) -> Sample:
    """The next step's input: another domain composition (and, ``dynamic``, 2 samples
    more: batch sizes 0 and 1 are specialised by dynamo); neither may recompile."""
    n = sample.shape[0] + 2 if dynamic else sample.shape[0]
    ids = sample.domain
    if isinstance(ids, Tensor):
        ids = torch.cat([ids.flip(0), ids[:2]])[:n]
    return Sample(sample.name, (n, *sample.shape[1:]), ids, sample.dtype)


def _compiled_equals_eager(
    info: LayerInfo, backend: str, steps: int, dynamic: bool = False
) -> None:
    eager = info.build().train()
    compiled_layer = copy.deepcopy(eager)
    compiled = torch.compile(compiled_layer, backend=backend, fullgraph=True, dynamic=dynamic)
    samples = [info.default, _next_batch(info.default, dynamic)]
    for step in range(steps):
        sample = samples[step % 2]
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            got = _run(compiled, sample.make(step), sample)
        want = _run(eager, sample.make(step), sample)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)
        pairs = zip(eager.named_parameters(), compiled_layer.parameters(), strict=True)
        for (name, p), q in pairs:
            torch.testing.assert_close(q.grad, p.grad, msg=lambda m, name=name: f"{name}: {m}")
        for (name, b), c in zip(eager.named_buffers(), compiled_layer.buffers(), strict=True):
            torch.testing.assert_close(c, b, msg=lambda m, name=name: f"{name}: {m}")
    if steps > 1:
        eager.eval()
        compiled_layer.eval()
        x = info.default.make(5)
        torch.testing.assert_close(
            compiled(x, **info.default.kwargs()), eager(x, **info.default.kwargs())
        )


@pytest.mark.usefixtures("_fresh_dynamo")
@pytest.mark.parametrize(("info", "shapes"), _entries("compile", variants=("static", "dynamic")))
def test_compile_aot_eager(info: LayerInfo, shapes: str) -> None:
    """fullgraph=True: any graph break raises; a new domain composition (and, with dynamic
    shapes, a new batch size) must not recompile."""
    _compiled_equals_eager(info, "aot_eager", steps=2, dynamic=shapes == "dynamic")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++")
@pytest.mark.usefixtures("_fresh_dynamo")
@pytest.mark.parametrize("info", _entries("inductor", lambda info: info.inductor))
def test_compile_inductor(info: LayerInfo) -> None:
    _compiled_equals_eager(info, "inductor", steps=1)


# --- export, ONNX, TorchScript trace (eval) ---


class _Bound(nn.Module):
    """``layer`` with its call's domain bound: ``forward(x)`` or ``forward(x, ids)``."""

    def __init__(self, layer: nn.Module, sample: Sample) -> None:
        super().__init__()
        self.layer = layer
        self.fixed = {} if isinstance(sample.domain, Tensor) else sample.kwargs()

    def forward(self, x: Tensor, *ids: Tensor) -> Tensor:
        return self.layer(x, *ids, **self.fixed)


def _bound(info: LayerInfo) -> tuple[nn.Module, tuple[Tensor, ...], Tensor]:
    """The eval layer bound to its default sample's domain, its inputs, the eager output."""
    layer = info.build().eval()
    sample = info.default
    args: tuple[Tensor, ...] = (sample.make(),)
    if isinstance(sample.domain, Tensor):
        args = (*args, sample.domain)
    module = _Bound(layer, sample).eval()
    return module, args, module(*args)


@pytest.mark.parametrize("info", _entries("export"))
def test_export(info: LayerInfo) -> None:
    """Exported with a dynamic batch size: equal to eager at the traced size and at another
    size with another domain composition."""
    module, args, expected = _bound(info)
    batch = torch.export.Dim("batch", min=1, max=64)
    dynamic: tuple = ({0: batch},) if len(args) == 1 else ({0: batch}, ({0: batch},))
    program = torch.export.export(module, args, dynamic_shapes=dynamic)
    torch.testing.assert_close(program.module()(*args), expected)
    other = tuple(torch.cat([a, a.flip(0)[:3]]) for a in args)  # 3 more samples
    torch.testing.assert_close(program.module()(*other), module(*other))


@pytest.mark.slow
@pytest.mark.parametrize("info", _entries("onnx"))
def test_onnx(info: LayerInfo, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    module, args, expected = _bound(info)
    path = tmp_path / "layer.onnx"
    torch.onnx.export(module, args, str(path), dynamo=True, verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args, strict=True)}
    (got,) = session.run(None, feeds)
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("info", _entries("jit"))
def test_jit_trace_save_load(info: LayerInfo) -> None:
    module, args, expected = _bound(info)
    traced = torch.jit.trace(module, args)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    torch.testing.assert_close(loaded(*args), expected)
    other = tuple(a.flip(0) for a in args)
    torch.testing.assert_close(loaded(*other), module(*other))


# --- copies and state ---


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("info", _entries("copy"))
def test_copy(info: LayerInfo, how: str) -> None:
    layer = info.build().train()
    twin = copy.deepcopy(layer) if how == "deepcopy" else pickle.loads(pickle.dumps(layer))
    sample = info.default
    got, want = _run(twin, sample.make(), sample), _run(layer, sample.make(), sample)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    for key, value in layer.state_dict().items():
        assert torch.equal(twin.state_dict()[key], value), key
        assert twin.state_dict()[key].data_ptr() != value.data_ptr(), key


@pytest.mark.parametrize("info", _entries("state_dict"))
def test_state_dict_round_trip(info: LayerInfo) -> None:
    layer = info.build().train()
    sample = info.default
    _run(layer, sample.make(), sample)  # advanced state
    fresh = info.make()
    fresh.load_state_dict(layer.state_dict(), strict=True)
    for key, value in layer.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    x = sample.make(1)
    kwargs = sample.kwargs()
    torch.testing.assert_close(fresh.eval()(x, **kwargs), layer.eval()(x, **kwargs))


_PLAIN_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@pytest.mark.parametrize("info", _entries("plain_bn_state", lambda i: i.kind == "domain"))
def test_plain_bn_state_loads_into_every_domain(info: LayerInfo) -> None:
    layer = info.build()
    bn = _PLAIN_BN[layer._dims](4, affine=layer.affine)
    bn.num_batches_tracked.fill_(5)
    with torch.no_grad():
        for t in [*bn.parameters(), bn.running_mean, bn.running_var]:
            t.uniform_(0.5, 1.5)
    layer.load_state_dict(bn.state_dict(), strict=True)
    expected = type(layer).from_batchnorm(bn, layer.num_domains, shared_affine=layer.shared_affine)
    for key, value in expected.state_dict().items():
        assert torch.equal(layer.state_dict()[key], value), key
    with pytest.raises(RuntimeError, match="running_mean"):
        layer.load_state_dict({**bn.state_dict(), "running_mean": torch.zeros(3)})


# --- 2-rank gloo ---


def _ddp_samples(info: LayerInfo) -> list[Sample]:
    """The default sample; for per-sample domain ids also the one whose domain 1 has a single
    value per channel over both ranks (rank 1 holds none of it): the rare-domain rule on the
    global count."""
    rare = [s for s in info.samples if s.name == "one_value" and isinstance(s.domain, Tensor)]
    return [info.default, *rare]


def _ddp_worker(rank: int, world_size: int, names: list[str]) -> dict[tuple[str, str], Any]:
    results = {}
    for name in names:
        info = BY_NAME[name]
        for sample in _ddp_samples(info):
            layer = info.build().train()
            half = sample.shape[0] // world_size
            part = slice(rank * half, (rank + 1) * half)
            steps = []
            for seed in (0, 1):
                x = sample.make(seed)[part].detach().requires_grad_(True)
                ids = sample.domain[part] if isinstance(sample.domain, Tensor) else sample.domain
                out = layer(x, **({} if ids is None else {"domain": ids}))
                full_up = _upstream(torch.empty(sample.shape)).to(out.dtype)
                out.backward(full_up[part])
                grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
                layer.zero_grad()
                steps.append((out.detach(), x.grad, grads, _state(layer)))
            results[name, sample.name] = steps
    return results


@pytest.fixture(scope="module")
def ddp_results() -> list[dict[tuple[str, str], Any]]:
    names = [i.name for i in REGISTRY if "ddp" not in i.skips and "ddp" not in i.xfails]
    return run_ddp(_ddp_worker, names)


def _ddp_cases() -> list[Any]:
    return [
        pytest.param(info, sample, id=f"{info.name}-{sample.name}", marks=_marks(info, "ddp"))
        for info in REGISTRY
        for sample in _ddp_samples(info)
    ]


@pytest.mark.ddp
@pytest.mark.xdist_group("transforms_ddp")  # one worker: the module fixture spawns once
@pytest.mark.parametrize(("info", "sample"), _ddp_cases())
def test_ddp_sync_equals_one_process(
    info: LayerInfo, sample: Sample, ddp_results: list[dict[tuple[str, str], Any]]
) -> None:
    """Two synced training steps on halves of the batch equal one process on all of it."""
    layer = info.build().train()
    for seed in (0, 1):
        out, x_grad = _run(layer, sample.make(seed), sample)
        grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
        layer.zero_grad()
        halves = [r[info.name, sample.name][seed] for r in ddp_results]
        torch.testing.assert_close(torch.cat([h[0] for h in halves]), out.detach())
        torch.testing.assert_close(torch.cat([h[1] for h in halves]), x_grad)
        for name, g in grads.items():
            torch.testing.assert_close(sum(h[2][name] for h in halves), g)
        for h in halves:
            for key, value in layer.state_dict().items():
                torch.testing.assert_close(h[3][key], value, msg=lambda m, key=key: f"{key}: {m}")


# --- the coverage table ---


def test_coverage_doc_is_up_to_date() -> None:
    """``docs/coverage.md`` is the registry's table (regenerate: python -m
    tests.integration.gen_coverage)."""
    assert (REPO / "docs" / "coverage.md").read_text() == coverage_markdown()
