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

``DiT.state_dict()`` has exactly the keys of ``decoder.estimator.*`` in the official ``flow.pt``,
including the stored rotary buffer ``rotary_embed.inv_freq``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tts_core.cosyvoice2.flow_decoder import sinusoidal_time_embedding
from tts_core.cosyvoice2.flow_encoder import chunk_attention_mask

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
        return self.time_mlp(sinusoidal_time_embedding(t, TIME_FREQ_DIM))


class CausalConvPositionEmbedding(nn.Module):
    """Two grouped convs with Mish, each padded on the left only (no look-ahead)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv1d(dim, dim, CONV_POS_KERNEL, groups=CONV_POS_GROUPS),
                                   nn.Mish())
        self.conv2 = nn.Sequential(nn.Conv1d(dim, dim, CONV_POS_KERNEL, groups=CONV_POS_GROUPS),
                                   nn.Mish())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, T, D]
        h = x.transpose(1, 2)
        h = self.conv1(F.pad(h, (CONV_POS_KERNEL - 1, 0)))
        h = self.conv2(F.pad(h, (CONV_POS_KERNEL - 1, 0)))
        return h.transpose(1, 2)


class InputEmbedding(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        c = config
        self.proj = nn.Linear(2 * c.mel_dim + c.mu_dim + c.spk_dim, c.dim)
        self.conv_pos_embed = CausalConvPositionEmbedding(c.dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mu: torch.Tensor,
                spks: torch.Tensor) -> torch.Tensor:
        """Frame-major x, cond [B, T, mel], mu [B, T, mu_dim]; spks [B, spk] -> [B, T, dim]."""
        spks = spks[:, None, :].expand(-1, x.shape[1], -1)
        h = self.proj(torch.cat([x, cond, mu, spks], dim=-1))
        return self.conv_pos_embed(h) + h


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
        q = apply_rotary(self.to_q(x), cos, sin)
        k = apply_rotary(self.to_k(x), cos, sin)
        v = self.to_v(x)
        b, t, _ = x.shape
        return tuple(h.view(b, t, self.heads, self.dim_head).transpose(1, 2) for h in (q, k, v))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
        """q [B, H, Tq, d], k/v [B, H, Tk, d], bool mask [B, 1, Tq, Tk] -> [B, Tq, D]."""
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        b, _, t, _ = out.shape
        return self.to_out[0](out.transpose(1, 2).reshape(b, t, self.heads * self.dim_head))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int):
        super().__init__()
        inner = dim * mult
        # keys ff.0.0 / ff.2 as in the checkpoint (ff.1 was a dropout)
        self.ff = nn.Sequential(nn.Sequential(nn.Linear(dim, inner), nn.GELU(approximate="tanh")),
                                nn.Identity(), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff(x)


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

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(t_emb)).chunk(2, dim=1)  # scale first, then shift
        return _layer_norm(x) * (1 + scale)[:, None] + shift[:, None]


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=NORM_EPS)


class DiTBlock(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.attn_norm = AdaLayerNormZero(config.dim)
        self.attn = Attention(config)
        self.ff = FeedForward(config.dim, config.ff_mult)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor, mask: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.attn_norm(t_emb)
        q, k, v = self.attn.project(_layer_norm(x) * (1 + scale1) + shift1, rope)
        x = x + gate1 * self.attn.attend(q, k, v, mask)
        return x + gate2 * self.ff(_layer_norm(x) * (1 + scale2) + shift2)


class DiT(nn.Module):
    """``forward(x, mask, mu, t, spks, cond, streaming)`` -> velocity [B, mel_dim, T]."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        self.time_embed = TimestepEmbedding(config.dim)
        self.input_embed = InputEmbedding(config)
        self.rotary_embed = RotaryEmbedding(config.dim_head)
        self.transformer_blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.depth))
        self.norm_out = AdaLayerNormZeroFinal(config.dim)
        self.proj_out = nn.Linear(config.dim, config.mel_dim)

    def attention_mask(self, mask: torch.Tensor, streaming: bool) -> torch.Tensor:
        """Padding mask [B, 1, T] -> bool [B, 1, T, T] (query, key)."""
        frames = mask.shape[-1]
        keys = mask.bool()[:, :, None, :]  # [B, 1, 1, T]
        if not streaming:
            return keys.expand(-1, -1, frames, -1)
        chunks = chunk_attention_mask(frames, self.config.static_chunk_size, device=mask.device)
        return keys & chunks

    def forward(self, x: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, t: torch.Tensor,
                spks: torch.Tensor, cond: torch.Tensor, streaming: bool = False) -> torch.Tensor:
        """x, mu, cond [B, mel, T] (channel-first, as the flow matching passes them); mask
        [B, 1, T]; t [B]; spks [B, spk_dim]."""
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        t_emb = self.time_embed(t)
        h = self.input_embed(x.transpose(1, 2), cond.transpose(1, 2), mu.transpose(1, 2), spks)
        rope = self.rotary_embed(torch.arange(h.shape[1], device=h.device))
        attn_mask = self.attention_mask(mask, streaming)
        for block in self.transformer_blocks:
            h = block(h, t_emb, attn_mask, rope)
        return self.proj_out(self.norm_out(h, t_emb)).transpose(1, 2)
