"""Weight-only quantised Linear layers for the Qwen2 stack on CPU.

Decoding one token multiplies one row by every weight of the stack, so its time is the time to
read the weights. Storing them in int8 (per output channel) or int4 (per group of input
channels) reads a quarter or an eighth of the float32 bytes; the activations stay in floating
point (bfloat16 into the kernel, which widens to float32 for the sums), so unlike dynamic int8
nothing is lost to rounding the activations, whose outliers are what make dynamic int8 drift.

The kernels are PyTorch's own CPU kernels (``aten._weight_int8pack_mm``,
``aten._weight_int4pack_mm_for_cpu``). Rounding is plain round-to-nearest: int8 symmetric per
output channel (scale = max |w| / 127), int4 asymmetric per group (the group's min..max in 15
steps), no calibration data needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

WEIGHT_BITS = (8, 4)
INT4_GROUP_SIZES = (32, 64, 128, 256)
# Above this many rows (a prefill) an int8 layer widens its weights to float32 and runs the
# float32 GEMM: the int8 kernel works row by row, so on a 112-row prompt it was ~2x slower than
# float32, while widening costs about a third of a float32 GEMM. Decode batches stay below it.
GEMM_ROWS = 32


class WeightOnlyLinear(nn.Module):
    """``y = x @ dequant(W).T + b`` with W kept as int8 or packed int4 (CPU only).

    Built from a float ``nn.Linear`` by :meth:`from_linear`; output dtype follows the input.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)
        # Optional module for prefills (many rows), e.g. a dynamic-int8 Linear of the same layer.
        self.prefill: nn.Module | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int = 32) -> WeightOnlyLinear:
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
            return cls(in_features, out_features, 8, 0, q, scale.to(torch.bfloat16), bias)
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
        if self.prefill is not None and x.numel() > GEMM_ROWS * self.in_features:
            return self.prefill(x)
        if self.bits == 8 and x.numel() > GEMM_ROWS * self.in_features:
            # scales per output channel: applied to the product, not to every weight
            y = F.linear(x.reshape(-1, self.in_features).float(), self.qweight.float())
            y = y * self.scales.float()
            if self.bias is not None:
                y = y + self.bias
            return y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.bits == 8:
            y = torch._weight_int8pack_mm(rows, self.qweight, self.scales)
        else:
            y = torch._weight_int4pack_mm_for_cpu(rows, self.qweight, self.group_size,
                                                  self.scales)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}{group}")


# Names of the Linear layers inside one Qwen2 decoder layer, by block.
ATTENTION_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "self_attn.o_proj")
MLP_LINEARS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def quantize_layers(layers: nn.ModuleList, scheme: dict[str, tuple[int, int]]) -> None:
    """Replace, in every decoder layer, each Linear named in ``scheme`` by a
    :class:`WeightOnlyLinear` with that (bits, group size); the others stay as they are."""
    for layer in layers:
        for name, (bits, group) in scheme.items():
            parent_name, _, child = name.rpartition(".")
            parent = layer.get_submodule(parent_name)
            linear = getattr(parent, child)
            if not isinstance(linear, nn.Linear):
                raise TypeError(f"{name} is a {type(linear).__name__}, not a float Linear")
            setattr(parent, child, WeightOnlyLinear.from_linear(linear, bits, group))
