"""Token encoder of the CosyVoice 2 flow: a conformer that upsamples tokens to mel frames.

Layout (module names follow the official ``flow.pt`` keys under ``encoder.``):

    embed                Linear + LayerNorm, times sqrt(E); ESPnet relative positions
    pre_lookahead_layer  conv over this and the next ``lookahead`` tokens, causal conv, residual
    encoders.*           conformer layers (relative-position self-attention + SiLU feed-forward)
    up_layer             nearest repeat x stride, causal conv
    up_embed             a second Linear + LayerNorm + sqrt(E) (input width must equal E)
    up_encoders.*        more conformer layers
    after_norm           final LayerNorm

Streaming uses static chunk masks: a position attends to its own chunk and every earlier one.
With look-ahead context (the flow's ``finalize=False`` calls) the last few tokens are only fed to
the look-ahead convolution in place of its zero padding; they produce no output frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Options of the reference encoder this implementation covers, and the value each must have.
_REQUIRED_OPTIONS = {
    "input_layer": "linear",
    "pos_enc_layer_type": "rel_pos_espnet",
    "selfattention_layer_type": "rel_selfattn",
    "activation_type": "swish",
    "normalize_before": True,
    "use_cnn_module": False,
    "macaron_style": False,
    "use_dynamic_chunk": False,
}
# Defaults of the reference constructor for keys a yaml may leave out.
_REFERENCE_DEFAULTS: dict[str, Any] = {
    "output_size": 256, "attention_heads": 4, "linear_units": 2048, "num_blocks": 6,
    "static_chunk_size": 0, "key_bias": True, "input_layer": "conv2d",
    "pos_enc_layer_type": "rel_pos", "selfattention_layer_type": "rel_selfattn",
    "activation_type": "swish", "normalize_before": True, "use_cnn_module": True,
    "macaron_style": True, "use_dynamic_chunk": False,
}


@dataclass
class FlowEncoderConfig:
    input_size: int = 512
    output_size: int = 512  # E: attention width and output width
    attention_heads: int = 8
    linear_units: int = 2048  # feed-forward inner width
    num_blocks: int = 6  # conformer layers before upsampling
    num_up_blocks: int = 4  # conformer layers after upsampling (fixed in the reference)
    lookahead: int = 3  # tokens of right context seen by the look-ahead conv
    upsample_stride: int = 2  # mel frames per token
    static_chunk_size: int = 25  # streaming chunk, in tokens (x stride after upsampling)
    key_bias: bool = True
    embed_layer_norm_eps: float = 1e-5
    block_layer_norm_eps: float = 1e-12

    def __post_init__(self) -> None:
        if self.output_size % self.attention_heads:
            raise ValueError(f"flow encoder: output_size {self.output_size} is not divisible by "
                             f"attention_heads {self.attention_heads}")
        if self.input_size != self.output_size:
            # the projection after upsampling reuses input_size but is fed E channels
            raise ValueError(f"flow encoder: input_size ({self.input_size}) must equal "
                             f"output_size ({self.output_size})")
        if self.lookahead < 1 or self.upsample_stride < 1:
            raise ValueError("flow encoder: lookahead and upsample_stride must be positive")

    @classmethod
    def from_yaml(cls, args: dict[str, Any], lookahead: int, upsample_stride: int
                  ) -> FlowEncoderConfig:
        """Build from the ``encoder`` node's arguments of ``cosyvoice2.yaml``.

        ``lookahead`` and ``upsample_stride`` come from the flow node (``pre_lookahead_len``,
        ``token_mel_ratio``): the reference encoder hard-codes them to the same values.
        """
        merged = {**_REFERENCE_DEFAULTS, **args}
        for key, wanted in _REQUIRED_OPTIONS.items():
            if merged[key] != wanted:
                raise ValueError(f"flow encoder: {key}={merged[key]!r} is not supported "
                                 f"(only {wanted!r})")
        if "input_size" not in merged:
            raise ValueError("flow encoder: the yaml gives no input_size")
        return cls(
            input_size=int(merged["input_size"]),
            output_size=int(merged["output_size"]),
            attention_heads=int(merged["attention_heads"]),
            linear_units=int(merged["linear_units"]),
            num_blocks=int(merged["num_blocks"]),
            lookahead=int(lookahead),
            upsample_stride=int(upsample_stride),
            static_chunk_size=int(merged["static_chunk_size"]),
            key_bias=bool(merged["key_bias"]),
        )


def chunk_attention_mask(size: int, chunk_size: int, left_chunks: int = -1,
                         device: torch.device | None = None) -> torch.Tensor:
    """[size, size] bool: query i may see key j when j's chunk is i's or one before it.

    ``left_chunks`` < 0 keeps every earlier chunk, otherwise only that many.
    """
    chunk = torch.arange(size, device=device) // chunk_size
    visible = chunk[None, :] <= chunk[:, None]
    if left_chunks >= 0:
        visible &= chunk[None, :] >= chunk[:, None] - left_chunks
    return visible


def relative_position_table(size: int, dim: int, device: torch.device, dtype: torch.dtype
                            ) -> torch.Tensor:
    """ESPnet sinusoids for relative positions size-1, ..., 0, ..., -(size-1): [1, 2*size-1, dim].

    Computed per call in float32 with the reference's formula (not learned, not in flow.pt).
    """
    position = torch.arange(size, dtype=torch.float32, device=device).unsqueeze(1)
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device)
                         * -(math.log(10000.0) / dim))
    positive = torch.zeros(size, dim, device=device)
    negative = torch.zeros(size, dim, device=device)
    positive[:, 0::2] = torch.sin(position * inv_freq)
    positive[:, 1::2] = torch.cos(position * inv_freq)
    negative[:, 0::2] = torch.sin(-1 * position * inv_freq)
    negative[:, 1::2] = torch.cos(-1 * position * inv_freq)
    table = torch.cat([positive.flip(0), negative[1:]], dim=0)
    return table.unsqueeze(0).to(dtype)


class LinearEmbed(nn.Module):
    """Linear + LayerNorm, scaled by sqrt(width) (relative positions are added in attention)."""

    def __init__(self, in_dim: int, out_dim: int, eps: float):
        super().__init__()
        self.out = nn.Sequential(nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim, eps=eps))
        self.scale = math.sqrt(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x) * self.scale


class RelPositionSelfAttention(nn.Module):
    """Transformer-XL style attention: content score (q + u)·k plus position score (q + v)·p."""

    def __init__(self, dim: int, heads: int, key_bias: bool):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.linear_q = nn.Linear(dim, dim)
        self.linear_k = nn.Linear(dim, dim, bias=key_bias)
        self.linear_v = nn.Linear(dim, dim)
        self.linear_out = nn.Linear(dim, dim)
        self.linear_pos = nn.Linear(dim, dim, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(heads, self.head_dim))
        self.pos_bias_v = nn.Parameter(torch.zeros(heads, self.head_dim))

    @staticmethod
    def _relative_to_absolute(scores: torch.Tensor) -> torch.Tensor:
        """[B, H, T, 2T-1] scores per relative offset -> [B, H, T, T] per key.

        Column k of the input is offset T-1-k; key j of query i has offset i-j, i.e. column
        T-1-i+j. Read that diagonal band with a strided view instead of a gather.
        """
        b, h, t, width = scores.shape
        scores = scores.contiguous()
        s_b, s_h, _, _ = scores.stride()
        return scores.as_strided((b, h, t, t), (s_b, s_h, width - 1, 1),
                                 scores.storage_offset() + t - 1)

    def forward(self, x: torch.Tensor, pos_table: torch.Tensor, mask: torch.Tensor | None
                ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.linear_q(x).view(b, t, self.heads, self.head_dim)
        k = self.linear_k(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = self.linear_v(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        p = self.linear_pos(pos_table).view(1, -1, self.heads, self.head_dim).transpose(1, 2)

        content = torch.matmul((q + self.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))
        position = torch.matmul((q + self.pos_bias_v).transpose(1, 2), p.transpose(-2, -1))
        scores = (content + self._relative_to_absolute(position)) / math.sqrt(self.head_dim)
        if mask is not None:
            hidden = ~mask
            weights = torch.softmax(scores.masked_fill(hidden, -float("inf")), dim=-1)
            weights = weights.masked_fill(hidden, 0.0)
        else:
            weights = torch.softmax(scores, dim=-1)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(b, t, self.heads * self.head_dim)
        return self.linear_out(out)

    def forward_chunk(self, x: torch.Tensor, start: int, keys: torch.Tensor,
                      values: torch.Tensor, pos: torch.Tensor, chunk: int) -> torch.Tensor:
        """Rows start..start+r-1 (one attention chunk, maybe unfinished) attending to every
        row before them and to each other; no mask needed.

        keys/values: [B, >= start+r, E] buffers holding the earlier rows (this chunk's rows are
        written into them); pos: projected relative positions, row m for offset m - (chunk-1).
        """
        b, r, _ = x.shape
        end = start + r
        heads, dim = self.heads, self.head_dim
        q = self.linear_q(x).view(b, r, heads, dim)
        keys[:, start:end] = self.linear_k(x)
        values[:, start:end] = self.linear_v(x)
        k = keys[:, :end].view(b, end, heads, dim).transpose(1, 2)
        v = values[:, :end].view(b, end, heads, dim).transpose(1, 2)
        # offsets end-1 (query end-1, key 0) down to -(r-1) (query start, key end-1)
        p = pos[chunk - r:end + chunk - 1].flip(0).view(1, -1, heads, dim).transpose(1, 2)
        content = torch.matmul((q + self.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))
        position = torch.matmul((q + self.pos_bias_v).transpose(1, 2), p.transpose(-2, -1))
        # column of (query start+a, key j) is r-1-a+j: a diagonal band read as a strided view
        position = position.contiguous()
        s_b, s_h, _, _ = position.stride()
        band = position.as_strided((b, heads, r, end), (s_b, s_h, position.shape[-1] - 1, 1),
                                   position.storage_offset() + r - 1)
        weights = torch.softmax((content + band) / math.sqrt(dim), dim=-1)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(b, r, heads * dim)
        return self.linear_out(out)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_1 = nn.Linear(dim, hidden)
        self.w_2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class ConformerLayer(nn.Module):
    """Pre-norm block: attention then feed-forward (no macaron half-step, no conv module)."""

    def __init__(self, config: FlowEncoderConfig):
        super().__init__()
        dim, eps = config.output_size, config.block_layer_norm_eps
        self.self_attn = RelPositionSelfAttention(dim, config.attention_heads, config.key_bias)
        self.feed_forward = FeedForward(dim, config.linear_units)
        self.norm_mha = nn.LayerNorm(dim, eps=eps)
        self.norm_ff = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, pos_table: torch.Tensor, mask: torch.Tensor | None
                ) -> torch.Tensor:
        x = x + self.self_attn(self.norm_mha(x), pos_table, mask)
        return x + self.feed_forward(self.norm_ff(x))

    def forward_chunk(self, x: torch.Tensor, start: int, keys: torch.Tensor,
                      values: torch.Tensor, pos: torch.Tensor, chunk: int) -> torch.Tensor:
        x = x + self.self_attn.forward_chunk(self.norm_mha(x), start, keys, values, pos, chunk)
        return x + self.feed_forward(self.norm_ff(x))


class PreLookaheadLayer(nn.Module):
    """Each token mixes in the next ``lookahead`` tokens (zeros past the end, or given context)."""

    def __init__(self, channels: int, lookahead: int, hidden: int | None = None):
        super().__init__()
        self.lookahead = lookahead
        hidden = channels if hidden is None else hidden  # CosyVoice 3 widens the inner layer
        self.conv1 = nn.Conv1d(channels, hidden, kernel_size=lookahead + 1)
        self.conv2 = nn.Conv1d(hidden, channels, kernel_size=3)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        h = x.transpose(1, 2)
        if context is None:
            h = F.pad(h, (0, self.lookahead))
        else:
            if context.shape[1] != self.lookahead:
                raise ValueError(f"look-ahead context must be {self.lookahead} tokens, "
                                 f"got {context.shape[1]}")
            h = torch.cat([h, context.transpose(1, 2)], dim=2)
        h = F.leaky_relu(self.conv1(h))
        h = self.conv2(F.pad(h, (2, 0)))  # causal: current and two previous tokens
        return h.transpose(1, 2) + x


class Upsample(nn.Module):
    """Repeat every frame ``stride`` times, then a causal conv of width 2*stride + 1."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(channels, channels, kernel_size=2 * stride + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T] -> [B, C, stride*T]
        h = F.interpolate(x, scale_factor=float(self.stride), mode="nearest")
        return self.conv(F.pad(h, (2 * self.stride, 0)))


class UpsampleConformerEncoder(nn.Module):
    def __init__(self, config: FlowEncoderConfig):
        super().__init__()
        self.config = config
        dim, eps = config.output_size, config.embed_layer_norm_eps
        self.embed = LinearEmbed(config.input_size, dim, eps)
        self.pre_lookahead_layer = PreLookaheadLayer(dim, config.lookahead)
        self.encoders = nn.ModuleList(ConformerLayer(config) for _ in range(config.num_blocks))
        self.up_layer = Upsample(dim, config.upsample_stride)
        self.up_embed = LinearEmbed(config.input_size, dim, eps)
        self.up_encoders = nn.ModuleList(ConformerLayer(config)
                                         for _ in range(config.num_up_blocks))
        self.after_norm = nn.LayerNorm(dim, eps=eps)

    def _run_layers(self, layers: nn.ModuleList, x: torch.Tensor, chunk: int | None
                    ) -> torch.Tensor:
        size = x.shape[1]
        pos_table = relative_position_table(size, x.shape[2], x.device, x.dtype)
        mask = None if chunk is None else chunk_attention_mask(size, chunk, device=x.device)
        for layer in layers:
            x = layer(x, pos_table, mask)
        return x

    def forward(self, tokens: torch.Tensor, context: torch.Tensor | None = None,
                streaming: bool = False) -> torch.Tensor:
        """Embedded tokens [B, T, input_size] (+ look-ahead context [B, lookahead, input_size])
        -> encoder output [B, stride*T, E]."""
        chunk = self.config.static_chunk_size if streaming and self.config.static_chunk_size > 0 \
            else None
        x = self.embed(tokens)
        # The context rows only get the input projection; their (relative) positions continue
        # after the tokens, which the look-ahead convolution does not use.
        ctx = None if context is None else self.embed(context)
        x = self.pre_lookahead_layer(x, ctx)
        x = self._run_layers(self.encoders, x, chunk)

        x = self.up_layer(x.transpose(1, 2)).transpose(1, 2)
        x = self.up_embed(x)
        up_chunk = None if chunk is None else chunk * self.config.upsample_stride
        x = self._run_layers(self.up_encoders, x, up_chunk)
        return self.after_norm(x)

    # --- streaming, chunk by chunk (see EncoderStreamCache) ---------------------------------

    def _embed_rows(self, x: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """Embedded rows first..last-1 of the token embeddings x [B, L, D], zeros outside
        [0, L) (the look-ahead's zero padding); computed on whole, zero-padded chunk tiles."""
        chunk, length = self.config.static_chunk_size, x.shape[1]
        tiles = []
        for tile in range(first // chunk, (last - 1) // chunk + 1):
            lo, hi = max(tile * chunk, 0), min((tile + 1) * chunk, length)
            rows = x.new_zeros(x.shape[0], chunk, x.shape[2])
            if hi > lo:
                rows[:, lo - tile * chunk:hi - tile * chunk] = x[:, lo:hi]
            embedded = self.embed(rows)
            inside = torch.arange(tile * chunk, (tile + 1) * chunk, device=x.device)
            inside = (inside >= 0) & (inside < length)
            tiles.append(embedded * inside.to(embedded.dtype)[None, :, None])
        rows = torch.cat(tiles, dim=1)
        skip = first - (first // chunk) * chunk
        return rows[:, skip:skip + last - first]

    def _position_rows(self, cache: EncoderStreamCache, index: int, attention: nn.Module,
                       chunk: int, rows: int, like: torch.Tensor) -> torch.Tensor:
        """Projected relative-position rows 0..rows-1 of one layer, extended tile by tile."""
        table = cache.pos[index]
        have = 0 if table is None else table.shape[0]
        if have < rows:
            tiles = [attention.linear_pos(_position_tile(i, chunk, like.shape[-1], like.device)
                                          .to(like.dtype))
                     for i in range(have // chunk, -(-rows // chunk))]
            table = torch.cat(([table] if table is not None else []) + tiles)
            cache.pos[index] = table
        assert table is not None
        return table

    def _layers_chunk(self, layers: nn.ModuleList, first_index: int, x: torch.Tensor,
                      start: int, chunk: int, cache: EncoderStreamCache) -> torch.Tensor:
        end = start + x.shape[1]
        for i, layer in enumerate(layers):
            index = first_index + i
            cache.keys[index] = _grow(cache.keys[index], end, x)
            cache.values[index] = _grow(cache.values[index], end, x)
            pos = self._position_rows(cache, index, layer.self_attn, chunk, end + chunk, x)
            x = layer.forward_chunk(x, start, cache.keys[index], cache.values[index], pos,
                                    chunk)
        return x

    def forward_chunks(self, x: torch.Tensor, main: int, cache: EncoderStreamCache
                       ) -> list[torch.Tensor]:
        """Streaming encoder over token embeddings x [B, L, input_size] (before ``embed``).

        Tokens main..L-1 are look-ahead context only (main = L when the input is final).
        Computes tokens cache.tokens..main-1 chunk by chunk and returns each chunk's output
        frames [B, stride*tokens, E] (the last one maybe unfinished); finished chunks are kept
        in ``cache``. Callers must keep applying row-wise layers chunk by chunk too.
        """
        config = self.config
        chunk, stride, lookahead = config.static_chunk_size, config.upsample_stride, \
            config.lookahead
        layers = len(self.encoders) + len(self.up_encoders)
        if not cache.keys:
            cache.keys, cache.values = [None] * layers, [None] * layers
            cache.pos = [None] * layers
            cache.token_layers, cache.stride = len(self.encoders), stride
        outputs = []
        for start in range(cache.tokens, main, chunk):
            end = min(start + chunk, main)
            # look-ahead conv on a fixed tile: tokens start-2 .. start+chunk+lookahead-1
            embedded = self._embed_rows(x, start - 2, start + chunk + lookahead)
            look = self.pre_lookahead_layer
            h = F.leaky_relu(look.conv1(embedded.transpose(1, 2)))
            if start == 0:  # the causal conv's zero padding
                h[:, :, :2] = 0
            h = look.conv2(h).transpose(1, 2) + embedded[:, 2:2 + chunk]
            h = self._layers_chunk(self.encoders, 0, h[:, :end - start], start, chunk, cache)

            tail = cache.tail if start == cache.tokens else outputs[-1][1]
            if tail is None:
                tail = h.new_zeros(h.shape[0], 2, h.shape[2])
            up_in = torch.cat([tail, h], dim=1)
            up = F.interpolate(up_in.transpose(1, 2), scale_factor=float(stride),
                               mode="nearest")
            up = self.up_layer.conv(up).transpose(1, 2)
            up = self._layers_chunk(self.up_encoders, len(self.encoders), self.up_embed(up),
                                    stride * start, stride * chunk, cache)
            outputs.append((self.after_norm(up), up_in[:, -2:]))
        last = outputs[-1][1] if outputs else None
        finished = cache.tokens + (main - cache.tokens) // chunk * chunk
        if outputs and finished > cache.tokens:
            # the tail of the last finished chunk: from the last output when that chunk is
            # complete, otherwise from the one before
            complete = (main - cache.tokens) % chunk == 0
            cache.tail = last if complete else outputs[-2][1]
            cache.tokens = finished
        return [frames for frames, _ in outputs]


# --- chunk-by-chunk streaming ---------------------------------------------------------------
#
# With chunk masks, the rows of a finished attention chunk never change again, so a stream can
# keep them and compute only what is new. To make the kept rows bit-identical to a recomputation,
# every op here runs on a shape that depends only on the chunk it serves, never on how much of
# the sequence a call happens to cover (CPU GEMMs round differently for different row counts):
# token embeddings and the look-ahead conv run on padded, chunk-aligned tiles, the relative
# position table is projected in chunk-sized tiles, and each chunk attends to exactly the keys
# it may see (no masked columns). The uncached streaming path is the same code from an empty
# cache, so "cached" and "uncached" are the same computation.


def _grow(buffer: torch.Tensor | None, rows: int, like: torch.Tensor, dim: int = 1
          ) -> torch.Tensor:
    """A buffer with room for ``rows`` rows along ``dim`` (contents kept; new rows undefined)."""
    have = 0 if buffer is None else buffer.shape[dim]
    if have >= rows:
        assert buffer is not None
        return buffer
    shape = list(like.shape)
    shape[dim] = max(rows, have + have // 2)  # room ahead: growing copies everything
    grown = like.new_empty(shape)
    if buffer is not None and have:
        grown.narrow(dim, 0, have).copy_(buffer)
    return grown


@dataclass
class EncoderStreamCache:
    """Per-request state of the encoder: everything about its finished chunks.

    ``keys``/``values``: per conformer layer (token layers then frame layers) a buffer
    [B, capacity, E] whose first rows are the finished rows. ``pos``: per layer the projected
    relative-position rows for offsets -(chunk-1), -(chunk-2), ... in finished tiles. ``tail``: the
    last two token rows of the token layers' output (left context of the upsampling conv).
    Only :meth:`UpsampleConformerEncoder.forward_chunks` writes to it, and only rows past the
    finished ones; tensors are otherwise replaced, never changed.
    """

    tokens: int = 0  # finished tokens (a multiple of the chunk size)
    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)
    pos: list[torch.Tensor | None] = field(default_factory=list)
    tail: torch.Tensor | None = None
    token_layers: int = 0  # the first layers count rows in tokens, the others in frames
    stride: int = 1  # frames per token

    def clone(self) -> EncoderStreamCache:
        """A cache that goes on from here, sharing this one's finished rows without copying:
        its buffers end at those rows, so its first write grows them into new memory."""
        def finished(index: int, t: torch.Tensor | None) -> torch.Tensor | None:
            rows = self.tokens * (1 if index < self.token_layers else self.stride)
            return None if t is None else t[:, :rows]
        return EncoderStreamCache(self.tokens, [finished(i, k) for i, k in enumerate(self.keys)],
                                  [finished(i, v) for i, v in enumerate(self.values)],
                                  list(self.pos), self.tail, self.token_layers, self.stride)

    def nbytes(self) -> int:
        tensors = [*self.keys, *self.values, *self.pos, self.tail]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _position_tile(index: int, chunk: int, dim: int, device: torch.device) -> torch.Tensor:
    """Sinusoids of relative offsets index*chunk - (chunk-1) ... (one tile, [chunk, dim])."""
    offset = torch.arange(chunk, dtype=torch.float32, device=device) + (index * chunk - chunk + 1)
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device)
                         * -(math.log(10000.0) / dim))
    angle = offset.unsqueeze(1) * inv_freq
    table = torch.zeros(chunk, dim, device=device)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle)
    return table
