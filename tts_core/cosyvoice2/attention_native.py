"""The native bfloat16 attention of the flow's chunk runs (``attention_bf16.c``, AMX tiles).

A streamed chunk asks attention for a few dozen queries against a few hundred keys per head, 56
times per Euler step; PyTorch's flash kernel spends most of such a call setting up. The C kernel
computes the same softmax attention on AMX tiles, reading queries, keys and values in place
through their strides (a slice of the fused q/k/v product, rows of a stream's key/value cache)
and taking each query's visible keys as a range, so the chunk mask costs nothing. Scores,
softmax and sums are float32; the softmax weights are rounded to bfloat16 for the second product
as in PyTorch's kernel. Measured error against a float64 reference equals PyTorch's (README).

It is built on first use like the other native kernels (native_build); it needs AMX (amx_bf16)
and is off with ``TTS_NATIVE_ATTENTION=0``. float32 runs never use it (their outputs stay
PyTorch's, bit for bit).
"""

from __future__ import annotations

import ctypes
import functools
import threading

import torch

from .native_build import NativeSource, load_library

SWITCH = "TTS_NATIVE_ATTENTION"  # "0": PyTorch's scaled_dot_product_attention only
SPEC = NativeSource(
    "attention_bf16", SWITCH, ("avx512f", "avx512bw", "avx512_bf16", "amx_tile", "amx_bf16"),
    ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mamx-tile",
     "-mamx-bf16", "-fopenmp"))
_lock = threading.Lock()
_I64 = ctypes.c_int64


class NativeAttention:
    """The loaded kernel: :meth:`attend` on inputs it takes (:meth:`takes`)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self.head_dim = int(library.tts_attention_head_dim())
        self._call = library.tts_attention_bf16
        self._call.restype = ctypes.c_int
        self._call.argtypes = ([ctypes.c_void_p, _I64, _I64] * 4 + [_I64] * 4
                               + [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_int])

    def takes(self, queries: torch.Tensor, head_dim: int) -> bool:
        """Whether [B, T, heads * head_dim] bfloat16 inputs of this head size fit."""
        return (queries.dtype == torch.bfloat16 and queries.device.type == "cpu"
                and head_dim == self.head_dim)

    def attend(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               out: torch.Tensor, key_begin: torch.Tensor, key_end: torch.Tensor,
               heads: int) -> None:
        """out[b, i] = attention of queries[b, i] over keys/values[b, key_begin[i]:key_end[i]],
        head by head, scaled by 1/sqrt(head_dim). queries, out [B, T, heads * head_dim]; keys,
        values [B, S, heads * head_dim]; all bfloat16 with unit channel stride; key_begin and
        key_end int32 [T] (clipped to 0..S)."""
        b, t, width = queries.shape
        for name, tensor, rows in (("keys", keys, None), ("values", values, None),
                                   ("out", out, t)):
            if tensor.dtype != torch.bfloat16 or tensor.dim() != 3 or tensor.shape[0] != b \
                    or tensor.shape[2] != width or tensor.stride(2) != 1 \
                    or (rows is not None and tensor.shape[1] != rows):
                raise ValueError(f"native attention: {name} {tuple(tensor.shape)} does not "
                                 f"match queries {tuple(queries.shape)}")
        if queries.stride(2) != 1 or width != heads * self.head_dim:
            raise ValueError("native attention: queries must be [B, T, heads * 64], channels "
                             "contiguous")
        for bounds in (key_begin, key_end):
            if bounds.dtype != torch.int32 or not bounds.is_contiguous() \
                    or bounds.shape != (t,):
                raise ValueError("native attention: key ranges must be int32 [T]")
        status = self._call(
            queries.data_ptr(), queries.stride(0), queries.stride(1),
            keys.data_ptr(), keys.stride(0), keys.stride(1),
            values.data_ptr(), values.stride(0), values.stride(1),
            out.data_ptr(), out.stride(0), out.stride(1),
            b, t, heads, keys.shape[1], key_begin.data_ptr(), key_end.data_ptr(),
            self.head_dim ** -0.5, torch.get_num_threads())
        if status:
            raise MemoryError("native attention: no memory for its scratch buffers")


@functools.cache
def _load() -> NativeAttention | None:
    library = load_library(SPEC)
    if library is None:
        return None
    if library.tts_attention_init():
        return None  # the kernel refused this process the AMX tile state
    return NativeAttention(library)


def native_attention() -> NativeAttention | None:
    """The kernel, built and loaded once per process; None where it cannot run."""
    with _lock:
        return _load()
