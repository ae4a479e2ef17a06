"""Velocity estimator of the CosyVoice 2 flow: a causal, conditional 1-D U-Net.

Input channels are concat(x, mu, speaker repeated over time, cond) (4 x 80 = 320 for the
official model). Every level is a causal ResNet block (conditioned on the time embedding),
``n_blocks`` transformer blocks and a causal conv (or a down/up-sampling conv when there is more
than one level). Module names follow the official ``flow.pt`` keys under ``decoder.estimator.``.

Attention is full when not streaming, otherwise chunked: a frame sees its own chunk of
``static_chunk_size`` frames and ``num_decoding_left_chunks`` earlier ones (< 0: all of them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tts_core.cosyvoice2.attention_native import (
    AttentionPart,
    NativeAttention,
    native_attention,
)
from tts_core.cosyvoice2.flow_encoder import chunk_attention_mask
from tts_core.cosyvoice2.gemm_native import NativeGemm, native_gemm
from tts_core.cosyvoice2.packed_linear import (
    derived,
    linear,
    linear_gelu,
    module_linear,
    module_weight,
)

_ACTIVATIONS = {"gelu": "none", "gelu-approximate": "tanh"}  # feed-forward GELU flavours
# Defaults of the reference constructor for keys a yaml may leave out.
_REFERENCE_DEFAULTS: dict[str, Any] = {
    "channels": [256, 256], "attention_head_dim": 64, "n_blocks": 1, "num_mid_blocks": 2,
    "num_heads": 4, "act_fn": "snake", "static_chunk_size": 50, "num_decoding_left_chunks": 2,
}
MASKED_BIAS = -1.0e10  # additive attention bias on hidden keys (as the reference uses)


@dataclass
class FlowDecoderConfig:
    in_channels: int = 320  # x + mu + speaker + cond
    out_channels: int = 80
    channels: tuple[int, ...] = field(default=(256,))
    attention_head_dim: int = 64
    n_blocks: int = 4  # transformer blocks per level
    num_mid_blocks: int = 12
    num_heads: int = 8
    act_fn: str = "gelu"
    ff_mult: int = 4
    static_chunk_size: int = 50  # frames
    num_decoding_left_chunks: int = -1
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        if not self.channels:
            raise ValueError("flow decoder: channels must list at least one width")
        if self.act_fn not in _ACTIVATIONS:
            raise ValueError(f"flow decoder: act_fn {self.act_fn!r} is not supported "
                             f"(only {sorted(_ACTIVATIONS)})")
        if self.in_channels % 2:
            raise ValueError("flow decoder: in_channels must be even (sinusoidal time embedding)")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.channels[0]

    @classmethod
    def from_yaml(cls, args: dict[str, Any]) -> FlowDecoderConfig:
        """Build from the ``estimator`` node's arguments of ``cosyvoice2.yaml``."""
        merged = {**_REFERENCE_DEFAULTS, **args}
        for key in ("in_channels", "out_channels"):
            if key not in merged:
                raise ValueError(f"flow decoder: the yaml gives no {key}")
        return cls(
            in_channels=int(merged["in_channels"]),
            out_channels=int(merged["out_channels"]),
            channels=tuple(merged["channels"]),
            attention_head_dim=int(merged["attention_head_dim"]),
            n_blocks=int(merged["n_blocks"]),
            num_mid_blocks=int(merged["num_mid_blocks"]),
            num_heads=int(merged["num_heads"]),
            act_fn=str(merged["act_fn"]),
            static_chunk_size=int(merged["static_chunk_size"]),
            num_decoding_left_chunks=int(merged["num_decoding_left_chunks"]),
        )


def sinusoidal_time_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """[B] flow times in [0, 1] -> [B, dim] (sin half, then cos half)."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
    angle = scale * t.unsqueeze(1) * freq.unsqueeze(0)
    return torch.cat((angle.sin(), angle.cos()), dim=-1).to(t.dtype)


class TimestepMLP(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class CausalConv1d(nn.Conv1d):
    """Conv1d that pads ``kernel_size - 1`` zeros on the left only (stride 1)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__(in_channels, out_channels, kernel_size)
        self.left_pad = kernel_size - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.left_pad, 0)))


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of a [B, C, T] tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class CausalBlock(nn.Module):
    """causal conv k3 -> channel LayerNorm -> Mish, masked before and after."""

    def __init__(self, dim: int, dim_out: int, eps: float):
        super().__init__()
        # indices 0 and 2 carry weights (1 and 3 were transposes in the reference layout)
        self.block = nn.Sequential(CausalConv1d(dim, dim_out, 3), nn.Identity(),
                                   ChannelLayerNorm(dim_out, eps=eps), nn.Identity(), nn.Mish())

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.block(x * mask) * mask


class CausalResnetBlock(nn.Module):
    def __init__(self, dim: int, dim_out: int, time_dim: int, eps: float):
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_dim, dim_out))
        self.block1 = CausalBlock(dim, dim_out, eps)
        self.block2 = CausalBlock(dim_out, dim_out, eps)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        h = self.block1(x, mask) + self.mlp(time).unsqueeze(-1)
        h = self.block2(h, mask)
        return h + self.res_conv(x * mask)


class SelfAttention(nn.Module):
    """Multi-head attention with bias-free q/k/v and a biased output projection."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape

        def split(h: torch.Tensor) -> torch.Tensor:
            return h.view(b, t, self.heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.to_q(x)), split(self.to_k(x)),
                                             split(self.to_v(x)), attn_mask=bias)
        return self.to_out[0](out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class GELUProjection(nn.Module):
    def __init__(self, dim: int, dim_out: int, approximate: str):
        super().__init__()
        self.proj = nn.Linear(dim, dim_out)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int, act_fn: str):
        super().__init__()
        inner = dim * mult
        # index 1 was a dropout in the reference layout; keep the numbering of net.2
        self.net = nn.ModuleList([GELUProjection(dim, inner, _ACTIVATIONS[act_fn]),
                                  nn.Identity(), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.net:
            x = module(x)
        return x


class TransformerBlock(nn.Module):
    """Pre-norm self-attention and GELU feed-forward, each with a residual."""

    def __init__(self, dim: int, config: FlowDecoderConfig):
        super().__init__()
        eps = config.layer_norm_eps
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn1 = SelfAttention(dim, config.num_heads, config.attention_head_dim)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.ff = FeedForward(dim, config.ff_mult, config.act_fn)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), bias)
        return x + self.ff(self.norm3(x))


class Downsample(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class UpsampleTransposed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.ConvTranspose1d(dim, dim, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


# --- chunk-by-chunk streaming ---------------------------------------------------------------
#
# Only for single-level U-Nets (the CosyVoice 2 estimator): every op is then causal in time
# except attention inside a chunk, so a chunk's rows are final once the chunk is complete. A
# chunk is computed alone, on shapes that depend only on that chunk, attending to exactly the
# keys it may see; see flow_encoder for why. The frame mask is all ones in inference and is left
# out (multiplying by one is exact).


@dataclass
class EstimatorStepCache:
    """What one Euler step of the estimator keeps of the finished chunks of one request.

    convs: per causal conv (in call order) its last ``kernel-1`` input frames [B, k-1, C];
    keys/values: per attention layer a buffer [B, capacity, heads*head_dim] whose first rows
    belong to finished frames.
    room: this step's share of the stream's own key/value block [layers, 2, B, capacity,
    width] (see kv_arena), where its buffers live and grow in place; None: buffers are grown
    by copying. lease: keeps that block out of the pool while rows in it are in use.
    """

    convs: list[torch.Tensor | None] = field(default_factory=list)
    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)
    room: torch.Tensor | None = None
    lease: object | None = None
    rows: int = 0  # rows written into the room so far (for nbytes)
    # per attention layer whose keys/values live in the room: room[layer] [2, B, capacity,
    # width], made once (keys[layer] and values[layer] are its two halves; see layer_room)
    room_views: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def clone(self, frames: int) -> EstimatorStepCache:
        """A cache that goes on after ``frames`` finished frames, sharing them without copying
        (its buffers end there, so its first write grows them into new memory; the room stays
        with this cache, whose later rows would otherwise be overwritten)."""
        def finished(items: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
            return [None if t is None else t[:, :frames] for t in items]
        return EstimatorStepCache(list(self.convs), finished(self.keys), finished(self.values),
                                  lease=self.lease)

    def layer_room(self, index: int, rows: int, like: torch.Tensor, width: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Where attention layer ``index`` keeps its keys and values in the room: (both
        [2, B, capacity, width], keys, values), once the room has space for ``rows`` and holds
        this layer's finished rows (FlowStreamCache.attach put them there); None otherwise.
        ``like``: the layer's input [B, T, C] (batch, dtype, device)."""
        room = self.room
        if room is None or index >= room.shape[0] or rows > room.shape[3] \
                or room.shape[2] != like.shape[0] or room.shape[4] != width \
                or room.dtype != like.dtype:
            return None
        both = self.room_views.get(index)
        if both is None:
            both = room[index]
            pairs = ((self.keys, both[0]), (self.values, both[1]))
            for items, _ in pairs:
                while index >= len(items):
                    items.append(None)
            if any(items[index] is not None and items[index].data_ptr() != own.data_ptr()
                   for items, own in pairs):
                return None  # rows elsewhere (a clone's shared ones): grown by copying
            for items, own in pairs:
                items[index] = own
            self.room_views[index] = both
        self.rows = max(self.rows, rows)
        return both, self.keys[index], self.values[index]  # type: ignore[return-value]

    def buffer(self, index: int, kind: int, rows: int, like: torch.Tensor, width: int
               ) -> torch.Tensor:
        """Key (kind 0) or value (1) buffer [B, >= rows, width] of attention layer ``index``
        outside a room (where :meth:`layer_room` gives none), its finished rows kept, grown by
        copying when too short; ``like``: the layer's input [B, T, C]."""
        items = self.keys if kind == 0 else self.values
        while index >= len(items):
            items.append(None)
        items[index] = grown = _grow_rows(items[index], rows, like, width)
        return grown

    def nbytes(self) -> int:
        """Memory its tensors hold (of a room, the rows written)."""
        total = 0
        for t in (*self.convs, *self.keys, *self.values):
            if t is None:
                continue
            rows = t.shape[1]
            if self.room is not None and t.dim() == 3 and t.shape[1] == self.room.shape[3]:
                rows = min(rows, self.rows)
            total += t[:, :rows].numel() * t.element_size()
        return total


@dataclass
class ChunkInput:
    """One request's frames in an estimator run over chunks: x, mu, cond [B, 80, r] for
    frames start..start+r-1 of its stream, its speaker spks [B, 80] and its step cache."""

    x: torch.Tensor
    mu: torch.Tensor
    spks: torch.Tensor
    cond: torch.Tensor
    cache: EstimatorStepCache
    start: int

    @property
    def rows(self) -> int:
        return self.x.shape[-1]


class _ChunkRun:
    """Walks the frames of one or more requests through the estimator, each reading and
    extending its own step cache. The requests' frames are packed along time, so every
    position-wise layer (linear, 1x1 conv, norm, activation) runs once over all of them; only
    the causal convs' left context and attention are per request. With one request this is
    exactly the single-stream computation.

    Activations are time-major ([B, T, C], the module forward is channel-major): a causal conv
    then runs as one matrix product over its k shifted inputs side by side, which on
    chunk-sized inputs is several times faster than a convolution call, and the transformer
    blocks need no transposes around them."""

    def __init__(self, parts: list[ChunkInput], left_frames: int | None, chunk: int):
        self.parts, self.left_frames, self.chunk = parts, left_frames, chunk
        self.offsets = [0]
        for part in parts:
            self.offsets.append(self.offsets[-1] + part.rows)
        self.conv_index = self.attn_index = 0
        self.new_convs: list[list[torch.Tensor]] = [[] for _ in parts]
        self._masks: list[torch.Tensor | None | bool] = [False] * len(parts)
        self._ranges: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(parts)
        self._windows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._native: NativeAttention | None | bool = False  # looked up at the first layer
        self._norms: NativeGemm | None | bool = False  # the same

    def _native_attention(self, like: torch.Tensor, head_dim: int) -> NativeAttention | None:
        """The native bfloat16 kernel where it takes this run's activations (never float32)."""
        if self._native is False:
            kernel = native_attention() if like.dtype == torch.bfloat16 else None
            self._native = kernel if kernel is not None and kernel.takes(like, head_dim) \
                else None
        return self._native  # type: ignore[return-value]

    def _key_ranges(self, index: int, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys (from ``first``) each row of part ``index`` may see, as int32 [begin, end)
        per row: the rows of its chunk and the chunks before it within ``left_frames`` (all
        rows of a single chunk see each other), made once per run."""
        ranges = self._ranges[index]
        if ranges is None:
            part = self.parts[index]
            end = part.start + part.rows
            if part.rows <= self.chunk:
                row_chunk = torch.full((part.rows,), part.start)
            else:
                row_chunk = part.start + torch.arange(part.rows) // self.chunk * self.chunk
            visible_end = torch.clamp(row_chunk + self.chunk, max=end)
            visible_begin = torch.full_like(row_chunk, first) if self.left_frames is None \
                else torch.clamp(row_chunk - self.left_frames, min=first)
            ranges = self._ranges[index] = ((visible_begin - first).to(torch.int32),
                                            (visible_end - first).to(torch.int32))
        return ranges

    def _group_mask(self, index: int, first: int, like: torch.Tensor) -> torch.Tensor | None:
        """For a part spanning more than one chunk: which keys (first..) each of its rows may
        see (its own chunk and the ones before it, within ``left_frames``) as an additive mask
        (0 or -inf) in ``like``'s dtype, made once per run (attention would otherwise turn a
        boolean mask into that on every call); None for a single chunk."""
        part = self.parts[index]
        rows, start = part.rows, part.start
        if rows <= self.chunk:
            return None
        device = like.device
        mask = self._masks[index]
        if mask is False:
            row_chunk = start + torch.arange(rows, device=device) // self.chunk * self.chunk
            key = torch.arange(first, start + rows, device=device)
            visible = key[None, :] < row_chunk[:, None] + self.chunk
            if self.left_frames is not None:
                visible &= key[None, :] >= row_chunk[:, None] - self.left_frames
            mask = torch.zeros(visible.shape, dtype=like.dtype, device=device)
            mask = self._masks[index] = mask.masked_fill_(~visible, float("-inf"))
        assert isinstance(mask, torch.Tensor)
        return mask

    def split(self, x: torch.Tensor, dim: int) -> list[torch.Tensor]:
        return [x.narrow(dim, a, b - a) for a, b in pairwise(self.offsets)]

    def _window_rows(self, pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """For the parts' rows joined as [context_0, rows_0, context_1, rows_1, ...] (each
        context ``pad`` rows): the rows of every output row's window (offsets 0..pad, offset
        major) and the rows of each part's new context (its last ``pad``)."""
        index = self._windows.get(pad)
        if index is None:
            windows, contexts, base = [], [], 0
            for part in self.parts:
                first = torch.arange(base, base + part.rows, device=device)
                windows.append(first[:, None] + torch.arange(pad + 1, device=device))
                end = base + pad + part.rows
                contexts.append(torch.arange(end - pad, end, device=device))
                base = end
            index = self._windows[pad] = (torch.cat(windows).flatten(), torch.cat(contexts))
        return index

    def conv(self, module: CausalConv1d, x: torch.Tensor) -> torch.Tensor:
        """The causal conv of x [B, T, Cin] -> [B, T, Cout], each part behind its own context
        (its last ``kernel - 1`` input frames, zeros at the start of a stream)."""
        i, self.conv_index = self.conv_index, self.conv_index + 1
        pad = module.left_pad
        pieces = []
        for part, rows in zip(self.parts, self.split(x, 1), strict=True):
            convs = part.cache.convs
            if i == len(convs):
                convs.append(None)
            context = convs[i]
            if context is None:  # the causal conv's zero padding
                context = x.new_zeros(x.shape[0], pad, x.shape[2])
            pieces += [context, rows]
        joined = torch.cat(pieces, dim=1)
        windows, contexts = self._window_rows(pad, x.device)
        # [B, T, pad + 1, Cin] -> [B, T, (pad + 1) * Cin]: k shifted inputs side by side
        unfolded = joined.index_select(1, windows).view(x.shape[0], x.shape[1], -1)
        new = joined.index_select(1, contexts)  # a new tensor: the caches keep views of it
        for j, kept in enumerate(self.new_convs):
            kept.append(new[:, j * pad:(j + 1) * pad])
        return linear(unfolded, _conv_matrix(module), module.bias)

    def norm(self, norm: nn.LayerNorm, x: torch.Tensor, mish: bool = False) -> torch.Tensor:
        """LayerNorm over channels (then Mish): in bfloat16 on the native kernel (one rounding,
        one call), else PyTorch's."""
        if self._norms is False:
            kernel = native_gemm() if x.dtype == torch.bfloat16 else None
            self._norms = kernel if kernel is not None and kernel.takes_norm(x, norm.weight) \
                else None
        if self._norms is not None:
            return self._norms.layer_norm(x, norm.weight, norm.bias, norm.eps, mish)
        h = F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        return F.mish(h) if mish else h

    def causal_block(self, block: CausalBlock, x: torch.Tensor) -> torch.Tensor:
        conv, _, norm, _, _ = block.block
        return self.norm(norm, self.conv(conv, x), mish=True)

    def resnet(self, block: CausalResnetBlock, x: torch.Tensor, time: torch.Tensor
               ) -> torch.Tensor:
        mish, time_linear = block.mlp
        h = self.causal_block(block.block1, x) + module_linear(time_linear, mish(time)).unsqueeze(1)
        h = self.causal_block(block.block2, h)
        return linear(x, _conv_matrix(block.res_conv), block.res_conv.bias, h)

    def attention(self, attn: SelfAttention, x: torch.Tensor, residual: torch.Tensor
                  ) -> torch.Tensor:
        """``residual`` + the attention layer's output for x [B, T, C]."""
        i, self.attn_index = self.attn_index, self.attn_index + 1
        b = x.shape[0]
        inner = attn.heads * attn.head_dim
        qkv = linear(x, _qkv_matrix(attn), None)  # [B, T, 3 * inner]: q, k, v side by side

        def split(h: torch.Tensor) -> torch.Tensor:
            return h.view(b, h.shape[1], attn.heads, attn.head_dim).transpose(1, 2)

        native = self._native_attention(x, attn.head_dim)
        joined = x.new_empty(b, x.shape[1], inner) if native is not None else None
        outs = []  # per part [B, r, heads, head_dim] (views; one copy joins them)
        native_parts = []
        for index, part in enumerate(self.parts):
            cache = part.cache
            a, r = self.offsets[index], part.rows
            start, end = part.start, part.start + r
            rows = qkv[:, a:a + r]
            first = 0 if self.left_frames is None else max(0, start - self.left_frames)
            views = cache.layer_room(i, end, x, inner)
            if views is not None:
                both, keys, values = views
            else:
                keys = cache.buffer(i, 0, end, x, inner)
                values = cache.buffer(i, 1, end, x, inner)
            if joined is not None:  # the kernel writes this part's keys/values as it goes
                begin, stop = self._key_ranges(index, first)
                native_parts.append(AttentionPart(
                    rows[..., :inner], keys[:, first:end], values[:, first:end],
                    joined[:, a:a + r], begin, stop, rows[..., inner:2 * inner],
                    rows[..., 2 * inner:], start - first))
                continue
            if views is not None:  # keys and values in one copy: k, v are adjacent in qkv
                both[:, :, start:end] = rows[..., inner:].unflatten(-1, (2, inner)) \
                    .permute(2, 0, 1, 3)
            else:
                keys[:, start:end] = rows[..., inner:2 * inner]
                values[:, start:end] = rows[..., 2 * inner:]
            out = F.scaled_dot_product_attention(
                split(rows[..., :inner]), split(keys[:, first:end]),
                split(values[:, first:end]), attn_mask=self._group_mask(index, first, x))
            outs.append(out.transpose(1, 2))
        if native_parts:
            assert native is not None
            native.attend_parts(native_parts, attn.heads, check=i == 0)
        if joined is None:
            joined = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return module_linear(attn.to_out[0], joined.reshape(b, x.shape[1], inner), residual)

    def transformers(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        # the residuals join the output projections (on the native kernel, inside the product;
        # oneDNN's fused "add" post-op took 0.9 ms a call, so there they are added apart)
        for block in blocks:
            x = self.attention(block.attn1, self.norm(block.norm1, x), x)
            x = self.feed_forward(block.ff, self.norm(block.norm3, x), x)
        return x

    @staticmethod
    def feed_forward(ff: FeedForward, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        gelu, _, out = ff.net
        h = linear_gelu(x, module_weight(gelu.proj), gelu.proj.bias, gelu.approximate)
        return module_linear(out, h, residual)


def _conv_matrix(conv: nn.Conv1d) -> torch.Tensor:
    """A conv's weight [Cout, Cin, k] as [Cout, k * Cin]: column j * Cin + c multiplies input
    channel c at offset j of the window, for k shifted inputs side by side."""
    w = conv.weight
    return derived(conv, lambda: w.detach().permute(0, 2, 1).reshape(w.shape[0], -1)
                    .contiguous(), w)


def _qkv_matrix(attn: SelfAttention) -> torch.Tensor:
    """to_q, to_k and to_v stacked: one matrix product per attention layer."""
    weights = (attn.to_q.weight, attn.to_k.weight, attn.to_v.weight)
    return derived(attn, lambda: torch.cat([w.detach() for w in weights]), *weights)


def _grow_rows(buffer: torch.Tensor | None, rows: int, like: torch.Tensor, width: int
               ) -> torch.Tensor:
    have = 0 if buffer is None else buffer.shape[1]
    if have >= rows:
        assert buffer is not None
        return buffer
    # some room ahead, as growing copies everything
    grown = like.new_empty(like.shape[0], max(rows, have + have // 2), width)
    if buffer is not None and have:
        grown[:, :have] = buffer
    return grown


class CausalConditionalDecoder(nn.Module):
    def __init__(self, config: FlowDecoderConfig):
        super().__init__()
        self.config = config
        eps, time_dim, channels = config.layer_norm_eps, config.time_embed_dim, config.channels
        self.time_mlp = TimestepMLP(config.in_channels, time_dim)

        def transformers(dim: int) -> nn.ModuleList:
            return nn.ModuleList(TransformerBlock(dim, config) for _ in range(config.n_blocks))

        self.down_blocks = nn.ModuleList()
        width = config.in_channels
        for i, out in enumerate(channels):
            last = i == len(channels) - 1
            self.down_blocks.append(nn.ModuleList([
                CausalResnetBlock(width, out, time_dim, eps), transformers(out),
                CausalConv1d(out, out, 3) if last else Downsample(out)]))
            width = out
        self.mid_blocks = nn.ModuleList(
            nn.ModuleList([CausalResnetBlock(width, width, time_dim, eps), transformers(width)])
            for _ in range(config.num_mid_blocks))
        up_widths = channels[::-1] + (channels[0],)
        self.up_blocks = nn.ModuleList()
        for i in range(len(channels)):
            out, last = up_widths[i + 1], i == len(channels) - 1
            self.up_blocks.append(nn.ModuleList([
                CausalResnetBlock(2 * up_widths[i], out, time_dim, eps), transformers(out),
                CausalConv1d(out, out, 3) if last else UpsampleTransposed(out)]))
        self.final_block = CausalBlock(up_widths[-1], up_widths[-1], eps)
        self.final_proj = nn.Conv1d(up_widths[-1], config.out_channels, 1)

    def _attention_bias(self, mask: torch.Tensor, streaming: bool) -> torch.Tensor:
        """[B, 1, T] frame mask -> additive bias [B, 1, T, T] (0 visible, -1e10 hidden)."""
        visible = mask.bool().expand(-1, mask.shape[-1], -1)  # query x key
        if streaming and self.config.static_chunk_size > 0:
            visible = visible & chunk_attention_mask(
                mask.shape[-1], self.config.static_chunk_size,
                self.config.num_decoding_left_chunks, device=mask.device)
        # -1e10 as in the reference; in float16 that would be -inf, so clamp to the dtype's range
        hidden_value = max(MASKED_BIAS, torch.finfo(mask.dtype).min)
        bias = torch.zeros(visible.shape, device=mask.device, dtype=mask.dtype)
        return bias.masked_fill(~visible, hidden_value).unsqueeze(1)

    @staticmethod
    def _transformers(blocks: nn.ModuleList, x: torch.Tensor, bias: torch.Tensor
                      ) -> torch.Tensor:
        h = x.transpose(1, 2).contiguous()
        for block in blocks:
            h = block(h, bias)
        return h.transpose(1, 2).contiguous()

    def forward(self, x: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, t: torch.Tensor,
                spks: torch.Tensor, cond: torch.Tensor, streaming: bool = False) -> torch.Tensor:
        """x, mu, cond [B, 80, T]; mask [B, 1, T]; t [B]; spks [B, 80] -> velocity [B, 80, T].

        ``t`` may be float32 while the rest is in a reduced dtype (see the flow-matching solver).
        """
        if not streaming and self._runs_whole_on_native_kernels(x, mask):
            part = ChunkInput(x, mu, spks, cond, EstimatorStepCache(), 0)
            time = self.time_embedding(t, x.dtype)
            return self.forward_chunks([part], time, full_attention=True)[0][0]
        embedded_time = sinusoidal_time_embedding(t.float(), self.config.in_channels)
        time = self.time_mlp(embedded_time.to(x.dtype))
        h = torch.cat([x, mu, spks.unsqueeze(-1).expand(-1, -1, x.shape[-1]), cond], dim=1)

        skips, masks = [], [mask]
        for resnet, blocks, resample in self.down_blocks:
            level_mask = masks[-1]
            h = resnet(h, level_mask, time)
            h = self._transformers(blocks, h, self._attention_bias(level_mask, streaming))
            skips.append(h)
            h = resample(h * level_mask)
            masks.append(level_mask[:, :, ::2])
        masks.pop()

        mid_mask = masks[-1]
        mid_bias = self._attention_bias(mid_mask, streaming)
        for resnet, blocks in self.mid_blocks:
            h = resnet(h, mid_mask, time)
            h = self._transformers(blocks, h, mid_bias)

        for resnet, blocks, resample in self.up_blocks:
            level_mask, skip = masks.pop(), skips.pop()
            h = torch.cat([h[:, :, :skip.shape[-1]], skip], dim=1)
            h = resnet(h, level_mask, time)
            h = self._transformers(blocks, h, self._attention_bias(level_mask, streaming))
            h = resample(h * level_mask)
        h = self.final_block(h, level_mask)
        return self.final_proj(h * level_mask) * mask

    def _runs_whole_on_native_kernels(self, x: torch.Tensor, mask: torch.Tensor) -> bool:
        """Whether a non-streaming call goes through the chunk machinery as one chunk seen
        whole: bfloat16 on a CPU where the native products run (with them it is 1.3-1.5x
        faster than the module forward on PyTorch's kernels; same computation, other
        roundings), a single-level U-Net, every frame real (no padding). float32 stays on
        the module forward, the path the parity tests check bit for bit."""
        return (x.dtype == torch.bfloat16 and x.device.type == "cpu" and self.supports_chunks
                and native_gemm() is not None and bool(mask.all()))

    def merges_chunk_runs_exactly(self) -> bool:
        """Whether a frame's velocity from a chunk run is the same bits whichever other frames
        share the run, so that a stream's consecutive finished chunks may go through the
        estimator as one run: each product then has several chunks' rows for one read of its
        weights, and there are a fraction of the calls (a 100-token hop is four 50-frame
        chunks). True on the native bfloat16 kernels, where everything is row by row: a
        product's output element sums its own row in a fixed order, the attention gives each
        query the softmax of its visible keys in the same order however queries are blocked
        (keys counted from frame 0: no left window), norms and activations are per row.
        oneDNN and PyTorch's kernels choose their blocking by the row count, so float32 (the
        path the parity tests check) and bfloat16 without the native kernels run chunk by
        chunk."""
        weight = self.final_proj.weight
        if not (self.supports_chunks and self.config.num_decoding_left_chunks < 0
                and weight.dtype == torch.bfloat16 and weight.device.type == "cpu"):
            return False
        gemm, attention = native_gemm(), native_attention()
        if gemm is None or attention is None:
            return False
        # the walk over the modules once per version of the weights (a cast makes new ones)
        key = (weight.data_ptr(), weight._version, self.config)
        memo = self.__dict__.get("_merges_exactly")
        if memo is None or memo[0] != key:
            memo = self.__dict__["_merges_exactly"] = (key, self._takes_every_layer(gemm,
                                                                                    attention))
        return memo[1]

    def _takes_every_layer(self, gemm: NativeGemm, attention: NativeAttention) -> bool:
        """Whether the native kernels take every layer that sees frames."""
        time_paths = {id(m) for r in self.modules() if isinstance(r, CausalResnetBlock)
                      for m in r.mlp.modules()} | {id(m) for m in self.time_mlp.modules()}
        for module in self.modules():
            if id(module) in time_paths:  # these see the flow time only, never frames
                continue
            if isinstance(module, nn.Conv1d | nn.Linear) \
                    and not gemm.takes(module.weight.flatten(1)):
                return False
            if isinstance(module, nn.LayerNorm) and not gemm.takes_norm(
                    module.weight.new_empty(1, module.normalized_shape[-1]), module.weight):
                return False
            if isinstance(module, SelfAttention) and module.head_dim != attention.head_dim:
                return False
        return True

    @property
    def supports_chunks(self) -> bool:
        """Whether :meth:`forward_chunk` applies (a single level: no down/upsampling)."""
        return len(self.config.channels) == 1 and self.config.static_chunk_size > 0

    def forward_chunk(self, x: torch.Tensor, mu: torch.Tensor, time: torch.Tensor,
                      spks: torch.Tensor, cond: torch.Tensor, cache: EstimatorStepCache,
                      start: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Velocity of frames start..start+r-1 of a streamed sequence: one attention chunk, maybe
        unfinished, or (start on a chunk boundary) a run of chunks computed together, each row
        attending as in its own chunk. x, mu, cond [B, 80, r]; time: :meth:`time_embedding`
        [B, time_dim].

        Attention keys/values of these frames are written into ``cache``; the causal convs' new
        left contexts are returned, for the caller to keep once the chunk is complete.
        """
        return self.forward_chunks([ChunkInput(x, mu, spks, cond, cache, start)], time)[0]

    def forward_chunks(self, parts: list[ChunkInput], time: torch.Tensor,
                       full_attention: bool = False
                       ) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        """:meth:`forward_chunk` for several requests at once (all at the same flow time, with
        the same batch size B): one estimator run over all their frames. Returns each part's
        (velocity [B, 80, r], new conv contexts). ``full_attention``: every row sees every
        key (the non-streaming estimator; parts from frame 0)."""
        if not self.supports_chunks:
            raise ValueError("flow decoder: chunk streaming needs a single-level U-Net")
        left = self.config.num_decoding_left_chunks
        chunk = self.config.static_chunk_size
        if full_attention:  # one chunk as long as the longest part, seen whole
            left, chunk = -1, max(part.start + part.rows for part in parts)
        for part in parts:
            if part.rows > chunk and part.start % chunk:
                raise ValueError("flow decoder: a run of several chunks must start on a chunk")
        run = _ChunkRun(parts, None if left < 0 else left * chunk, chunk)
        inputs = [torch.cat([p.x, p.mu, p.spks.unsqueeze(-1).expand(-1, -1, p.rows), p.cond],
                            dim=1).transpose(1, 2) for p in parts]
        h = inputs[0] if len(inputs) == 1 else torch.cat(inputs, dim=1)  # [B, T, C]
        (resnet, blocks, resample), = self.down_blocks
        h = run.resnet(resnet, h, time)
        skip = h = run.transformers(blocks, h)
        h = run.conv(resample, h)
        for resnet, blocks in self.mid_blocks:
            h = run.transformers(blocks, run.resnet(resnet, h, time))
        (resnet, blocks, resample), = self.up_blocks
        h = run.resnet(resnet, torch.cat([h, skip], dim=2), time)
        h = run.conv(resample, run.transformers(blocks, h))
        h = run.causal_block(self.final_block, h)
        velocity = linear(h, _conv_matrix(self.final_proj), self.final_proj.bias)
        return list(zip(run.split(velocity.transpose(1, 2), 2), run.new_convs, strict=True))

    def time_embedding(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[B] flow times -> the time MLP's output [B, time_dim] in ``dtype``."""
        embedded = sinusoidal_time_embedding(t.float(), self.config.in_channels)
        return self.time_mlp(embedded.to(dtype))
