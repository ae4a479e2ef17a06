"""Linear layers whose weights are laid out once for the CPU's matrix kernels.

A bfloat16 ``F.linear`` on the CPU hands its weight to oneDNN, which reorders it into its
blocked layout on every call; on the flow estimator's chunk-sized inputs (tens of rows) that
reorder costs about as much as the product itself. Reordering once per weight and calling the
oneDNN kernel on the packed weight gives the same numbers ~40 % faster (52 x 256 x 1536:
58 -> 34 us, 2 threads, this project's AMX machine; results equal to the last bit there).
float32 stays on ``F.linear``: packed float32 products round differently, and the float32
path is the exact one. Other devices and dtypes are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .gemm_native import NativeWeight, native_gemm
from .qwen2 import fuse_projections

_MKLDNN_BF16 = bool(torch.backends.mkldnn.is_available()
                    and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def packs_bfloat16(device: torch.device) -> bool:
    """Whether :func:`prepare` packs bfloat16 weights on ``device`` (a CPU whose oneDNN has
    bfloat16 kernels)."""
    return _MKLDNN_BF16 and device.type == "cpu"


def packs(weight: torch.Tensor) -> bool:
    """Whether :func:`prepare` packs this weight (a bfloat16 weight where
    :func:`packs_bfloat16`)."""
    return weight.dtype == torch.bfloat16 and packs_bfloat16(weight.device)


Weight = torch.Tensor | NativeWeight  # what prepare gives


def prepare(weight: torch.Tensor, native: bool = False) -> Weight:
    """``weight`` [out, in] as :func:`linear` takes it best: with ``native``, in the tile layout
    of this project's AMX kernel (gemm_native) where that runs and takes it; else packed by
    oneDNN where :func:`packs`; else as it is."""
    weight = weight.detach()
    if native and weight.dtype == torch.bfloat16:
        kernel = native_gemm()
        if kernel is not None and kernel.takes(weight):
            return kernel.pack(weight)
    if packs(weight):
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)
    return weight


def linear(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """``residual + F.linear(x, weight, bias)`` for a weight from :func:`prepare` (on the
    native kernel the residual joins the float32 sums before the one rounding)."""
    if isinstance(weight, NativeWeight):
        return weight.linear(x, bias, residual=residual)
    if weight.is_mkldnn:
        y = torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")
    else:
        y = F.linear(x, weight, bias)
    return y if residual is None else residual + y


def linear_gelu(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None,
                approximate: str) -> torch.Tensor:
    """``F.gelu(linear(x, weight, bias), approximate=approximate)``; on a packed weight the
    GELU is applied to the product's float32 sums before rounding to bfloat16 (one rounding
    fewer, and one pass over the output fewer)."""
    if isinstance(weight, NativeWeight):
        return weight.linear(x, bias, gelu=approximate)
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "gelu", [],
                                                  approximate)
    return F.gelu(F.linear(x, weight, bias), approximate=approximate)


def derived(module: nn.Module, build: Callable[[], torch.Tensor], *weights: torch.Tensor,
            ) -> Weight:
    """``prepare(build(), native=True)`` computed once per version of ``weights`` and kept on
    ``module`` (a cast or a reload of the weights makes a new one)."""
    # (inference tensors, made under torch.inference_mode, keep no version)
    key = tuple((w.data_ptr(), w.dtype, 0 if w.is_inference() else w._version)
                for w in weights)
    memo = module.__dict__.get("_derived_weight")
    if memo is None or memo[0] != key:
        memo = (key, prepare(build(), native=True))
        module.__dict__["_derived_weight"] = memo
    return memo[1]


def module_weight(module: nn.Linear) -> Weight:
    """The module's weight as :func:`prepare` gives it (kept on the module)."""
    return derived(module, lambda: module.weight, module.weight)


def module_linear(module: nn.Linear, x: torch.Tensor, residual: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """``residual + module(x)`` on its prepared weight."""
    return linear(x, module_weight(module), module.bias, residual)


class PackedLinear(nn.Module):
    """An ``nn.Linear`` replaced by its packed weight (see :func:`prepare`) and bias.

    The packed weight is not a parameter (oneDNN's layout has no state-dict form), so the
    replacement is one way: load the checkpoint again for another precision.
    """

    def __init__(self, layer: nn.Linear, dtype: torch.dtype | None = None) -> None:
        """``dtype``: of the weight and the product (default: the layer's); inputs of another
        dtype are cast to it and the output back to theirs."""
        super().__init__()
        dtype = dtype or layer.weight.dtype
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.weight_packed = prepare(layer.weight.detach().to(dtype))
        bias = None if layer.bias is None else layer.bias.detach().to(dtype)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.weight_packed.dtype
        return linear(x.to(dtype), self.weight_packed, self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def fuse_and_pack(layers: nn.ModuleList) -> bool:
    """Every Linear of bfloat16 Qwen2 decoder layers as a :class:`PackedLinear`, q/k/v and
    gate/up each fused into one (``qkv_proj``, ``gate_up_proj``), where :func:`packs` holds;
    False (nothing changed) elsewhere.

    A decode step then reads each weight once in oneDNN's layout: on this project's AMX CPU
    that read the 24 gate/up matrices of the full-size model in 17 ms at 1 to 16 rows alike,
    where the int8 kernel took 17 ms at 1 row and 45 ms at 8 (it converts per row).
    """
    if not layers or not packs(layers[0].self_attn.o_proj.weight):
        return False
    fuse_projections(layers, PackedLinear)
    return True
