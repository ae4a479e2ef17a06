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
from dataclasses import dataclass

import torch

from .native_build import NativeSource, load_library

SWITCH = "TTS_NATIVE_ATTENTION"  # "0": PyTorch's scaled_dot_product_attention only
SPEC = NativeSource(
    "attention_bf16", SWITCH, ("avx512f", "avx512bw", "avx512_bf16", "amx_tile", "amx_bf16"),
    ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mamx-tile",
     "-mamx-bf16", "-fopenmp"))
_lock = threading.Lock()
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


class _Part(ctypes.Structure):
    """attention_bf16.c's Part (field for field)."""

    _fields_ = [("q", _PTR), ("q_batch", _I64), ("q_row", _I64),
                ("k", _PTR), ("v", _PTR), ("k_batch", _I64), ("k_row", _I64),
                ("v_batch", _I64), ("v_row", _I64),
                ("new_k", _PTR), ("new_v", _PTR), ("new_batch", _I64), ("new_row", _I64),
                ("new_at", _I64),
                ("o", _PTR), ("o_batch", _I64), ("o_row", _I64),
                ("rows", _I64), ("keys", _I64), ("key_begin", _PTR), ("key_end", _PTR)]


@dataclass
class AttentionPart:
    """One request's rows in a call. queries, out [B, T, heads * head_dim]; keys, values
    [B, S, heads * head_dim] (a cache: keys index from its first row); key_begin, key_end int32
    [T]: each row's visible keys (clipped to 0..S). new_keys/new_values [B, T, ...]: the rows'
    own keys and values, written into keys/values at rows new_at.. before attending (None: they
    are there already). All bfloat16 with unit channel stride."""

    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    out: torch.Tensor
    key_begin: torch.Tensor
    key_end: torch.Tensor
    new_keys: torch.Tensor | None = None
    new_values: torch.Tensor | None = None
    new_at: int = 0


class NativeAttention:
    """The loaded kernel: :meth:`attend_parts` on inputs it takes (:meth:`takes`)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self.head_dim = int(library.tts_attention_head_dim())
        self._call = library.tts_attention_bf16
        self._call.restype = ctypes.c_int
        self._call.argtypes = [ctypes.POINTER(_Part), _I64, _I64, _I64, ctypes.c_float,
                               ctypes.c_int]

    def takes(self, queries: torch.Tensor, head_dim: int) -> bool:
        """Whether [B, T, heads * head_dim] bfloat16 inputs of this head size fit."""
        return (queries.dtype == torch.bfloat16 and queries.device.type == "cpu"
                and head_dim == self.head_dim)

    def attend(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               out: torch.Tensor, key_begin: torch.Tensor, key_end: torch.Tensor,
               heads: int) -> None:
        """One part (see :class:`AttentionPart`), scaled by 1/sqrt(head_dim)."""
        self.attend_parts([AttentionPart(queries, keys, values, out, key_begin, key_end)],
                          heads)

    def _check(self, parts: list[AttentionPart], heads: int) -> None:
        batch, width = parts[0].queries.shape[0], heads * self.head_dim
        for part in parts:
            q, k, v = part.queries, part.keys, part.values
            rows = q.shape[1]
            for name, t, length in (("queries", q, None), ("keys", k, None),
                                    ("values", v, None), ("out", part.out, rows),
                                    ("new keys", part.new_keys, rows),
                                    ("new values", part.new_values, rows)):
                if t is None:
                    continue
                if t.dtype != torch.bfloat16 or t.dim() != 3 or t.shape[0] != batch \
                        or t.shape[2] != width or t.stride(2) != 1 \
                        or (length is not None and t.shape[1] != length):
                    raise ValueError(f"native attention: {name} {t.dtype} {tuple(t.shape)} "
                                     f"for queries {tuple(q.shape)}, {heads} heads of "
                                     f"{self.head_dim}")
            for bounds in (part.key_begin, part.key_end):
                if bounds.dtype != torch.int32 or not bounds.is_contiguous() \
                        or bounds.shape != (rows,):
                    raise ValueError("native attention: key ranges must be int32 [T]")
            if (part.new_keys is None) != (part.new_values is None):
                raise ValueError("native attention: new keys and values go together")
            if part.new_keys is not None and (
                    part.new_keys.stride() != part.new_values.stride()  # type: ignore[union-attr]
                    or not 0 <= part.new_at
                    or part.new_at + rows > min(k.shape[1], v.shape[1])):
                raise ValueError("native attention: new keys/values do not fit the cache")

    def attend_parts(self, parts: list[AttentionPart], heads: int, check: bool = True
                     ) -> None:
        """Every part's attention in one call (their (batch, head) pairs over the threads).
        ``check``: validate the parts' shapes first (the flow checks the first layer of a run
        only: every later layer passes tensors made by the same code, and at about 10 us a
        part the checks would cost more than the copies the kernel saves)."""
        if check:
            self._check(parts, heads)
        structs = (_Part * len(parts))()
        for struct, part in zip(structs, parts, strict=True):
            q, k, v, o = part.queries, part.keys, part.values, part.out
            if part.new_keys is not None:
                new_k, new_v = part.new_keys, part.new_values
                assert new_v is not None
                struct.new_k, struct.new_v = new_k.data_ptr(), new_v.data_ptr()
                struct.new_batch, struct.new_row = new_k.stride()[:2]
                struct.new_at = part.new_at
            struct.q = q.data_ptr()
            struct.q_batch, struct.q_row = q.stride()[:2]
            struct.k, struct.v = k.data_ptr(), v.data_ptr()
            struct.k_batch, struct.k_row = k.stride()[:2]
            struct.v_batch, struct.v_row = v.stride()[:2]
            struct.o = o.data_ptr()
            struct.o_batch, struct.o_row = o.stride()[:2]
            struct.rows, struct.keys = q.shape[1], min(k.shape[1], v.shape[1])
            struct.key_begin = part.key_begin.data_ptr()
            struct.key_end = part.key_end.data_ptr()
        status = self._call(structs, len(parts), parts[0].queries.shape[0], heads,
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
