"""CosineLinear / CosineConv2d against the cosine formula written out (unfold for the conv)."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.torch_version import TorchVersion

from lightning_norms import CosineConv2d, CosineLinear
from lightning_norms.functional import cosine_conv2d, cosine_linear
from tests._layers import op_names

EPS = 1e-8


def _linear_reference(x: Tensor, w: Tensor) -> Tensor:
    return x @ w.T / (x.norm(dim=-1, keepdim=True) * w.norm(dim=1) + EPS)


def _unfold_reference(
    x: Tensor, w: Tensor, stride: tuple, padding: tuple, dilation: tuple, groups: int
) -> Tensor:
    """Every patch cut out with F.unfold, the cosine taken per patch and filter."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
    cols = cols.view(n, groups, c // groups * kh * kw, -1)  # [N, G, C/G*kh*kw, L]
    wg = w.reshape(groups, o // groups, -1)  # [G, O/G, C/G*kh*kw]
    dot = torch.einsum("ngkl,gok->ngol", cols, wg)
    denom = wg.norm(dim=2)[None, :, :, None] * cols.norm(dim=2)[:, :, None, :] + EPS
    h_out = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w_out = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return (dot / denom).reshape(n, o, h_out, w_out)


CONV_CASES = [
    # in, out, kernel, stride, padding, dilation, groups
    (3, 5, (3, 3), (1, 1), (0, 0), (1, 1), 1),
    (3, 5, (3, 3), (2, 2), (1, 1), (1, 1), 1),
    (3, 4, (3, 2), (2, 1), (2, 1), (2, 1), 1),
    (4, 6, (3, 3), (1, 1), (2, 2), (2, 2), 2),
    (4, 8, (3, 3), (2, 2), (1, 1), (1, 1), 4),
]


@pytest.mark.parametrize(("cin", "cout", "k", "s", "p", "d", "g"), CONV_CASES)
def test_conv_equals_unfold_formula(cin, cout, k, s, p, d, g) -> None:
    torch.manual_seed(0)
    m = CosineConv2d(cin, cout, k, stride=s, padding=p, dilation=d, groups=g)
    assert m.weight.shape == nn.Conv2d(cin, cout, k, groups=g).weight.shape
    assert m.bias is None
    x = torch.randn(2, cin, 9, 8) * 3 + 1
    x64 = x.double().requires_grad_(True)
    w64 = m.weight.detach().double().requires_grad_(True)
    expected = _unfold_reference(x64, w64, s, p, d, g)
    x32 = x.clone().requires_grad_(True)
    y = m(x32)
    torch.testing.assert_close(y, expected.detach().float(), rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    expected.backward(grad_out.double())
    torch.testing.assert_close(x32.grad, x64.grad.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m.weight.grad, w64.grad.float(), rtol=1e-4, atol=1e-5)
    assert y.abs().max() <= 1 + 1e-6


def test_conv_same_padding_and_unbatched_input() -> None:
    torch.manual_seed(1)
    m = CosineConv2d(3, 4, 3, padding="same", dilation=2)
    x = torch.randn(2, 3, 7, 7)
    expected = _unfold_reference(x, m.weight.detach(), (1, 1), (2, 2), (2, 2), 1)
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m(x[1]), expected[1], rtol=1e-5, atol=1e-6)


def test_linear_equals_formula() -> None:
    torch.manual_seed(2)
    m = CosineLinear(6, 4)
    assert m.weight.shape == nn.Linear(6, 4).weight.shape
    assert m.bias is None
    x = torch.randn(3, 5, 6) * 4
    x64 = x.double().requires_grad_(True)
    w64 = m.weight.detach().double().requires_grad_(True)
    expected = _linear_reference(x64, w64)
    x32 = x.clone().requires_grad_(True)
    y = m(x32)
    torch.testing.assert_close(y, expected.detach().float(), rtol=1e-5, atol=1e-6)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    expected.backward(grad_out.double())
    torch.testing.assert_close(x32.grad, x64.grad.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(m.weight.grad, w64.grad.float(), rtol=1e-4, atol=1e-6)
    # a cosine: invariant to the scale of the input and of the weights
    torch.testing.assert_close(m(x * 100), y.detach(), rtol=1e-5, atol=1e-6)


def test_zero_input_gives_zero_and_finite_gradients() -> None:
    torch.manual_seed(3)
    lin = CosineLinear(5, 3)
    x = torch.zeros(4, 5, requires_grad=True)
    x.data[1] = torch.randn(5)
    y = lin(x)
    assert torch.equal(y[[0, 2, 3]], torch.zeros(3, 3))
    grad_out = torch.randn(4, 3)
    y.backward(grad_out)
    assert torch.isfinite(x.grad).all() and torch.isfinite(lin.weight.grad).all()
    # at x = 0 the cosine is w.x / eps to first order: the gradient is (grad @ W) / eps
    torch.testing.assert_close(
        x.grad[0], grad_out[0] @ lin.weight.detach() / EPS, rtol=1e-5, atol=0
    )

    conv = CosineConv2d(3, 4, 3, padding=1)
    x = torch.zeros(2, 3, 6, 6, requires_grad=True)
    x.data[0, :, :2] = torch.randn(3, 2, 6)  # sample 0: zero patches only in its bottom rows
    y = conv(x)
    assert torch.equal(y[1], torch.zeros(4, 6, 6))
    assert torch.equal(y[0, :, 4:], torch.zeros(4, 2, 6))
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    assert torch.isfinite(x.grad).all() and torch.isfinite(conv.weight.grad).all()
    expected = F.conv_transpose2d(grad_out[1:], conv.weight.detach(), padding=1) / EPS
    torch.testing.assert_close(x.grad[1:], expected, rtol=1e-4, atol=0)


def test_gradcheck_float64() -> None:
    torch.manual_seed(4)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w: cosine_conv2d(x, w, stride=2, padding=1, dilation=1, groups=2), (x, w)
    )
    assert torch.autograd.gradcheck(
        lambda x, w: cosine_conv2d(x, w, padding=2, dilation=2), (x, w[:, :1].repeat(1, 4, 1, 1))
    )
    xl = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    wl = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(cosine_linear, (xl, wl))
    m = CosineConv2d(4, 3, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(m, (x,))
    assert torch.autograd.gradcheck(CosineLinear(5, 2, dtype=torch.float64), (xl,))


def test_channels_last_same_result() -> None:
    torch.manual_seed(5)
    m = CosineConv2d(4, 6, 3, stride=2, padding=1, groups=2)
    x = torch.randn(2, 4, 8, 8)
    x_cl = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    x = x.requires_grad_(True)
    y, y_cl = m(x), m(x_cl)
    torch.testing.assert_close(y_cl, y, rtol=1e-5, atol=1e-6)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    y_cl.backward(grad_out)
    torch.testing.assert_close(x_cl.grad, x.grad, rtol=1e-4, atol=1e-6)


def test_bf16_autocast() -> None:
    torch.manual_seed(6)
    m = CosineConv2d(8, 8, 3, padding=1)
    x = torch.randn(2, 8, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    y.float().sum().backward()
    assert torch.isfinite(m.weight.grad).all()
    torch.testing.assert_close(y.float(), m(x).detach(), rtol=0, atol=3e-2)


@pytest.mark.parametrize(
    ("m", "shape", "match"),
    [
        (CosineLinear(4, 3), (2, 5), r"CosineLinear\(4, 3\): expected 4 features .*\(2, 5\)"),
        (CosineConv2d(3, 4, 3), (2, 5, 8, 8), r"CosineConv2d\(3, 4\): expected .*\(2, 5, 8, 8\)"),
        (CosineConv2d(3, 4, 3), (2, 3), r"CosineConv2d\(3, 4\): expected .* shape \(2, 3\)"),
    ],
)
def test_bad_input(m: nn.Module, shape: tuple[int, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        m(torch.randn(shape))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="`groups` must be positive and divide in_channels=3"):
        CosineConv2d(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match="`padding` must be 'same', 'valid' or ints, got 'full'"):
        CosineConv2d(3, 4, 3, padding="full")
    with pytest.raises(ValueError, match="padding='same' needs stride=1, got stride=2"):
        CosineConv2d(3, 4, 3, stride=2, padding="same")


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["module", "autocast"])
def test_low_precision_large_activations_match_float64(kind: str, dtype, mode: str) -> None:
    """Issue 10 item 3: |x| > 256 overflowed x**2 in fp16 and the conv output was all zeros."""
    torch.manual_seed(7)
    if kind == "conv":
        m: nn.Module = CosineConv2d(8, 6, 3, padding=1, groups=2)
        x = torch.randn(2, 8, 7, 7) * 300
    else:
        m = CosineLinear(64, 6)
        x = torch.randn(5, 64) * 300
    if mode == "module":
        m = m.to(dtype)
        x_in = x.to(dtype).requires_grad_(True)
        with torch.autocast("cpu", enabled=False):
            y = m(x_in)
    else:
        x_in = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=dtype):
            y = m(x_in)
    assert y.dtype == dtype
    # reference: the formula in float64 on the values the low-precision dot product sees
    x64 = x.to(dtype).double().requires_grad_(True)
    w64 = m.weight.detach().to(dtype).double().requires_grad_(True)
    if kind == "conv":
        ref = _unfold_reference(x64, w64, (1, 1), (1, 1), (1, 1), 2)
    else:
        ref = _linear_reference(x64, w64)
    assert ref.abs().max() > 0.1  # far from the all-zero output of the bug
    atol = 1e-3 if dtype == torch.float16 else 8e-3
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=atol)
    grad_out = torch.randn_like(ref)
    y.backward(grad_out.to(dtype))
    ref.backward(grad_out)
    rel = 4e-3 if dtype == torch.float16 else 2e-2
    for got, want in ((x_in.grad, x64.grad), (m.weight.grad, w64.grad)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, rtol=0, atol=rel * want.abs().max())
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=mode == "autocast"):
        zero = m(torch.zeros_like(x_in))
    assert torch.equal(zero, torch.zeros_like(zero))


def test_double_backward_gradgradcheck_float64() -> None:
    torch.manual_seed(8)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda x, w: cosine_conv2d(x, w, stride=2, padding=1, groups=2), (x, w)
    )
    xl = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    wl = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(cosine_linear, (xl, wl))
    conv = CosineConv2d(4, 3, 2, padding=1, dtype=torch.float64)
    lin = CosineLinear(5, 2, dtype=torch.float64)
    assert torch.autograd.gradgradcheck(lambda x, w: conv._call_impl(x) * w.sum(), (x, w))
    assert torch.autograd.gradgradcheck(lin, (xl,))
    # a gradient penalty through the module equals the one through the float64 formula
    xc = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(conv(xc).square().sum(), xc, create_graph=True)
    g.square().sum().backward()
    w_ref = conv.weight.detach().clone().requires_grad_(True)
    x_ref = xc.detach().clone().requires_grad_(True)
    out = _unfold_reference(x_ref, w_ref, (1, 1), (1, 1), (1, 1), 1)
    (g_ref,) = torch.autograd.grad(out.square().sum(), x_ref, create_graph=True)
    g_ref.square().sum().backward()
    torch.testing.assert_close(conv.weight.grad, w_ref.grad, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    ("m", "shape"), [(CosineConv2d(3, 4, 3, padding=1), (2, 3, 5, 5)), (CosineLinear(3, 4), (2, 3))]
)
def test_inplace_after_the_layer_and_empty_batch(m: nn.Module, shape: tuple[int, ...]) -> None:
    torch.manual_seed(9)
    x = torch.randn(shape, requires_grad=True)
    y = m(x)
    y += 0.1  # residual add, then an inplace activation
    y.relu_()
    y.sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    (m(x_ref) + 0.1).relu().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)
    empty = m(torch.randn(0, *shape[1:]))
    assert empty.shape == (0, *m(x).shape[1:])


PATCH_NORM_CASES = [
    # in, out, kernel, stride, padding, dilation, groups: summing pool or strided view
    (4, 6, (1, 1), (1, 1), (0, 0), (1, 1), 1),
    (4, 6, (1, 1), (2, 3), (0, 0), (1, 1), 2),
    (3, 5, (5, 3), (2, 1), (2, 1), (1, 1), 1),
    # the ones-kernel fallback: padding beyond half the window
    (4, 6, (1, 1), (1, 1), (1, 1), (1, 1), 2),
    (3, 5, (3, 3), (1, 2), (2, 0), (1, 1), 1),
]


@pytest.mark.parametrize(("cin", "cout", "k", "s", "p", "d", "g"), PATCH_NORM_CASES)
def test_patch_norm_paths_equal_unfold_formula(cin, cout, k, s, p, d, g) -> None:
    """Issue 13: 1x1 view, summing pool and ones-kernel fallback give the same cosines."""
    torch.manual_seed(2)
    m = CosineConv2d(cin, cout, k, stride=s, padding=p, dilation=d, groups=g).double()
    x = (torch.randn(2, cin, 9, 8, dtype=torch.float64) * 3 + 1).requires_grad_(True)
    w = m.weight.detach().clone().requires_grad_(True)
    expected = _unfold_reference(x, w, s, p, d, g)
    y = m(x)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, m.weight), grad)
    ex, ew = torch.autograd.grad(expected, (x, w), grad)
    torch.testing.assert_close(gx, ex, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, ew, rtol=1e-10, atol=1e-12)


def test_same_padding_odd_kernel_takes_the_pool() -> None:
    torch.manual_seed(3)
    m = CosineConv2d(3, 4, 3, padding="same")
    x = torch.randn(2, 3, 7, 6)
    expected = _unfold_reference(x, m.weight.detach(), (1, 1), (1, 1), (1, 1), 1)
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-6)


# --- issue 17 (transforms) and issue 21 (fp16 AMP) ---

LAYERS = {
    "conv3x3": (lambda: CosineConv2d(3, 4, 3, padding=1), (4, 3, 6, 6)),
    "linear": (lambda: CosineLinear(5, 3), (4, 5)),
}


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_torch_func_grad_and_per_sample_gradients_equal_autograd(kind: str) -> None:
    """Issue 17 item 4: `torch.func.grad`, `functional_call` and `vmap(grad)` per sample."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(11)
    make, shape = LAYERS[kind]
    m = make()
    x, target = torch.randn(shape), torch.randn(m(torch.randn(shape)).shape)
    params = {k: v.detach() for k, v in m.named_parameters()}

    def loss(p: dict, xs: Tensor, ts: Tensor) -> Tensor:
        return (functional_call(m, p, (xs,)) - ts).square().sum()

    whole = grad(loss)(params, x, target)["weight"]
    (expected,) = torch.autograd.grad(loss(dict(m.named_parameters()), x, target), m.weight)
    torch.testing.assert_close(whole, expected, rtol=1e-6, atol=1e-6)

    def one(p: dict, xi: Tensor, ti: Tensor) -> Tensor:
        return loss(p, xi[None], ti[None])

    per_sample = vmap(grad(one), in_dims=(None, 0, 0))(params, x, target)["weight"]
    loop = [
        torch.autograd.grad(one(dict(m.named_parameters()), xi, ti), m.weight)[0]
        for xi, ti in zip(x, target, strict=True)
    ]
    torch.testing.assert_close(per_sample, torch.stack(loop), rtol=1e-5, atol=1e-6)
    # the custom Functions themselves under vmap, against the plain formula
    batched = vmap(m)(x[:, None])
    torch.testing.assert_close(batched[:, 0], m(x), rtol=1e-6, atol=1e-7)


ONNX_CASES = {
    "1x1": lambda: CosineConv2d(3, 4, 1),
    "3x3 padding 1": lambda: CosineConv2d(3, 4, 3, padding=1),
    "stride 2": lambda: CosineConv2d(3, 4, 3, stride=2, padding=1),
    "dilation 2": lambda: CosineConv2d(3, 4, 3, padding=2, dilation=2),
    "groups 2": lambda: CosineConv2d(4, 6, 3, padding=1, groups=2),
    "linear": lambda: CosineLinear(5, 3),
}


@pytest.mark.parametrize("case", sorted(ONNX_CASES))
def test_onnx_export_matches_eager_in_onnxruntime(case: str) -> None:
    """Issue 17 item 5: the TorchScript exporter (`dynamo=False`) gave outputs off by 1.16."""
    import io

    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(12)
    m = ONNX_CASES[case]().eval()
    x = torch.randn(2, 5) if case == "linear" else torch.randn(2, m.in_channels, 9, 8)
    x[0, ..., :2] = 0  # zero inputs and patches too
    buffer = io.BytesIO()
    torch.onnx.export(m, (x,), buffer, dynamo=False)
    session = ort.InferenceSession(buffer.getvalue())
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(y), m(x).detach(), rtol=0, atol=1e-5)


@pytest.mark.skipif(
    TorchVersion(torch.__version__) < (2, 9),
    reason="the torch.export-based ONNX exporter is torch's default (and tested here) from 2.9",
)
def test_onnx_dynamo_export_matches_eager_in_onnxruntime() -> None:
    """The default exporter (`dynamo=True`) dropped the summing pool's `divisor_override`."""
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(13)
    m = CosineConv2d(3, 4, 3, padding=1).eval()
    x = torch.randn(2, 3, 9, 8)
    program = torch.onnx.export(m, (x,), dynamo=True, verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString())
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(y), m(x).detach(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", ["3x3 padding 1", "groups 2", "linear"])
def test_jit_trace_save_load_matches_eager(case: str, tmp_path) -> None:
    """Issue 17 item 6: tracing recorded the Python Functions, which `torch.jit.save` refuses."""
    torch.manual_seed(14)
    m = ONNX_CASES[case]().eval()
    x = torch.randn(2, 5) if case == "linear" else torch.randn(2, m.in_channels, 9, 8)
    traced = torch.jit.trace(m, (x,))
    torch.jit.save(traced, tmp_path / "m.pt")
    loaded = torch.jit.load(tmp_path / "m.pt")
    x2 = torch.randn_like(x)
    torch.testing.assert_close(loaded(x2), m(x2).detach(), rtol=0, atol=1e-6)
    # the traced graph is differentiable (plain ops): its gradients are the eager ones
    x2.requires_grad_(True)
    (g_loaded,) = torch.autograd.grad(loaded(x2).sum(), x2)
    (g_eager,) = torch.autograd.grad(m(x2).sum(), x2)
    torch.testing.assert_close(g_loaded, g_eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_fp16_autocast_grad_scaler_zero_patches_give_finite_gradients(kind: str) -> None:
    """Issue 21 item 2: at loss scale 65536 an all-zero patch made `g / eps` overflow (NaN)."""
    torch.manual_seed(15)
    make, shape = LAYERS[kind]
    m = make()
    plain = nn.Conv2d(3, 4, 3, padding=1, bias=False) if kind == "conv3x3" else nn.Linear(5, 3)
    plain.weight.data.copy_(m.weight.detach())
    x = torch.randn(shape)
    x[1] = 0  # an all-zero sample (input vector or patches)
    if kind == "conv3x3":
        x[0, ..., :3] = 0  # all-zero patches at the left edge of a sample
    x.requires_grad_(True)
    for layer in (plain, m):
        with torch.autocast("cpu", dtype=torch.float16):
            y = layer(x)
        assert y.dtype == torch.float16
        (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).mean().mul(65536.0).backward()
        for g in (x.grad, layer.weight.grad):
            assert torch.isfinite(g).all(), type(layer).__name__
        x.grad = None
    with torch.autocast("cpu", dtype=torch.float16):
        y = m(x)
    assert torch.equal(y[1], torch.zeros_like(y[1]))  # the zero sample still gives 0
    # away from the zero patches the fp16 gradient is the fp32 one, within fp16 rounding
    x32 = x.detach().clone().requires_grad_(True)
    xh = x.detach().clone().requires_grad_(True)
    m(x32)[0].sum().backward()
    with torch.autocast("cpu", dtype=torch.float16):
        yh = m(xh)
    yh[0].float().sum().backward()
    keep = slice(4, None) if kind == "conv3x3" else slice(None)  # columns without zero patches
    torch.testing.assert_close(xh.grad[0, ..., keep], x32.grad[0, ..., keep], rtol=2e-2, atol=2e-2)


# --- issue 20 (kernel): the whole layer in one autograd Function, few launches ---


def _count_launches(fn) -> int:
    """Top-level aten ops that launch a kernel, counted as ``bench/bench_targets.py`` does."""
    from tests._dist import REPO_ROOT

    sys.path.insert(0, str(REPO_ROOT / "bench"))
    try:
        from gpu_check import _count_ops
    finally:
        sys.path.remove(str(REPO_ROOT / "bench"))
    return _count_ops(fn)


LAUNCH_TARGETS = {
    # name: layer, input shape, issue 20's limit (the old code: 30, 32, 25)
    "CosineConv2d 1x1": (lambda: CosineConv2d(64, 64, 1), (32, 64, 16, 16), 22),
    "CosineConv2d 3x3": (lambda: CosineConv2d(64, 64, 3, padding=1), (32, 64, 16, 16), 22),
    "CosineLinear": (lambda: CosineLinear(256, 64), (256, 256), 18),
}


@pytest.mark.parametrize("name", sorted(LAUNCH_TARGETS))
def test_launches_per_forward_backward(name: str) -> None:
    """Issue 20: launches of a training forward+backward (the bench's step: fresh gradients)."""
    make, shape, limit = LAUNCH_TARGETS[name]
    torch.manual_seed(16)
    m = make()
    x = torch.randn(shape, requires_grad=True)
    grad = torch.randn_like(m(x))

    def step() -> None:
        m.zero_grad(set_to_none=True)
        x.grad = None
        m(x).backward(grad)

    step()
    step()
    count = _count_launches(step)
    assert count <= limit, f"{name}: {count} launches per forward+backward (limit {limit})"
    with torch.no_grad():  # eval: plain ops only (they trace, export and fuse)
        names = op_names(lambda: m(x))
    assert "_Cosine" not in names and "_Cosine" in op_names(step)


FUSED_CASES = {
    # the fused Function's paths: channel norm (1x1), summing pool (strided 1x1, 3x3, 5x3)
    "1x1": ((4, 6, (1, 1), (1, 1), (0, 0), 1), (2, 4, 7, 6)),
    "1x1 stride 2 groups 2": ((4, 6, (1, 1), (2, 2), (0, 0), 2), (2, 4, 7, 6)),
    "3x3 groups 2": ((4, 6, (3, 3), (1, 1), (1, 1), 2), (3, 4, 7, 6)),
    "5x3 stride (2, 1)": ((3, 5, (5, 3), (2, 1), (2, 1), 1), (2, 3, 9, 8)),
    "batch of one": ((3, 5, (3, 3), (1, 1), (1, 1), 1), (1, 3, 6, 6)),
}


@pytest.mark.parametrize("case", sorted(FUSED_CASES))
def test_fused_gradients_equal_float64_autograd_of_the_formula(case: str) -> None:
    """The closed-form backward equals autograd through the unfold formula, zero patches too."""
    (cin, cout, k, s, p, g), shape = FUSED_CASES[case]
    torch.manual_seed(17)
    m = CosineConv2d(cin, cout, k, stride=s, padding=p, groups=g, dtype=torch.float64)
    x = torch.randn(shape, dtype=torch.float64) * 3 + 1
    x[0, :, :3] = 0  # zero patches (and for 3x3 / 5x3 patches that are partly zero)
    x.requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = m.weight.detach().clone().requires_grad_(True)
    names = op_names(lambda: m(x))
    assert "_Cosine" in names  # the fused path is the one under test
    y = m(x)
    expected = _unfold_reference(x_ref, w_ref, s, p, (1, 1), g)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, m.weight), grad)
    ex, ew = torch.autograd.grad(expected, (x_ref, w_ref), grad)
    assert ex.abs().max() > 1e6  # the zero patches' exact g w / eps is in the comparison
    torch.testing.assert_close(gx, ex, rtol=1e-10, atol=1e-6)
    torch.testing.assert_close(gw, ew, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", [(3, 5), (2, 4, 5), (1, 5)])
def test_fused_linear_gradients_equal_float64_autograd_of_the_formula(shape) -> None:
    torch.manual_seed(18)
    m = CosineLinear(5, 3, dtype=torch.float64)
    x = torch.randn(shape, dtype=torch.float64)
    x.view(-1, 5)[0] = 0  # a zero input row
    x.requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = m.weight.detach().clone().requires_grad_(True)
    assert "_Cosine" in op_names(lambda: m(x))  # the fused path is the one under test
    y, expected = m(x), _linear_reference(x_ref, w_ref)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, m.weight), grad)
    ex, ew = torch.autograd.grad(expected, (x_ref, w_ref), grad)
    torch.testing.assert_close(gx, ex, rtol=1e-10, atol=1e-6)
    torch.testing.assert_close(gw, ew, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_backward_twice_with_retain_graph_and_input_without_grad(kind: str) -> None:
    """The backward reuses its own buffers in place: a second backward gives the same grads."""
    torch.manual_seed(19)
    make, shape = LAYERS[kind]
    m = make()
    x = torch.randn(shape, requires_grad=True)
    y = m(x)
    grad = torch.randn_like(y)
    y.backward(grad, retain_graph=True)
    first = (x.grad.clone(), m.weight.grad.clone())
    y.backward(grad)
    torch.testing.assert_close(x.grad, 2 * first[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(m.weight.grad, 2 * first[1], rtol=1e-6, atol=0)
    m.weight.grad = None
    m(x.detach()).backward(grad)  # the weight alone needs a gradient (a first layer)
    torch.testing.assert_close(m.weight.grad, first[1], rtol=1e-6, atol=0)


def test_fused_backward_with_channels_last_and_transposed_output_gradients() -> None:
    """The output gradient may come in any layout (a channels_last or transposed view)."""
    torch.manual_seed(20)
    conv = CosineConv2d(4, 6, 3, padding=1, groups=2, dtype=torch.float64)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    grad = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    gx, gw = torch.autograd.grad(
        conv(x), (x, conv.weight), grad.contiguous(memory_format=torch.channels_last)
    )
    ex, ew = torch.autograd.grad(conv(x), (x, conv.weight), grad)
    torch.testing.assert_close(gx, ex, rtol=1e-12, atol=0)
    torch.testing.assert_close(gw, ew, rtol=1e-12, atol=0)
    lin = CosineLinear(5, 3, dtype=torch.float64)
    xl = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 4, dtype=torch.float64)
    (gx,) = torch.autograd.grad(lin(xl), xl, grad.t())
    (ex,) = torch.autograd.grad(lin(xl), xl, grad.t().contiguous())
    torch.testing.assert_close(gx, ex, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_torch_func_jvp_and_jacfwd_equal_the_formula(kind: str) -> None:
    """Forward mode through the fused Function (a weight that requires grad selects it)."""
    from torch.func import jacfwd, jvp

    torch.manual_seed(21)
    make, shape = LAYERS[kind]
    m = make().double()
    x, t = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    w = m.weight.detach()
    if kind == "linear":
        ref = lambda x: _linear_reference(x, w)  # noqa: E731
    else:
        ref = lambda x: _unfold_reference(x, w, (1, 1), (1, 1), (1, 1), 1)  # noqa: E731
    assert m.weight.requires_grad
    got, expected = jvp(m, (x,), (t,))[1], jvp(ref, (x,), (t,))[1]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(jacfwd(m)(x[:1]), jacfwd(ref)(x[:1]), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_eager_forward_ad_with_a_trainable_layer_equals_the_formula(kind: str) -> None:
    """``torch.autograd.forward_ad`` on a layer whose weight requires grad (the fused
    Function's ``jvp`` runs ``torch.func.jvp``, which cannot nest in an eager dual level: it
    raised "Nested forward mode AD is not supported")."""
    import torch.autograd.forward_ad as fwad
    from torch.func import jvp

    torch.manual_seed(24)
    make, shape = LAYERS[kind]
    m = make().double()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    t = torch.randn(shape, dtype=torch.float64)
    w = m.weight.detach()
    if kind == "linear":
        ref = lambda x: _linear_reference(x, w)  # noqa: E731
    else:
        ref = lambda x: _unfold_reference(x, w, (1, 1), (1, 1), (1, 1), 1)  # noqa: E731
    with fwad.dual_level():
        out = m(fwad.make_dual(x, t))
        tangent = fwad.unpack_dual(out).tangent
    expected = jvp(ref, (x.detach(),), (t,))
    torch.testing.assert_close(fwad.unpack_dual(out).primal, expected[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tangent, expected[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("k", "s", "g"), [(1, 1, 2), (1, 2, 1), (3, 1, 1)])
def test_fused_gradgradcheck_float64(k: int, s: int, g: int) -> None:
    """Gradients of gradients through the fused backward (1x1 matrix products, pool adjoint)."""
    torch.manual_seed(22)
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4 // g, k, k, dtype=torch.float64, requires_grad=True)

    def fn(x: Tensor, w: Tensor) -> Tensor:
        return cosine_conv2d(x, w, stride=s, padding=k // 2, groups=g)

    assert "_Cosine" in op_names(lambda: fn(x, w))
    assert torch.autograd.gradcheck(fn, (x, w))
    assert torch.autograd.gradgradcheck(fn, (x, w))
