"""The native bfloat16 matrix product of the flow's chunk runs (``gemm_bf16.c``, AMX tiles).

The flow estimator's linears multiply a few dozen to a few hundred rows by weights of 256-1536
columns, about 280 times per Euler step. oneDNN's packed kernel spends much of such a call on
set-up; the C kernel takes weights laid out once in AMX's tile layout (:func:`pack`) and runs a
call as one OpenMP loop over 32 x 32 output blocks, with the bias, the GELU and a residual added
to the float32 sums before the one rounding to bfloat16 (README: per-shape times and errors).

Built on first use like the other native kernels (native_build); needs AMX (amx_bf16); off
with ``TTS_NATIVE_GEMM=0``. float32 never uses it.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from dataclasses import dataclass

import torch

from .native_build import NativeSource, load_library

SWITCH = "TTS_NATIVE_GEMM"  # "0": oneDNN's packed kernel only
SPEC = NativeSource(
    "gemm_bf16", SWITCH, ("avx512f", "avx512bw", "avx512_bf16", "amx_tile", "amx_bf16"),
    ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mamx-tile",
     "-mamx-bf16", "-fopenmp"))
ACTIVATIONS = {None: 0, "none": 1, "tanh": 2}  # F.gelu's approximate= (None: no GELU)
K_ALIGN, N_ALIGN = 32, 16  # the kernel takes in_features % 32 == 0 and out_features % 16 == 0
_lock = threading.Lock()
_I64, _PTR, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int


@dataclass(frozen=True)
class NativeWeight:
    """A bfloat16 weight [out_features, in_features] in the kernel's tile layout."""

    packed: torch.Tensor
    out_features: int
    in_features: int
    kernel: NativeGemm

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None, gelu: str | None = None,
               residual: torch.Tensor | None = None) -> torch.Tensor:
        return self.kernel.linear(x, self, bias, gelu, residual)


class NativeGemm:
    def __init__(self, library: ctypes.CDLL) -> None:
        self._pack = library.tts_gemm_pack
        self._pack.restype = _INT
        self._pack.argtypes = [_PTR, _I64, _I64, _PTR]
        self._call = library.tts_gemm_bf16
        self._call.restype = _INT
        self._call.argtypes = [_PTR, _I64, _I64, _I64, _PTR, _I64, _PTR, _INT, _INT, _PTR, _I64,
                               _PTR, _I64, _INT]
        self._norm = library.tts_layer_norm_bf16
        self._norm.restype = _INT
        self._norm.argtypes = [_PTR, _I64, _I64, _I64, _PTR, _PTR, ctypes.c_float, _INT, _PTR,
                               _I64, _INT]

    @staticmethod
    def takes(weight: torch.Tensor) -> bool:
        """Whether a weight [out, in] fits: bfloat16 on the CPU, in % 32 == 0, out % 16 == 0."""
        return (weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
                and weight.dim() == 2 and weight.shape[1] % K_ALIGN == 0
                and weight.shape[0] % N_ALIGN == 0)

    def pack(self, weight: torch.Tensor) -> NativeWeight:
        if not self.takes(weight):
            raise ValueError(f"native gemm: cannot take a {weight.dtype} weight of shape "
                             f"{tuple(weight.shape)}")
        weight = weight.detach().contiguous()
        n, k = weight.shape
        packed = torch.empty(n * k, dtype=torch.bfloat16)
        if self._pack(weight.data_ptr(), n, k, packed.data_ptr()):
            raise ValueError(f"native gemm: refused to pack a [{n}, {k}] weight")
        return NativeWeight(packed, n, k, self)

    def linear(self, x: torch.Tensor, weight: NativeWeight, bias: torch.Tensor | None,
               gelu: str | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``residual + gelu(x @ W.T + bias)`` (each part optional) in bfloat16, x [..., in]."""
        k, n = weight.in_features, weight.out_features
        if x.dtype != torch.bfloat16 or x.shape[-1] != k:
            raise ValueError(f"native gemm: input {x.dtype} {tuple(x.shape)} for a [{n}, {k}] "
                             "weight")
        rows = x.reshape(-1, k)
        if rows.stride(1) != 1 or (rows.shape[0] > 1 and rows.stride(0) < k):
            rows = rows.contiguous()
        out = torch.empty(*x.shape[:-1], n, dtype=torch.bfloat16)
        res_ptr, res_stride = 0, 0
        if residual is not None:
            if residual.shape != out.shape or residual.dtype != torch.bfloat16:
                raise ValueError("native gemm: the residual must match the output")
            residual = residual.reshape(-1, n)
            if residual.stride(1) != 1 or (residual.shape[0] > 1 and residual.stride(0) < n):
                residual = residual.contiguous()
            res_ptr, res_stride = residual.data_ptr(), residual.stride(0)
        if bias is not None and (bias.shape != (n,) or not bias.is_contiguous()
                                 or bias.dtype not in (torch.bfloat16, torch.float32)):
            raise ValueError(f"native gemm: bias {bias.dtype} {tuple(bias.shape)} for {n} "
                             "outputs")
        status = self._call(
            rows.data_ptr(), rows.stride(0), rows.shape[0], k, weight.packed.data_ptr(), n,
            0 if bias is None else bias.data_ptr(),
            int(bias is not None and bias.dtype == torch.bfloat16), ACTIVATIONS[gelu],
            res_ptr, res_stride, out.data_ptr(), n, torch.get_num_threads())
        if status:
            raise RuntimeError(f"native gemm refused [{rows.shape[0]}, {k}] x [{n}, {k}] "
                               f"(status {status})")
        return out


    @staticmethod
    def takes_norm(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
        """Whether :meth:`layer_norm` takes x [..., C] (bfloat16, C % 16 == 0, C <= 1024)."""
        width = x.shape[-1]
        return (x.dtype == torch.bfloat16 and x.device.type == "cpu" and width % 16 == 0
                and 16 <= width <= 1024
                and (weight is None or weight.dtype == torch.bfloat16))

    def layer_norm(self, x: torch.Tensor, weight: torch.Tensor | None,
                   bias: torch.Tensor | None, eps: float, mish: bool = False) -> torch.Tensor:
        """``F.layer_norm`` over the last axis (then Mish when ``mish``) in float32, rounded
        once to bfloat16; see :meth:`takes_norm`."""
        width = x.shape[-1]
        if not self.takes_norm(x, weight) or (bias is not None and bias.dtype != torch.bfloat16):
            raise ValueError(f"native layer norm: cannot take {x.dtype} {tuple(x.shape)}")
        for p in (weight, bias):
            if p is not None and (p.shape != (width,) or not p.is_contiguous()):
                raise ValueError(f"native layer norm: parameter {tuple(p.shape)} for {width} "
                                 "channels")
        rows = x.reshape(-1, width)
        if rows.stride(1) != 1 or (rows.shape[0] > 1 and rows.stride(0) < width):
            rows = rows.contiguous()
        out = torch.empty(x.shape, dtype=torch.bfloat16)
        self._norm(rows.data_ptr(), rows.stride(0), rows.shape[0], width,
                   0 if weight is None else weight.data_ptr(),
                   0 if bias is None else bias.data_ptr(), eps, int(mish), out.data_ptr(), width,
                   torch.get_num_threads())
        return out


@functools.cache
def _load() -> NativeGemm | None:
    library = load_library(SPEC)
    if library is None or library.tts_gemm_init():
        return None
    return NativeGemm(library)


def native_gemm() -> NativeGemm | None:
    """The kernel, built and loaded once per process; None where it cannot run."""
    with _lock:
        return _load()
