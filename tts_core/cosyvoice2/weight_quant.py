"""Weight-only quantised Linear layers for the Qwen2 stack on CPU.

Decoding one token multiplies one row by every weight of the stack, so its time is the time to
read the weights. Storing them in int8 (per output channel) or int4 (per group of input
channels) reads a quarter or an eighth of the float32 bytes; the activations stay in floating
point (bfloat16 into the kernel, which widens to float32 for the sums), so unlike dynamic int8
nothing is lost to rounding the activations, whose outliers are what make dynamic int8 drift.

The kernels are PyTorch's own CPU kernels (``aten._weight_int8pack_mm``,
``aten._weight_int4pack_mm_for_cpu``) and, for int8 decode steps of up to NATIVE_ROWS rows where
the CPU has AVX-512 VNNI and a C compiler is at hand, this project's own (``int8_matvec``: int16
activations, integer dot products, float32 scales and output). Rounding is plain
round-to-nearest: int8 symmetric per output channel (scale = max |w| / 127), int4 asymmetric per
group (the group's min..max in 15 steps), no calibration data needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .int8_matvec import native_kernel
from .packed_linear import PackedLinear, packs_bfloat16
from .qwen2 import fuse_projections

WEIGHT_BITS = (8, 4)
INT4_GROUP_SIZES = (32, 64, 128, 256)
# Above this many rows (a prefill) an int8 layer widens its weights and runs a floating-point
# GEMM: the int8 kernel works row by row, so on a 112-row prompt it was ~2x slower than float32,
# while widening costs about a third of a float32 GEMM. Decode batches stay below it. The GEMM
# runs in ``gemm_dtype``: bfloat16 on CPUs with AMX (the 91-row prefill of a 4864x896 layer took
# 1.0 ms against 3.3 ms in float32 on 2 threads), float32 elsewhere.
GEMM_ROWS = 32
# Where oneDNN has bfloat16 kernels, each int8 layer also keeps its weight in bfloat16, packed
# (packed_linear), for calls of more than this many rows: a prefill, or a decode step of many
# requests. The int8 kernel converts the weight for every row, so its time grows with the rows
# (24 gate/up matrices of the full-size model, 2 AMX cores: 17 ms at 1 row, 23 at 4, 45 at 8,
# 425 at 100) while the packed bfloat16 product only reads twice the bytes (17 ms from 1 to 16
# rows, 27 at 100). One decoding request keeps the int8 kernel, which is faster there per
# decode step (34 against 42 ms for the whole stack). Costs the bfloat16 copy's memory.
PACKED_ROWS = 3
# The native kernel (int8_matvec) reads each weight once for up to eight rows, so it beats the
# packed bfloat16 copy up to eight rows and loses from nine (all 96 int8 layers of the
# full-size stack, 2 AMX cores: 16 ms at 1 row, 24 at 4, 27 at 8, 44 at 12; the packed copy
# 35-38 ms at 1 to 12 rows). Where it runs it takes calls of up to this many rows.
NATIVE_ROWS = 8


class WeightOnlyLinear(nn.Module):
    """``y = x @ dequant(W).T + b`` with W kept as int8 or packed int4 (CPU only).

    Built from a float ``nn.Linear`` by :meth:`from_linear`; output dtype follows the input.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                 gemm_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.gemm_dtype = gemm_dtype  # of the prefill GEMM (int8 only; see GEMM_ROWS)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        # int8: the scales in float32 as well, for the native kernel (int8_matvec)
        self.register_buffer("scales_float", None if bits != 8 else scales.float())
        self.register_buffer("bias", bias)
        # Optional module for calls of more than ``prefill_rows`` rows (prefills, large decode
        # batches): a packed bfloat16 copy of the layer, or a dynamic-int8 Linear (benchmarks).
        self.prefill: nn.Module | None = None
        self.prefill_rows = GEMM_ROWS

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int = 32,
                    gemm_dtype: torch.dtype = torch.float32) -> WeightOnlyLinear:
        if bits not in WEIGHT_BITS:
            raise ValueError(f"weight bits must be one of {WEIGHT_BITS}, got {bits}")
        weight = linear.weight.detach().float()
        if weight.device.type != "cpu":
            raise ValueError("weight-only int8/int4 Linear layers run on CPU only")
        out_features, in_features = weight.shape
        bias = None if linear.bias is None else linear.bias.detach().float().clone()
        if bits == 8:
            scale = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12)
            q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
            module = cls(in_features, out_features, 8, 0, q, scale.to(torch.bfloat16), bias,
                         gemm_dtype)
            module.scales_float = scale.clone()  # not rounded to bfloat16
            return module
        if group_size not in INT4_GROUP_SIZES or in_features % group_size:
            raise ValueError(f"int4 group size must be one of {INT4_GROUP_SIZES} and divide "
                             f"the input width {in_features}, got {group_size}")
        groups = weight.reshape(out_features, in_features // group_size, group_size)
        low, high = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
        scale = ((high - low) / 15).clamp(min=1e-12)
        q = torch.round((groups - low) / scale).clamp(0, 15).to(torch.int32)
        packed = torch._convert_weight_to_int4pack_for_cpu(
            q.reshape(out_features, in_features), 1)
        # The kernel dequantises w = (q - 8) * scale + zero, so zero is the value of q = 8.
        zero = low + 8 * scale
        scale_zero = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], dim=-1)  # [N, G, 2]
        scale_zero = scale_zero.transpose(0, 1).contiguous().to(torch.bfloat16)  # [G, N, 2]
        return cls(in_features, out_features, 4, group_size, packed, scale_zero, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        kernel = native_kernel() if self.bits == 8 else None
        if kernel is not None and 0 < x.numel() <= NATIVE_ROWS * self.in_features \
                and kernel.takes(self.qweight):
            y = kernel.matmul(x.reshape(-1, self.in_features), self.qweight,
                              self.scales_float.float(),
                              None if self.bias is None else self.bias.float())
            return y.to(x.dtype).view(*shape[:-1], self.out_features)
        if self.prefill is not None and x.numel() > self.prefill_rows * self.in_features:
            return self.prefill(x)
        if self.bits == 8 and x.numel() > GEMM_ROWS * self.in_features:
            # scales per output channel: applied to the product, not to every weight
            rows = x.reshape(-1, self.in_features).to(self.gemm_dtype)
            y = F.linear(rows, self.qweight.to(self.gemm_dtype)).float() * self.scales.float()
            if self.bias is not None:
                y = y + self.bias
            return y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.bits == 8:
            y = torch._weight_int8pack_mm(rows, self.qweight, self.scales)
        else:
            y = torch._weight_int4pack_mm_for_cpu(rows, self.qweight, self.group_size,
                                                  self.scales)
        if self.bias is not None and self.bias.dtype == x.dtype:
            # One call: adding the float32 bias widens y exactly, as y.to(float32) would.
            y = torch.add(y, self.bias)
        elif self.bias is not None:
            y = y.to(x.dtype) + self.bias.to(x.dtype)
        else:
            y = y.to(x.dtype)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}{group}, gemm_dtype={str(self.gemm_dtype)[6:]}")


# Names of the Linear layers inside one Qwen2 decoder layer, by block (before fusion).
ATTENTION_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "self_attn.o_proj")
MLP_LINEARS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def fuse_and_quantize(layers: nn.ModuleList, gemm_dtype: torch.dtype = torch.float32) -> None:
    """Every Linear of the Qwen2 decoder layers as weight-only int8, with q/k/v and gate/up
    each fused into one layer (``qkv_proj``, ``gate_up_proj``).

    Per-output-channel scales make the fused layer's rows exactly the separate layers' rows;
    the gain is fewer kernel calls and activation casts per decode step (7 -> 4 per layer).
    """
    bf16_copy = packs_bfloat16(layers[0].self_attn.o_proj.weight.device) if layers else False
    native_kernel()  # built (or found) now, while the model loads, not in the first request

    def quantized(layer: nn.Linear) -> WeightOnlyLinear:
        module = WeightOnlyLinear.from_linear(layer, 8, gemm_dtype=gemm_dtype)
        if bf16_copy:  # see PACKED_ROWS
            module.prefill = PackedLinear(layer, torch.bfloat16)
            module.prefill_rows = PACKED_ROWS
        return module

    fuse_projections(layers, quantized)
