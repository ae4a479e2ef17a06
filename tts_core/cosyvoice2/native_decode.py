"""Decode steps of the int8-weight Qwen2 stack as one native call per decoder layer.

A decode step reads ~360 MB of int8 weights (about 16 ms on two cores); around those reads
PyTorch spent another ~6 ms on some 3000 small calls (norms, rotary, cache writes, attention,
SiLU, residuals; 2-10 us each, mostly dispatch). ``tts_int8_decoder_layer`` (int8_matvec.c)
does a whole layer for every decode row in one call: float32 throughout, the products on the
int8 kernel, each row's new key and value written into its own :class:`KVCache` and attended
with the rows cached before it.

It takes the stack as :func:`weight_quant.fuse_and_quantize` leaves it (q/k/v and gate/up fused,
weight-only int8, float32 activations) and decode rows only (one new position per request, at
most ``NATIVE_ROWS``: ``lm_batch.packed_forward``, and ``Qwen2Model.forward`` for one request);
everything else keeps the PyTorch path. Same arithmetic in another order
(sums of products, norms and softmax in float32; e^x to float32's rounding), so its outputs
differ from that path's by float32 rounding only: tests/test_native_decode.py bounds it.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from tts_core import cancellation

from .int8_matvec import DecoderLayer, NativeInt8Kernel, QuantLinear, RowCache, native_kernel
from .weight_quant import NATIVE_ROWS, WeightOnlyLinear

if TYPE_CHECKING:
    from .qwen2 import KVCache, Qwen2Model

MAX_HEAD_DIM = 256  # the kernel's rotary scratch


def _linear(module: object, kernel: NativeInt8Kernel) -> QuantLinear | None:
    """The layer's int8 weight as the kernel reads it, or None when it is not one it takes."""
    if not isinstance(module, WeightOnlyLinear) or module.bits != 8 \
            or not kernel.takes(module.qweight) or module.scales_float is None:
        return None
    bias = module.bias
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        return None
    return QuantLinear(module.qweight.data_ptr(), module.scales_float.data_ptr(),
                       0 if bias is None else bias.data_ptr(), module.out_features,
                       module.in_features)


class NativeDecoder:
    """The stack's layers described once for the kernel (pointers into the modules' tensors,
    which the backbone keeps alive)."""

    def __init__(self, kernel: NativeInt8Kernel, layers: list[DecoderLayer], kv_heads: int,
                 head_dim: int) -> None:
        self._kernel, self._layers = kernel, layers
        self.kv_heads, self.head_dim = kv_heads, head_dim

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                caches: Sequence[KVCache]) -> torch.Tensor:
        """Rows x [N, D] (float32), row i one new position after ``caches[i]`` (extended in
        place): the stack's output before its final norm [N, D]. cos, sin: the rows'
        :func:`qwen2.rotary_cos_sin` tables."""
        rows = x.shape[0]
        x = x.to(torch.float32).contiguous().clone()
        cos = cos.to(torch.float32).reshape(rows, self.head_dim).contiguous()
        sin = sin.to(torch.float32).reshape(rows, self.head_dim).contiguous()
        slots = (RowCache * rows)()
        for index in range(len(self._layers)):
            cancellation.check()  # as on PyTorch's path: a hang-up stops at the next layer
            self._run_layer(index, x, cos, sin, caches, slots)
        return x

    def _run_layer(self, index: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   caches: Sequence[KVCache], slots: ctypes.Array) -> None:
        for slot, cache in zip(slots, caches, strict=True):
            keys, values, position = cache.claim(index, x, self.kv_heads, self.head_dim)
            if not (keys.is_contiguous() and values.is_contiguous()
                    and keys.dtype == values.dtype == torch.float32):
                raise RuntimeError("native decoder: a KV cache that is not contiguous float32")
            slot.keys, slot.values = keys.data_ptr(), values.data_ptr()
            slot.head_stride, slot.position = keys.stride(1), position
        status = self._kernel.decoder_layer(x.data_ptr(), x.shape[0], x.shape[1],
                                            ctypes.byref(self._layers[index]), cos.data_ptr(),
                                            sin.data_ptr(), slots, torch.get_num_threads())
        if status:
            raise RuntimeError(f"native decoder layer {index} failed (status {status})")


def _describe(backbone: Qwen2Model, kernel: NativeInt8Kernel) -> NativeDecoder | None:
    cfg = backbone.config
    if cfg.head_dim % 16 or cfg.head_dim > MAX_HEAD_DIM or cfg.hidden_size % 32:
        return None
    layers = []
    for layer in backbone.layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears = [_linear(m, kernel) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj,
                                                 mlp.down_proj)]
        norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
        if any(p is None for p in linears) or any(
                w.dtype != torch.float32 or not w.is_contiguous() for w in norms):
            return None
        layers.append(DecoderLayer(norms[0].data_ptr(), norms[1].data_ptr(),
                                   layer.input_layernorm.eps, *linears, attn.num_heads,
                                   attn.num_kv_heads, attn.head_dim))
    return NativeDecoder(kernel, layers, cfg.num_key_value_heads, cfg.head_dim)


def native_decoder(backbone: Qwen2Model, rows: int) -> NativeDecoder | None:
    """The native decode path for ``rows`` decode rows of this stack, or None where it does
    not apply (not weight-only int8, float activations, on the CPU; no kernel; too many
    rows). Described once per version of the weights (kept on the backbone)."""
    if not 0 < rows <= NATIVE_ROWS or backbone.embed_tokens.weight.dtype != torch.float32:
        return None
    kernel = native_kernel()
    if kernel is None:
        return None
    key = tuple(getattr(layer.self_attn.qkv_proj, "qweight", torch.empty(0)).data_ptr()
                for layer in backbone.layers)
    memo = backbone.__dict__.get("_native_decoder")
    if memo is None or memo[0] != key:
        memo = (key, _describe(backbone, kernel))
        backbone.__dict__["_native_decoder"] = memo
    return memo[1]
