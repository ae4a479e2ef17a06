"""The native bfloat16 matrix product of the flow's chunk runs (tts_core/cosyvoice2/gemm_bf16.c):
products, GELUs and residuals against float64 next to PyTorch's bfloat16 product on the same
inputs, over row counts around the tile size and odd numbers of output tiles; strided inputs;
the same bits on any thread count; shapes it does not take fall back to oneDNN; the switch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tts_core.cosyvoice2.gemm_native import SWITCH, NativeWeight, native_gemm
from tts_core.cosyvoice2.packed_linear import linear, linear_gelu, prepare

ROOT = Path(__file__).resolve().parents[1]
kernel = native_gemm()
needs_kernel = pytest.mark.skipif(kernel is None, reason="the native gemm does not run here "
                                  "(no AMX bfloat16 or no C compiler)")


def _case(m: int, k: int, n: int, seed: int
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) / k ** 0.5).bfloat16()
    bias = torch.randn(n, generator=g).bfloat16()
    residual = torch.randn(m, n, generator=g).bfloat16()
    return x, w, bias, residual


def _within_one_rounding(got: torch.Tensor, exact: torch.Tensor, magnitude: torch.Tensor
                         ) -> bool:
    """Each output within half a bfloat16 step of the exact value (at most 2^-8 of it: the
    one rounding) plus what float32 sums can lose (1e-5 of sum |x w|)."""
    bound = 2.0 ** -8 * exact.abs() + 1e-5 * magnitude + 1e-6
    return bool(((got.double() - exact).abs() <= bound).all())


@needs_kernel
@pytest.mark.parametrize("m", [1, 15, 16, 17, 26, 33, 52, 300])
@pytest.mark.parametrize(("k", "n"), [(32, 16), (256, 1536), (960, 256), (1024, 80), (64, 48)])
def test_products_within_one_rounding(m: int, k: int, n: int) -> None:
    """Against float64 on the same bfloat16 inputs, with and without bias, GELU (both kinds)
    and a residual added before the rounding: every output within one bfloat16 rounding, and
    on average no further off than PyTorch's bfloat16 product (which also sums in float32)."""
    assert kernel is not None
    x, w, bias, residual = _case(m, k, n, seed=m * 7919 + k + n)
    packed = kernel.pack(w)
    magnitude = F.linear(x.double().abs(), w.double().abs())
    product = F.linear(x.double(), w.double())
    cases = {
        "bias": (kernel.linear(x, packed, bias), product + bias.double()),
        "no bias": (kernel.linear(x, packed, None), product),
        "gelu": (kernel.linear(x, packed, bias, gelu="none"),
                 F.gelu(product + bias.double())),
        "gelu tanh": (kernel.linear(x, packed, bias, gelu="tanh"),
                      F.gelu(product + bias.double(), approximate="tanh")),
        "residual": (kernel.linear(x, packed, bias.float(), residual=residual),
                     residual.double() + product + bias.double()),
    }
    for name, (got, exact) in cases.items():
        assert got.shape == (m, n) and got.dtype == torch.bfloat16, name
        assert _within_one_rounding(got, exact, magnitude), name
    got, exact = cases["bias"]
    theirs = F.linear(x, w, bias)
    mean_error = (got.double() - exact).abs().mean().item()
    assert mean_error <= 1.05 * (theirs.double() - exact).abs().mean().item() + 1e-6


@needs_kernel
def test_strided_inputs_and_thread_counts_give_the_same_bits() -> None:
    """Rows read in place through a stride (a slice of a wider tensor, as the flow's fused
    q/k/v product gives) equal the contiguous copy's; each output block is one thread's, so
    the thread count changes no bit."""
    assert kernel is not None
    x, w, bias, _ = _case(52, 256, 1536, seed=3)
    packed = kernel.pack(w)
    wide = torch.zeros(2, 26, 512, dtype=torch.bfloat16)
    wide[..., 128:384] = x.view(2, 26, 256)
    strided = wide[..., 128:384]
    assert not strided.is_contiguous()
    expected = kernel.linear(x, packed, bias)
    assert torch.equal(kernel.linear(strided, packed, bias).reshape(52, 1536), expected)
    before = torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            assert torch.equal(kernel.linear(x, packed, bias), expected)
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_prepare_takes_only_shapes_the_kernel_takes() -> None:
    """The flow's weights go to the native layout; widths it cannot tile, float32 and callers
    that did not ask keep oneDNN's packing or PyTorch's product, with the same results as
    before."""
    g = torch.Generator().manual_seed(4)
    fits = torch.randn(256, 512, generator=g).bfloat16()
    odd = torch.randn(80, 100, generator=g).bfloat16()  # in_features % 32 != 0
    assert isinstance(prepare(fits, native=True), NativeWeight)
    assert not isinstance(prepare(fits), NativeWeight)
    assert not isinstance(prepare(odd, native=True), NativeWeight)
    assert not isinstance(prepare(fits.float(), native=True), NativeWeight)
    x = torch.randn(7, 100, generator=g).bfloat16()
    assert torch.equal(linear(x, prepare(odd, native=True), None), linear(x, prepare(odd), None))
    y = torch.randn(7, 512, generator=g).bfloat16()
    got = linear_gelu(y, prepare(fits, native=True), None, "none")
    exact = F.gelu(F.linear(y.double(), fits.double()))
    assert _within_one_rounding(got, exact, F.linear(y.double().abs(), fits.double().abs()))


@needs_kernel
def test_refuses_what_it_cannot_compute() -> None:
    assert kernel is not None
    x, w, bias, residual = _case(4, 64, 48, seed=5)
    packed = kernel.pack(w)
    with pytest.raises(ValueError, match="input"):
        kernel.linear(x.float(), packed, bias)
    with pytest.raises(ValueError, match="residual"):
        kernel.linear(x, packed, bias, residual=residual[:, :16])
    with pytest.raises(ValueError, match="cannot take"):
        kernel.pack(torch.zeros(48, 40, dtype=torch.bfloat16))


def test_switch_turns_it_off() -> None:
    """TTS_NATIVE_GEMM=0 keeps oneDNN's packed products."""
    code = ("from tts_core.cosyvoice2.gemm_native import native_gemm; "
            "print(native_gemm() is None)")
    env = {**os.environ, SWITCH: "0", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "True"


@needs_kernel
@pytest.mark.parametrize("rows", [1, 17, 300])
@pytest.mark.parametrize("width", [16, 256, 1024])
def test_layer_norm_and_mish_within_one_rounding(rows: int, width: int) -> None:
    """The causal blocks' LayerNorm (then Mish) in float32 with one rounding: every output
    within one bfloat16 rounding of float64, with and without parameters; strided rows read in
    place give the same bits."""
    assert kernel is not None
    g = torch.Generator().manual_seed(rows + width)
    x = (torch.randn(rows, width, generator=g) * 3 + 1).bfloat16()
    weight = (torch.rand(width, generator=g) + 0.5).bfloat16()
    bias = torch.randn(width, generator=g).bfloat16()
    for w, b in ((weight, bias), (None, None)):
        exact = F.layer_norm(x.double(), (width,), None if w is None else w.double(),
                             None if b is None else b.double(), 1e-5)
        for mish in (False, True):
            want = F.mish(exact) if mish else exact
            got = kernel.layer_norm(x, w, b, 1e-5, mish=mish)
            assert got.dtype == torch.bfloat16 and got.shape == x.shape
            bound = 2.0 ** -8 * want.abs() + 1e-4  # one rounding; float32 statistics
            assert ((got.double() - want).abs() <= bound).all(), (w is None, mish)
    wide = torch.zeros(rows, width + 32, dtype=torch.bfloat16)
    wide[:, 16:16 + width] = x
    assert torch.equal(kernel.layer_norm(wide[:, 16:16 + width], weight, bias, 1e-5, True),
                       kernel.layer_norm(x, weight, bias, 1e-5, True))
    with pytest.raises(ValueError, match="cannot take"):
        kernel.layer_norm(x.float(), weight, bias, 1e-5)
