"""The native weight-only int8 kernel (tts_core/cosyvoice2/int8_matvec.c): products checked
against float64 with the bound its rounding allows, against PyTorch's kernel, on every row
grouping and channel tail, across thread counts and threads; and the switch that turns it off."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from tts_core.cosyvoice2.int8_matvec import SWITCH, native_kernel
from tts_core.cosyvoice2.weight_quant import NATIVE_ROWS, WeightOnlyLinear

ROOT = Path(__file__).resolve().parents[1]
kernel = native_kernel()
needs_kernel = pytest.mark.skipif(kernel is None, reason="the native int8 kernel does not run "
                                  "here (no AVX-512 VNNI or no C compiler)")


def _case(rows: int, k: int, n: int, seed: int, outliers: float = 1.0
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g)
    x[:, :3] *= outliers  # a few large channels, as LM activations have
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, generator=g) * 0.01 + 1e-4
    bias = torch.randn(n, generator=g)
    return x, w, scale, bias


def _exact(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
           ) -> torch.Tensor:
    y = x.double() @ (w.double() * scale.double()[:, None]).T
    return y if bias is None else y + bias.double()


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 9])
@pytest.mark.parametrize(("k", "n"), [(32, 1), (96, 5), (896, 1027), (4864, 64)])
def test_products_within_the_rounding_bound(rows: int, k: int, n: int) -> None:
    """Each activation is rounded to a step of max|x_row| / 16383, so an output can move by at
    most half a step times sum_k |w * scale|; the sums themselves are exact (int32)."""
    assert kernel is not None
    x, w, scale, bias = _case(rows, k, n, seed=rows * 1000 + k + n)
    got = kernel.matmul(x, w, scale, bias)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    exact = _exact(x, w, scale, bias)
    step = x.abs().amax(dim=1, keepdim=True).double() / 16383
    bound = step / 2 * (w.double().abs() * scale.double()[:, None]).sum(dim=1)[None, :]
    bound = bound + 1e-6 * exact.abs() + 1e-6  # float32 scaling and output
    assert ((got.double() - exact).abs() <= bound).all()


@needs_kernel
def test_closer_to_float_than_pytorchs_kernel() -> None:
    """PyTorch's kernel takes the activations and scales in bfloat16 (8 significant bits)."""
    assert kernel is not None
    for outliers in (1.0, 30.0):
        x, w, scale, bias = _case(3, 896, 512, seed=11, outliers=outliers)
        exact = _exact(x, w, scale, bias)
        ours = (kernel.matmul(x, w, scale, bias).double() - exact).norm()
        theirs = torch._weight_int8pack_mm(x.bfloat16(), w, scale.bfloat16()).double() + bias
        assert ours < 0.2 * (theirs - exact).norm(), outliers


@needs_kernel
def test_zero_rows_give_the_bias_and_no_bias_is_taken() -> None:
    assert kernel is not None
    x, w, scale, bias = _case(2, 64, 9, seed=3)
    x[1] = 0
    got = kernel.matmul(x, w, scale, bias)
    assert torch.equal(got[1], bias)
    torch.testing.assert_close(kernel.matmul(x, w, scale, None), got - bias, rtol=0, atol=1e-5)


@needs_kernel
def test_a_row_with_nan_or_infinity_gives_nan_and_leaves_the_others() -> None:
    """As a float product would, rather than a finite answer from a broken input."""
    assert kernel is not None
    x, w, scale, bias = _case(3, 96, 7, seed=4)
    clean = kernel.matmul(x, w, scale, bias)
    for bad in (float("nan"), float("inf")):
        x2 = x.clone()
        x2[1, 5] = bad
        got = kernel.matmul(x2, w, scale, bias)
        assert torch.isnan(got[1]).all(), bad
        assert torch.equal(got[0], clean[0]) and torch.equal(got[2], clean[2])


@needs_kernel
def test_same_result_on_any_thread_count_and_from_threads_at_once() -> None:
    """Each output is one thread's exact integer sum, so the split cannot change it."""
    assert kernel is not None
    x, w, scale, bias = _case(4, 896, 1152, seed=5)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel.matmul(x, w, scale, bias)
        torch.set_num_threads(2)
        two = kernel.matmul(x, w, scale, bias)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    results: list[torch.Tensor] = []

    def call() -> None:
        for _ in range(20):
            results.append(kernel.matmul(x, w, scale, bias))

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 60 and all(torch.equal(r, one) for r in results)


@needs_kernel
def test_layers_route_by_rows_and_shape() -> None:
    """A layer takes the native kernel for decode-sized calls of widths it takes; other widths
    (not a multiple of 32) keep PyTorch's kernel and still give the product."""
    assert kernel is not None
    torch.manual_seed(2)
    for width in (64, 48):
        layer = torch.nn.Linear(width, 40)
        quantized = WeightOnlyLinear.from_linear(layer, 8)
        assert kernel.takes(quantized.qweight) == (width % 32 == 0)
        x = torch.randn(NATIVE_ROWS, width)
        with torch.inference_mode():
            got = quantized(x)
        if width % 32 == 0:
            assert torch.equal(got, kernel.matmul(x, quantized.qweight,
                                                  quantized.scales_float, quantized.bias))
        relative = (got - layer(x).detach()).norm() / layer(x).detach().norm()
        assert relative < 0.01, (width, relative)


def test_switch_turns_it_off() -> None:
    """TTS_NATIVE_INT8=0 keeps PyTorch's kernel (for comparisons, or a CPU that misbehaves)."""
    code = ("from tts_core.cosyvoice2.int8_matvec import native_kernel; "
            "print(native_kernel() is None)")
    env = {**os.environ, SWITCH: "0", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "True"


@needs_kernel
def test_builds_into_an_empty_cache(tmp_path: Path) -> None:
    """A fresh machine compiles the kernel once into the cache directory and loads it."""
    code = ("from tts_core.cosyvoice2.int8_matvec import native_kernel; "
            "print(native_kernel() is not None)")
    env = {**os.environ, "TTS_NATIVE_CACHE": str(tmp_path), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=300)
    assert out.stdout.strip() == "True"
    assert [p.suffix for p in tmp_path.iterdir()] == [".so"]  # no temporary file left behind


@needs_kernel
def test_unusable_cache_falls_back_to_a_temporary_directory(tmp_path: Path) -> None:
    """Where the user's cache directory cannot be written (a read-only home in a container;
    here a file standing where the directory would be, which stops root too) the kernel is
    built under TMPDIR."""
    blocked, tmp = tmp_path / "cache", tmp_path / "tmp"
    blocked.write_text("not a directory")
    tmp.mkdir()
    code = ("from tts_core.cosyvoice2.int8_matvec import native_kernel; "
            "print(native_kernel() is not None)")
    env = {k: v for k, v in os.environ.items() if k != "TTS_NATIVE_CACHE"}
    env.update(XDG_CACHE_HOME=str(blocked), TMPDIR=str(tmp), PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=300)
    assert out.stdout.strip() == "True"
    assert [p.suffix for p in (tmp / f"cosyvoice-service-{os.getuid()}").iterdir()] == [".so"]
