"""DiT velocity estimator of CosyVoice 3's flow matching (the reference's ``DiT``).

Input per frame: the noisy mel x, the prompt mel ``cond``, the token features ``mu`` and the
projected speaker vector, concatenated and projected to the model width; a causal convolutional
position embedding is added. Then ``depth`` transformer blocks with AdaLN-zero modulation by the
flow time t (shift/scale/gate for attention and feed-forward), a final modulated norm and a
projection back to the mel bins.

Two quirks of the released checkpoint are reproduced on purpose:

* rotary position embedding is applied to the full q/k projections *before* they are split into
  heads, with a table only ``dim_head`` wide, so only the first head gets positions; the others
  attend without position information (the convolutional embedding still carries order);
* streaming attention uses static chunks of ``static_chunk_size`` frames counted from frame 0 of
  the whole sequence (prompt included): frame i sees every frame before the end of its chunk.
  It is computed chunk by chunk, which also lets a stream keep the chunks it has (DiTCache).

``DiT.state_dict()`` has exactly the keys of ``decoder.estimator.*`` in the official ``flow.pt``,
including the stored rotary buffer ``rotary_embed.inv_freq``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tts_core.cosyvoice2.flow_decoder import sinusoidal_time_embedding
from tts_core.cosyvoice2.packed_linear import linear, linear_gelu, module_linear, module_weight

TIME_FREQ_DIM = 256  # width of the sinusoidal time embedding (hard-coded in the reference)
CONV_POS_KERNEL = 31
CONV_POS_GROUPS = 16
ROTARY_THETA = 10000.0
NORM_EPS = 1e-6

# reference constructor defaults, used for keys the yaml leaves out
_DIT_DEFAULTS: dict[str, Any] = {
    "depth": 8, "heads": 8, "dim_head": 64, "ff_mult": 4, "mel_dim": 80, "mu_dim": None,
    "spk_dim": None, "out_channels": None, "static_chunk_size": 50,
    "num_decoding_left_chunks": 2, "long_skip_connection": False, "dropout": 0.1,
}


@dataclass
class DiTConfig:
    """Defaults are the released Fun-CosyVoice3-0.5B values."""

    dim: int = 1024
    depth: int = 22
    heads: int = 16
    dim_head: int = 64
    ff_mult: int = 2
    mel_dim: int = 80
    mu_dim: int = 80
    spk_dim: int = 80
    static_chunk_size: int = 50  # streaming attention chunk, in mel frames

    def __post_init__(self) -> None:
        if self.dim % CONV_POS_GROUPS:
            raise ValueError(f"dit: dim {self.dim} must be a multiple of {CONV_POS_GROUPS} "
                             "(grouped position convolution)")
        if self.dim_head % 2:
            raise ValueError(f"dit: dim_head {self.dim_head} must be even (rotary pairs)")
        if self.static_chunk_size < 1:
            raise ValueError("dit: static_chunk_size must be at least 1")

    @property
    def inner_dim(self) -> int:
        return self.heads * self.dim_head

    @classmethod
    def from_yaml(cls, args: dict[str, Any]) -> DiTConfig:
        """``args``: the keyword arguments of the ``estimator: !new:...DiT`` node."""
        unknown = sorted(set(args) - set(_DIT_DEFAULTS) - {"dim"})
        if unknown:
            raise ValueError(f"dit: unknown parameters {unknown} in the yaml")
        if "dim" not in args:
            raise ValueError("dit: the yaml gives no `dim`")
        a = {**_DIT_DEFAULTS, **args}
        if a["long_skip_connection"]:
            raise ValueError("dit: long_skip_connection is not supported (CosyVoice 3 has none)")
        if a["spk_dim"] is None:
            raise ValueError("dit: spk_dim is required (CosyVoice 3 conditions on the speaker)")
        mel_dim = int(a["mel_dim"])
        if a["out_channels"] is not None and int(a["out_channels"]) != mel_dim:
            raise ValueError(f"dit: out_channels {a['out_channels']} must equal mel_dim {mel_dim}")
        # num_decoding_left_chunks is read but has no effect: the reference's forward pass
        # always lets a chunk see every earlier chunk.
        return cls(dim=int(a["dim"]), depth=int(a["depth"]), heads=int(a["heads"]),
                   dim_head=int(a["dim_head"]), ff_mult=int(a["ff_mult"]), mel_dim=mel_dim,
                   mu_dim=int(a["mu_dim"] if a["mu_dim"] is not None else mel_dim),
                   spk_dim=int(a["spk_dim"]), static_chunk_size=int(a["static_chunk_size"]))


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.time_mlp = nn.Sequential(nn.Linear(TIME_FREQ_DIM, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # [B] -> [B, dim]
        # The solver keeps t in float32 whatever the model's dtype (see flow_matching).
        embedded = sinusoidal_time_embedding(t.float(), TIME_FREQ_DIM)
        return self.time_mlp(embedded.to(self.time_mlp[0].weight.dtype))


class CausalConvPositionEmbedding(nn.Module):
    """Two grouped convs with Mish, each padded on the left only (no look-ahead)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv1d(dim, dim, CONV_POS_KERNEL, groups=CONV_POS_GROUPS),
                                   nn.Mish())
        self.conv2 = nn.Sequential(nn.Conv1d(dim, dim, CONV_POS_KERNEL, groups=CONV_POS_GROUPS),
                                   nn.Mish())

    def forward(self, x: torch.Tensor, context: ConvContext | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> (embedding [B, T, D], first conv's output [B, T, D]).

        ``context``: the inputs and first-conv outputs of the CONV_POS_KERNEL − 1 frames before
        x; None at the start of the sequence (zero padding).
        """
        pad = CONV_POS_KERNEL - 1
        h = x.transpose(1, 2)
        h = F.pad(h, (pad, 0)) if context is None else torch.cat([context.inputs, h], dim=2)
        mid = self.conv1(h)
        h = F.pad(mid, (pad, 0)) if context is None else torch.cat([context.mid, mid], dim=2)
        return self.conv2(h).transpose(1, 2), mid.transpose(1, 2)


@dataclass
class ConvContext:
    """The last CONV_POS_KERNEL − 1 frames before a chunk, channel-first [B, D, frames]."""

    inputs: torch.Tensor  # input projections
    mid: torch.Tensor  # first-conv outputs

    def extend(self, inputs: torch.Tensor, mid: torch.Tensor) -> ConvContext:
        """The context after frames with these input projections / first-conv outputs
        [B, T, D]."""
        keep = CONV_POS_KERNEL - 1
        return ConvContext(torch.cat([self.inputs, inputs.transpose(1, 2)], dim=2)[:, :, -keep:],
                           torch.cat([self.mid, mid.transpose(1, 2)], dim=2)[:, :, -keep:])


class InputEmbedding(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        c = config
        self.proj = nn.Linear(2 * c.mel_dim + c.mu_dim + c.spk_dim, c.dim)
        self.conv_pos_embed = CausalConvPositionEmbedding(c.dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mu: torch.Tensor,
                spks: torch.Tensor, context: ConvContext | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Frame-major x, cond [B, T, mel], mu [B, T, mu_dim]; spks [B, spk] ->
        (h [B, T, dim], input projection, first position conv's output); the last two make the
        next chunk's context."""
        spks = spks[:, None, :].expand(-1, x.shape[1], -1)
        proj = self.proj(torch.cat([x, cond, mu, spks], dim=-1))
        pos, mid = self.conv_pos_embed(proj, context)
        return pos + proj, proj, mid


class RotaryEmbedding(nn.Module):
    """Rotary angles for one head's width; ``inv_freq`` is stored in the checkpoint."""

    def __init__(self, dim_head: int):
        super().__init__()
        exponent = torch.arange(0, dim_head, 2).float() / dim_head
        self.register_buffer("inv_freq", 1.0 / ROTARY_THETA ** exponent)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> (cos, sin) [T, dim_head], each angle repeated for its pair."""
        angles = positions.to(self.inv_freq.dtype)[:, None] * self.inv_freq[None, :]
        angles = angles.repeat_interleave(2, dim=-1)  # (f0, f0, f1, f1, ...)
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (a, b) -> (a cos − b sin, b cos + a sin) of the first
    ``cos.shape[-1]`` channels of x [B, T, C]; the rest pass unchanged."""
    width = cos.shape[-1]
    rot, rest = x[..., :width], x[..., width:]
    a, b = rot.unflatten(-1, (-1, 2)).unbind(-1)
    rotated_half = torch.stack((-b, a), dim=-1).flatten(-2)
    return torch.cat([rot * cos + rotated_half * sin, rest], dim=-1)


class Attention(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.heads, self.dim_head = config.heads, config.dim_head
        inner = config.inner_dim
        self.to_q = nn.Linear(config.dim, inner)
        self.to_k = nn.Linear(config.dim, inner)
        self.to_v = nn.Linear(config.dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, config.dim)])  # .1 was a dropout

    def project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> q, k, v [B, heads, T, dim_head]; rotary on the unsplit q and k, as
        trained (so only head 0 is rotated)."""
        cos, sin = rope
        # module_linear: on a CPU, bfloat16 weights laid out once for the matrix kernels (the
        # plain F.linear reorders them on every call; packed_linear); float32 is unchanged.
        q = apply_rotary(module_linear(self.to_q, x), cos, sin)
        k = apply_rotary(module_linear(self.to_k, x), cos, sin)
        v = module_linear(self.to_v, x)
        b, t, _ = x.shape
        return tuple(h.view(b, t, self.heads, self.dim_head).transpose(1, 2) for h in (q, k, v))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
        """q [B, H, Tq, d], k/v [B, H, Tk, d], bool mask [B, 1, Tq, Tk] -> [B, Tq, D]."""
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        b, _, t, _ = out.shape
        return module_linear(self.to_out[0],
                             out.transpose(1, 2).reshape(b, t, self.heads * self.dim_head))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int):
        super().__init__()
        inner = dim * mult
        # keys ff.0.0 / ff.2 as in the checkpoint (ff.1 was a dropout)
        self.ff = nn.Sequential(nn.Sequential(nn.Linear(dim, inner), nn.GELU(approximate="tanh")),
                                nn.Identity(), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, down = self.ff[0][0], self.ff[2]
        # the GELU on the product's float32 sums where the weight is packed (one rounding)
        hidden = linear_gelu(x, module_weight(up), up.bias, "tanh")
        return linear(hidden, module_weight(down), down.bias)


class AdaLayerNormZero(nn.Module):
    """Linear(SiLU(t)) -> the block's 6 modulation vectors."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, t_emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # shift_attn, scale_attn, gate_attn, shift_ff, scale_ff, gate_ff, each [B, 1, D]
        return tuple(e[:, None] for e in self.linear(F.silu(t_emb)).chunk(6, dim=1))


class AdaLayerNormZeroFinal(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def modulation(self, t_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift), each [B, 1, D]."""
        scale, shift = self.linear(F.silu(t_emb)).chunk(2, dim=1)  # scale first, then shift
        return scale[:, None], shift[:, None]

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor | None,
                modulation: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        scale, shift = modulation or self.modulation(t_emb)
        return _layer_norm(x) * (1 + scale) + shift


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=NORM_EPS)


class DiTBlock(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.attn_norm = AdaLayerNormZero(config.dim)
        self.attn = Attention(config)
        self.ff = FeedForward(config.dim, config.ff_mult)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor | None,
                rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None = None,
                past: tuple[torch.Tensor, torch.Tensor] | None = None,
                modulation: tuple[torch.Tensor, ...] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> (x, keys, values [B, heads, frames, dim_head]).

        ``past``: keys/values of earlier frames that x's frames also attend to; the returned
        keys/values are ``past``'s followed by x's frames'. ``modulation``: ``attn_norm(t_emb)``
        when the caller has it already (see DiT._modulations)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = modulation or self.attn_norm(t_emb)
        q, k, v = self.attn.project(_layer_norm(x) * (1 + scale1) + shift1, rope)
        keys, values = (k, v) if past is None else (torch.cat([past[0], k], dim=2),
                                                    torch.cat([past[1], v], dim=2))
        x = x + gate1 * self.attn.attend(q, keys, values, mask)
        return x + gate2 * self.ff(_layer_norm(x) * (1 + scale2) + shift2), keys, values


Modulations = tuple[list[tuple[torch.Tensor, ...]], tuple[torch.Tensor, torch.Tensor]]


class ModulationCache:
    """The DiT's modulations per timestep (DiT._modulations), the most recently used
    ``MODULATION_CACHE_SIZE`` of them. A copied or pickled model starts with an empty one."""

    def __init__(self) -> None:
        self._entries: OrderedDict[tuple, Modulations] = OrderedDict()
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple:
        return (ModulationCache, ())

    def get(self, key: tuple) -> Modulations | None:
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
            return found

    def put(self, key: tuple, value: Modulations) -> None:
        with self._lock:
            self._entries[key] = value
            while len(self._entries) > MODULATION_CACHE_SIZE:
                self._entries.popitem(last=False)


# (timestep, rows) pairs a DiT keeps modulations for: the solver's 10 steps at the few row
# counts of packed runs (2 per stream). 2.2 MB an entry at 8 rows, full size, bfloat16.
MODULATION_CACHE_SIZE = 48


@dataclass
class DiTCache:
    """What the complete chunks so far leave to later chunks, for one Euler step of one request:
    every block's keys and values [B, heads, frames, dim_head] and the position convolutions'
    context. Only complete chunks are kept: a partial last chunk is recomputed once it grows."""

    frames: int = 0
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    context: ConvContext | None = None
    # stop growing past this many frames (memory bound; later chunks are then recomputed)
    max_frames: int | None = None


class DiT(nn.Module):
    """``forward(x, mask, mu, t, spks, cond, streaming)`` -> velocity [B, mel_dim, T].

    Full attention (streaming=False) is one pass over all frames. Chunk-masked attention
    (streaming=True) is computed chunk by chunk, each chunk attending to the keys/values of the
    earlier ones, which is what the mask allows; given a :class:`DiTCache` the chunks it holds
    are not recomputed. Every chunk is computed with the same operations and shapes whether it
    comes from the cache or not, so a cached call gives the same bits as an uncached one (and
    float32 rounding differences of order 1e-7 from a one-pass masked computation, whose matrix
    products have other shapes).
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        self.time_embed = TimestepEmbedding(config.dim)
        self.input_embed = InputEmbedding(config)
        self.rotary_embed = RotaryEmbedding(config.dim_head)
        self.transformer_blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.depth))
        self.norm_out = AdaLayerNormZeroFinal(config.dim)
        self.proj_out = nn.Linear(config.dim, config.mel_dim)
        self.modulation_cache = ModulationCache()

    def _modulations(self, t: torch.Tensor) -> Modulations:
        """Every block's ``attn_norm`` modulation and the final norm's, for timesteps t [B].

        They depend on t alone. On a CPU, where every row has the same t (every call of the
        solver), they are kept per value and number of rows: every chunk of every stream
        repeats the solver's few timesteps, and these 23 products read 280 MB of bfloat16
        weights (full size) for a few rows (1.3 of 7 s of a CosyVoice 3 stream on 2 cores).
        They are computed as without the cache, so it changes no output. Not kept where
        autograd records (a kept one would cut the adaLN weights out of the graph)."""
        one = t.device.type == "cpu" and not torch.is_grad_enabled() \
            and bool((t == t[:1]).all())
        weight = self.norm_out.linear.weight
        # (an in-place reload of the weights bumps their version; inference tensors keep none)
        version = 0 if weight.is_inference() else weight._version
        key = (float(t[0]), t.shape[0], t.dtype, weight.dtype, weight.data_ptr(), version) \
            if one else None
        found = self.modulation_cache.get(key) if one else None
        if found is not None:
            return found
        t_emb = self.time_embed(t)
        made = ([block.attn_norm(t_emb) for block in self.transformer_blocks],
                self.norm_out.modulation(t_emb))
        if one:
            self.modulation_cache.put(key, made)
        return made

    def forward(self, x: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, t: torch.Tensor,
                spks: torch.Tensor, cond: torch.Tensor, streaming: bool = False,
                cache: DiTCache | None = None) -> torch.Tensor:
        """x, mu, cond [B, mel, T] (channel-first, as the flow matching passes them); mask
        [B, 1, T] (padding; not used when streaming: one utterance per batch row); t [B];
        spks [B, spk_dim].

        streaming with ``cache``: x, mu and cond hold only the frames from ``cache.frames`` on;
        the cache is extended by the complete chunks computed.
        """
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if streaming:
            return self._forward_chunks(x, mu, t, spks, cond, cache or DiTCache())
        blocks, final = self._modulations(t)
        h, _, _ = self.input_embed(x.transpose(1, 2), cond.transpose(1, 2), mu.transpose(1, 2),
                                   spks)
        rope = self.rotary_embed(torch.arange(h.shape[1], device=h.device))
        attn_mask = mask.bool()[:, :, None, :].expand(-1, -1, h.shape[1], -1)  # [B, 1, T, T]
        for block, modulation in zip(self.transformer_blocks, blocks, strict=True):
            h, _, _ = block(h, None, rope, attn_mask, modulation=modulation)
        return self.proj_out(self.norm_out(h, None, final)).transpose(1, 2)

    def _forward_chunks(self, x: torch.Tensor, mu: torch.Tensor, t: torch.Tensor,
                        spks: torch.Tensor, cond: torch.Tensor, cache: DiTCache) -> torch.Tensor:
        chunk = self.config.static_chunk_size
        start, total = cache.frames, cache.frames + x.shape[2]
        if start % chunk:
            raise ValueError(f"dit: a stream cache must end on a chunk boundary, got {start}")
        blocks, final = self._modulations(t)
        x, mu, cond = x.transpose(1, 2), mu.transpose(1, 2), cond.transpose(1, 2)
        # what the chunks so far leave to the next one: the cache's, then this call's
        done = DiTCache(cache.frames, cache.keys, cache.values, cache.context or ConvContext(
            x.new_zeros(x.shape[0], self.config.dim, CONV_POS_KERNEL - 1),
            x.new_zeros(x.shape[0], self.config.dim, CONV_POS_KERNEL - 1)))
        outputs = []
        for c0 in range(start, total, chunk):  # chunks start at multiples of `chunk` frames
            c1 = min(c0 + chunk, total)
            rows = slice(c0 - start, c1 - start)
            h, proj, mid = self.input_embed(x[:, rows], cond[:, rows], mu[:, rows], spks,
                                            done.context)
            rope = self.rotary_embed(torch.arange(c0, c1, device=x.device))
            fresh = []
            for i, block in enumerate(self.transformer_blocks):
                past = (done.keys[i], done.values[i]) if done.frames else None
                h, keys, values = block(h, None, rope, past=past, modulation=blocks[i])
                fresh.append((keys, values))
            outputs.append(self.proj_out(self.norm_out(h, None, final)))
            if c1 - c0 == chunk:  # complete: later chunks (and calls) attend to it
                done = DiTCache(c1, [k for k, _ in fresh], [v for _, v in fresh],
                                done.context.extend(proj, mid))
                if cache.max_frames is None or c1 <= cache.max_frames:
                    cache.frames, cache.keys, cache.values, cache.context = \
                        done.frames, done.keys, done.values, done.context
        return torch.cat(outputs, dim=1).transpose(1, 2)
