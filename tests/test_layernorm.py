"""LayerNorm2d against permute + F.layer_norm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_norms import LayerNorm2d
from lightning_norms.functional import layer_norm2d
from tests._layers import normal, randomise, uniform


def _reference(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), weight, bias, eps)
    return y.permute(0, 3, 1, 2)


def _randomise(m: LayerNorm2d) -> None:
    randomise(m, {"weight": uniform(0.5, 1.5), "bias": normal()}, seed=None, dtype=None)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_equals_permute_layer_norm(affine: bool, channels_last: bool) -> None:
    torch.manual_seed(0)
    m = LayerNorm2d(6, eps=1e-6, affine=affine)
    if affine:
        _randomise(m)
    x = torch.randn(3, 6, 5, 4) * 3 + 2
    grad = torch.randn(3, 6, 5, 4)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x_ours = x.clone().requires_grad_(True)
    x_ref = x.clone().requires_grad_(True)
    weight = m.weight.detach().clone().requires_grad_(True) if affine else None
    bias = m.bias.detach().clone().requires_grad_(True) if affine else None
    y = m(x_ours)
    y_ref = _reference(x_ref, weight, bias, 1e-6)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=0, atol=0)
    if affine:
        torch.testing.assert_close(m.weight.grad, weight.grad, rtol=0, atol=0)
        torch.testing.assert_close(m.bias.grad, bias.grad, rtol=0, atol=0)
    else:
        assert m.weight is None and m.bias is None
    # per position: zero mean, unit (biased) variance over the channels before the affine
    if not affine:
        torch.testing.assert_close(y.mean(1), torch.zeros(3, 5, 4), rtol=0, atol=1e-5)
        torch.testing.assert_close(y.var(1, unbiased=False), torch.ones(3, 5, 4), rtol=0, atol=1e-4)


def test_channels_last_input_gives_the_same_result() -> None:
    torch.manual_seed(1)
    m = LayerNorm2d(8)
    _randomise(m)
    x = torch.randn(2, 8, 6, 6)
    y = m(x)
    y_cl = m(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(y_cl, y, rtol=1e-6, atol=1e-6)


def test_independent_of_batch_and_mode() -> None:
    torch.manual_seed(2)
    m = LayerNorm2d(4)
    _randomise(m)
    x = torch.randn(5, 4, 3, 3)
    full = m(x)
    torch.testing.assert_close(m(x[2:3]), full[2:3], rtol=0, atol=0)
    torch.testing.assert_close(m.eval()(x), full, rtol=0, atol=0)


def test_gradcheck_float64() -> None:
    torch.manual_seed(3)
    m = LayerNorm2d(3, dtype=torch.float64)
    _randomise(m)
    x = torch.randn(2, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))
    w = m.weight.detach().clone().requires_grad_(True)
    b = m.bias.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, w, b: layer_norm2d(x, w, b, 1e-6), (x, w, b))


def test_module_attributes_and_state_dict() -> None:
    m = LayerNorm2d(4, eps=1e-5)
    assert isinstance(m, nn.LayerNorm)
    assert repr(m) == "LayerNorm2d(4, eps=1e-05, affine=True)"
    assert set(m.state_dict()) == {"weight", "bias"}
    _randomise(m)
    other = LayerNorm2d(4, eps=1e-5)
    other.load_state_dict(m.state_dict())
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(other(x), m(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((2, 4, 3), r"LayerNorm2d\(4\): expected a 4D \(N, 4, H, W\) input, got shape \(2, 4, 3\)"),
        ((2, 5, 3, 3), r"LayerNorm2d\(4\): expected .* got shape \(2, 5, 3, 3\)"),
    ],
)
def test_bad_input(shape: tuple[int, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LayerNorm2d(4)(torch.randn(shape))


def test_double_backward_gradgradcheck_float64() -> None:
    torch.manual_seed(4)
    m = LayerNorm2d(3, dtype=torch.float64)
    _randomise(m)
    x = torch.randn(2, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    w = m.weight.detach().clone().requires_grad_(True)
    b = m.bias.detach().clone().requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda x, w, b: layer_norm2d(x, w, b, 1e-6), (x, w, b))
    assert torch.autograd.gradgradcheck(m, (x,))


def _layer_norm_float64(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """The formula written out in float64: per pixel over the channels."""
    mean = x.mean(1, keepdim=True)
    var = x.var(1, unbiased=False, keepdim=True)
    return (x - mean) / (var + eps).sqrt() * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["module", "autocast"])
def test_low_precision_matches_float64(dtype: torch.dtype, mode: str) -> None:
    torch.manual_seed(5)
    m = LayerNorm2d(16)
    _randomise(m)
    x = (torch.randn(2, 16, 5, 5) * 300 + 1000).to(dtype)  # x**2 overflows fp16
    if mode == "module":
        m = m.to(dtype)
    x_in = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype, enabled=mode == "autocast"):
        y = m(x_in)
    assert y.dtype == dtype
    ref = _layer_norm_float64(
        x.double(), m.weight.detach().double(), m.bias.detach().double(), m.eps
    )
    atol = 1e-2 if dtype == torch.float16 else 6e-2
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=atol)
    y.float().square().sum().backward()
    assert torch.isfinite(x_in.grad).all() and torch.isfinite(m.weight.grad).all()


def test_inplace_after_the_layer_and_empty_batch() -> None:
    torch.manual_seed(6)
    m = LayerNorm2d(4)
    _randomise(m)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    y = m(x)
    y += x  # residual add, then an inplace activation (the output is a permuted view)
    y.relu_()
    y.sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    (m(x_ref) + x_ref).relu().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)
    assert m(torch.randn(0, 4, 3, 3)).shape == (0, 4, 3, 3)
