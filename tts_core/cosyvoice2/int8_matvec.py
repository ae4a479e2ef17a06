"""The native weight-only int8 kernel for decode steps (``int8_matvec.c``), built on first use.

A decode step of the LM multiplies a few rows by every int8 weight of the Qwen2 stack; PyTorch's
``_weight_int8pack_mm`` widens each weight to float32 and on this project's two cores reads
them at about 14 GB/s. The C kernel rounds the activations to int16 (one scale per row) and
multiplies with AVX-512 VNNI integer dot products, reading them at about 22 GB/s (the figures
are in the README). It is compiled with the system's C compiler the first time a process asks
for it, into a cache directory keyed by the source, the compiler and the CPU's flags, and loaded
with ctypes; without a compiler, without AVX-512 VNNI, or with ``TTS_NATIVE_INT8=0`` in the
environment the layers keep PyTorch's kernel.

Accuracy: the int16 activations carry 14 bits against bfloat16's 8 (PyTorch's kernel takes
bfloat16 activations and scales), the sums are exact in int32, and scales and outputs stay
float32, so the products are closer to float32 than the fallback's.
"""

from __future__ import annotations

import ctypes
import functools
import threading

import torch

from .native_build import NativeSource, load_library

SWITCH = "TTS_NATIVE_INT8"  # "0": PyTorch's kernel only
SPEC = NativeSource("int8_matvec", SWITCH, ("avx512f", "avx512bw", "avx512_vnni"),
                    ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vnni", "-fopenmp"))
ROW_ALIGN = 32  # the kernel takes inputs whose width is a multiple of this
_lock = threading.Lock()


class QuantLinear(ctypes.Structure):
    """An int8 layer as ``tts_int8_decoder_layer`` reads it (pointers into its tensors)."""

    _fields_ = [("weight", ctypes.c_void_p), ("scale", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("n", ctypes.c_int64), ("k", ctypes.c_int64)]


class DecoderLayer(ctypes.Structure):
    """A Qwen2 decoder layer as ``tts_int8_decoder_layer`` reads it."""

    _fields_ = [("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p),
                ("eps", ctypes.c_float), ("qkv", QuantLinear), ("out", QuantLinear),
                ("gate_up", QuantLinear), ("down", QuantLinear), ("heads", ctypes.c_int64),
                ("kv_heads", ctypes.c_int64), ("head_dim", ctypes.c_int64)]


class RowCache(ctypes.Structure):
    """One decode row's key/value storage of a layer and the index its new position takes."""

    _fields_ = [("keys", ctypes.c_void_p), ("values", ctypes.c_void_p),
                ("head_stride", ctypes.c_int64), ("position", ctypes.c_int64)]


class NativeInt8Kernel:
    """The loaded library: :meth:`matmul` for shapes it takes (:meth:`takes`), and
    ``decoder_layer`` (``tts_int8_decoder_layer``, driven by :mod:`native_decode`)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._call = library.tts_int8_matvec
        self._call.restype = ctypes.c_int
        self._call.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                               ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.c_int]
        self.max_k = int(library.tts_int8_matvec_max_k())
        self.decoder_layer = library.tts_int8_decoder_layer
        self.decoder_layer.restype = ctypes.c_int
        self.decoder_layer.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                       ctypes.POINTER(DecoderLayer), ctypes.c_void_p,
                                       ctypes.c_void_p, ctypes.POINTER(RowCache), ctypes.c_int]

    def takes(self, weight: torch.Tensor) -> bool:
        """Whether an int8 weight [out, in] fits the kernel."""
        k = weight.shape[1]
        return (weight.dtype == torch.int8 and weight.device.type == "cpu"
                and weight.is_contiguous() and k % ROW_ALIGN == 0 and k <= self.max_k)

    def matmul(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ (weight * scale[:, None]).T + bias`` in float32: x [rows, in] (any float
        dtype), weight int8 [out, in] (see :meth:`takes`), scale and bias float32 [out]."""
        x = x.to(torch.float32).contiguous()
        rows, k = x.shape
        n = weight.shape[0]
        if scale.dtype != torch.float32 or (bias is not None and bias.dtype != torch.float32):
            raise ValueError("native int8 kernel: scale and bias must be float32")
        y = torch.empty(rows, n, dtype=torch.float32)
        status = self._call(x.data_ptr(), rows, k, weight.data_ptr(), n, scale.data_ptr(),
                            0 if bias is None else bias.data_ptr(), y.data_ptr(),
                            torch.get_num_threads())
        if status:
            raise RuntimeError(f"native int8 kernel refused a [{rows}, {k}] x [{n}, {k}] "
                               f"product (status {status})")
        return y


@functools.cache
def _load() -> NativeInt8Kernel | None:
    library = load_library(SPEC)
    return None if library is None else NativeInt8Kernel(library)


def native_kernel() -> NativeInt8Kernel | None:
    """The kernel, built and loaded once per process; None where it cannot run (see the module
    docstring)."""
    with _lock:
        return _load()
