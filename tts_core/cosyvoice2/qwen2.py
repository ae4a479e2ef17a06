"""A Qwen2 decoder-only transformer, the backbone of the CosyVoice 2 language model.

Written from the architecture description (pre-norm RMSNorm blocks, rotary positions in the
"rotate half" layout, grouped-query attention with q/k/v biases, SiLU-gated MLP). Parameter names
follow the Hugging Face layout so that the official checkpoint loads unchanged:
``model.layers.N.self_attn.q_proj.weight`` ... ``model.norm.weight``, ``lm_head.weight``.

The key/value cache is a separate :class:`KVCache` object owned by one request; the modules hold
no per-request state, so one model can serve several requests from several threads.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tts_core import cancellation


@dataclass(frozen=True)
class Qwen2Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 32768

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> Qwen2Config:
        """Read a Hugging Face ``config.json`` (as a dict) of a Qwen2 model."""
        model_type = d.get("model_type", "qwen2")
        if model_type != "qwen2":
            raise ValueError(f"expected a Qwen2 config (model_type 'qwen2'), got {model_type!r}")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"only hidden_act 'silu' is supported, got {act!r}")
        if d.get("rope_scaling"):
            raise ValueError(f"rope_scaling is not supported: {d['rope_scaling']!r}")
        if d.get("use_sliding_window", False):
            # Released CosyVoice 2 backbones leave it off; a window would change attention.
            raise ValueError("use_sliding_window=true is not supported")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                               "num_hidden_layers", "num_attention_heads") if k not in d]
        if missing:
            raise ValueError(f"Qwen2 config.json lacks {', '.join(missing)}")
        heads = int(d["num_attention_heads"])
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or int(d["hidden_size"]) // heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(d.get("rope_theta", 10000.0)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
        )


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 whatever the activation dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        # eps as a float32 tensor (per device, made on first use; not a buffer, so that
        # module.to(bfloat16) leaves it exact): adding the Python float instead wraps it into a
        # new tensor on every call, which costs about as much as the addition itself.
        self._eps_tensor: torch.Tensor | None = None

    def _eps(self, device: torch.device) -> torch.Tensor:
        eps = self._eps_tensor
        if eps is None or eps.device != device:
            eps = self._eps_tensor = torch.tensor(self.eps, dtype=torch.float32, device=device)
        return eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The same float32 arithmetic as x * rsqrt(x.pow(2).mean() + eps), in fewer calls: a
        # decode step runs 49 norms on one row each, where the per-call cost is all there is.
        h = x if x.dtype == torch.float32 else x.float()
        h = h * (h * h).mean(-1, keepdim=True).add_(self._eps(h.device)).rsqrt_()
        if x.dtype != torch.float32:
            h = h.to(x.dtype)  # reduced precision: round, then scale by the weight (as HF does)
        return self.weight * h


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin tables [N, 1, head_dim] for N integer positions (see
    :func:`apply_rotary`); the middle axis broadcasts over heads.

    Computed in float32 on every call rather than kept as a buffer: ``module.to(bfloat16)`` would
    otherwise round the frequencies, and positions of a few thousand need them exact.
    """
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.int64)
    inv_freq = 1.0 / (theta ** (exponents.float() / head_dim))
    angles = positions.float()[:, None, None] * inv_freq  # both halves share the frequencies
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., head_dim] in the "rotate half" layout by tables from
    :func:`rotary_cos_sin`.

    HF computes ``x * cos + cat(-x2, x1) * sin``; with the first half of ``sin`` negated that is
    ``x * cos + cat(x2, x1) * sin``, bit for bit, and the swap is one ``roll`` instead of a
    chunk, a negation and a concatenation.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class KVSlab:
    """Key/value storage for up to ``slots`` requests: per layer one tensor [slots, kv_heads,
    capacity, head_dim], so that a decode step of many requests writes all their new keys with
    one call per layer and reads all their caches with another (see
    ``tts_core.batching.lm_batch``), where per-request caches take a few calls per request and
    layer. On a GPU, where each call costs its launch whatever its size, that is most of a
    batched decode step's time.

    A :class:`KVCache` made with a slab takes a free slot (none free: it keeps storage of its
    own) and gives it back when it is garbage; a request outgrowing ``capacity`` positions
    moves its rows to storage of its own. Zero-filled, so that rows past a request's length,
    which a batched step masks out, are always finite (a NaN there would survive the mask).
    """

    def __init__(self, num_layers: int, slots: int, kv_heads: int, capacity: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str) -> None:
        # One slot more than handed out: ``scratch``, where the padding rows of a batched step
        # (lm_batch pads the row count; a CUDA graph has a fixed one) write what nobody reads.
        shape = (num_layers, slots + 1, kv_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.scratch = slots
        self._free = list(range(slots - 1, -1, -1))
        self._lock = threading.Lock()

    def take(self) -> int | None:
        with self._lock:
            return self._free.pop() if self._free else None

    def give_back(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)

    def free_slots(self) -> int:
        with self._lock:
            return len(self._free)


class KVCache:
    """Keys and values of every layer for one request, grown in place.

    Storage is over-allocated (doubling) so a decode step writes into a slice instead of
    concatenating the whole history again; or, made with a :class:`KVSlab`, it is the request's
    slot of the slab until it outgrows it.
    """

    def __init__(self, num_layers: int, slab: KVSlab | None = None) -> None:
        self._keys: list[torch.Tensor | None] = [None] * num_layers
        self._values: list[torch.Tensor | None] = [None] * num_layers
        self._lengths = [0] * num_layers
        self.slab: KVSlab | None = None
        self.slot = -1
        if slab is not None:
            slot = slab.take()
            if slot is not None:
                self.slab, self.slot = slab, slot
                self._keys = [slab.keys[layer, slot:slot + 1] for layer in range(num_layers)]
                self._values = [slab.values[layer, slot:slot + 1] for layer in range(num_layers)]
                self._release = weakref.finalize(self, slab.give_back, slot)

    def __len__(self) -> int:
        """Number of cached positions (the position index of the next input)."""
        return self._lengths[0]

    def clone(self) -> KVCache:
        """An independent copy with the same storage layout (capacity included), so a request
        continuing from the copy computes exactly what it would from the original. (A copy of
        a slab cache has storage of its own, of the slot's shape.)"""
        copy = KVCache(len(self._keys))
        copy._keys = [None if k is None else k.clone() for k in self._keys]
        copy._values = [None if v is None else v.clone() for v in self._values]
        copy._lengths = list(self._lengths)
        return copy

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self._keys, *self._values)
                   if t is not None)

    def _leave_slab(self) -> None:
        """Move every layer's rows to storage of its own and give the slot back."""
        self._keys = [k.clone() for k in self._keys]  # type: ignore[union-attr]
        self._values = [v.clone() for v in self._values]  # type: ignore[union-attr]
        self.slab, self.slot = None, -1
        self._release()

    def advance(self) -> None:
        """Count one more position on every layer of a slab cache (a batched decode step writes
        its keys and values into the slab itself, at ``len(cache)`` before this call). The
        caller checks first that the slot has room (``len(cache) < slab.capacity``)."""
        assert self.slab is not None and len(self) < self.slab.capacity
        self._lengths = [n + 1 for n in self._lengths]

    def _reserve(self, layer: int, end: int, like: torch.Tensor, shape: tuple[int, int, int]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's key and value storage with room for ``end`` positions (grown by
        doubling, the cached ones copied over); ``shape``: (batch, kv heads, head_dim)."""
        if self.slab is not None and end > self.slab.capacity:
            self._leave_slab()
        keys, values = self._keys[layer], self._values[layer]
        if keys is None or values is None or end > keys.shape[2]:
            capacity = max(end, 2 * (keys.shape[2] if keys is not None else 0), 64)
            batch, heads, head_dim = shape
            new_keys = like.new_empty((batch, heads, capacity, head_dim))
            new_values = like.new_empty((batch, heads, capacity, head_dim))
            start = self._lengths[layer]
            if keys is not None and values is not None:
                new_keys[:, :, :start] = keys[:, :, :start]
                new_values[:, :, :start] = values[:, :, :start]
            keys, values = new_keys, new_values
            self._keys[layer], self._values[layer] = keys, values
        return keys, values

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k/v [B, Hkv, L, hd] of one layer; return all cached k/v of that layer."""
        start = self._lengths[layer]
        end = start + k.shape[2]
        keys, values = self._reserve(layer, end, k, (k.shape[0], k.shape[1], k.shape[3]))
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        self._lengths[layer] = end
        return keys[:, :, :end], values[:, :, :end]

    def claim(self, layer: int, like: torch.Tensor, kv_heads: int, head_dim: int
              ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Room for one more position of ``layer`` (batch 1), counted as cached from now on:
        the storage [1, kv_heads, capacity, head_dim] of keys and of values and the index the
        caller writes the new key and value at (a native decode step writes them itself)."""
        start = self._lengths[layer]
        keys, values = self._reserve(layer, start + 1, like, (1, kv_heads, head_dim))
        self._lengths[layer] = start + 1
        return keys, values, start


class Qwen2Attention(nn.Module):
    def __init__(self, cfg: Qwen2Config, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        # Set by fuse_projections (below): q, k and v as one matrix, so that a decode step
        # reads them in one kernel call (q_proj, k_proj and v_proj are then removed).
        self.qkv_proj: nn.Module | None = None

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """q, k and v heads of rows x [..., D], side by side: [..., (heads + 2 kv_heads) *
        head_dim] (the fused layer's output as it is)."""
        if self.qkv_proj is None:
            return torch.cat((self.q_proj(x), self.k_proj(x), self.v_proj(x)), dim=-1)
        return self.qkv_proj(x)

    def rotate_qkv(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Split projected heads [..., heads + 2 kv_heads, head_dim] into q, k, v (same layout,
        views) with q and k rotated.

        q and k are adjacent heads, so one rotation covers both.
        """
        rotated = apply_rotary(qkv[..., :self.num_heads + self.num_kv_heads, :], cos, sin)
        return (rotated[..., :self.num_heads, :], rotated[..., self.num_heads:, :],
                qkv[..., self.num_heads + self.num_kv_heads:, :])

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None, mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, _ = x.shape
        qkv = self.project_qkv(x).view(batch, length, -1, self.head_dim)
        q, k, v = self.rotate_qkv(qkv, cos, sin)  # [B, L, heads, hd]
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)
        group = self.num_heads // self.num_kv_heads
        scale = 1.0 / math.sqrt(self.head_dim)
        if length == 1 and group > 1:
            # One new position: the `group` query heads sharing a key/value head become `group`
            # query rows against that head, so the cache is read without being copied.
            q = q.reshape(batch, self.num_kv_heads, group, self.head_dim)
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
            out = out.reshape(batch, 1, self.num_heads * self.head_dim)
            return self.o_proj(out)
        q = q.transpose(1, 2)
        if group > 1:  # every query head of a group reads the same key/value head
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        # No mask needed for one query (it sees everything cached) or for a causal block
        # starting at position 0; otherwise the explicit mask offsets causality by the cache.
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and length > 1, scale=scale)
        out = out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        return self.o_proj(out)


class Qwen2MLP(nn.Module):
    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        # Set by fuse_projections: gate and up as one matrix (see Qwen2Attention).
        self.gate_up_proj: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen2Config, layer_index: int) -> None:
        super().__init__()
        self.self_attn = Qwen2Attention(cfg, layer_index)
        self.mlp = Qwen2MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    """Token embedding, decoder stack and final norm (HF ``Qwen2Model``)."""

    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            Qwen2DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def new_cache(self, slab: KVSlab | None = None) -> KVCache:
        return KVCache(self.config.num_hidden_layers, slab)

    def new_slab(self, slots: int, capacity: int) -> KVSlab:
        """A :class:`KVSlab` for this stack's keys/values (its weights' dtype and device)."""
        cfg, weight = self.config, self.embed_tokens.weight
        return KVSlab(cfg.num_hidden_layers, slots, cfg.num_key_value_heads, capacity,
                      cfg.head_dim, weight.dtype, weight.device)

    def forward(self, inputs_embeds: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Run the stack on embeddings [B, L, D] placed after the cached positions.

        Returns the final hidden states [B, L, D] (after the last RMSNorm). ``cache`` is extended
        in place by the L new positions.
        """
        length = inputs_embeds.shape[1]
        past = len(cache) if cache is not None else 0
        if past + length > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {past + length} positions exceeds max_position_embeddings "
                f"({self.config.max_position_embeddings})")
        device = inputs_embeds.device
        positions = torch.arange(past, past + length, device=device)
        cos, sin = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta,
                                  inputs_embeds.dtype)
        if length == 1 and inputs_embeds.shape[0] == 1 and cache is not None:
            # imported here: native_decode reads this module's classes (and weight_quant's)
            from tts_core.cosyvoice2.native_decode import native_decoder
            native = native_decoder(self, 1)
            if native is not None:  # a decode step of an int8 stack: one call per layer
                x = native.forward(inputs_embeds[0], cos, sin, [cache])
                return self.norm(x.to(inputs_embeds.dtype))[None]
        mask = None
        if past > 0 and length > 1:  # query i (at position past+i) sees keys 0..past+i
            keys = torch.arange(past + length, device=device)
            mask = keys[None, :] <= positions[:, None]
        x = inputs_embeds
        for layer in self.layers:
            cancellation.check()  # one LM step is 24 layers: a hang-up stops at the next one
            x = layer(x, cos, sin, cache, mask)
        return self.norm(x)


class Qwen2ForCausalLM(nn.Module):
    """:class:`Qwen2Model` plus the text LM head (tied to the embedding when configured).

    CosyVoice 2 never uses the text head, but the checkpoint carries it, so it exists for the
    key layout.
    """

    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.model = Qwen2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, inputs_embeds: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Text logits [B, L, vocab] (not used by CosyVoice 2)."""
        return self.lm_head(self.model(inputs_embeds, cache))


def concat_linears(linears: list[nn.Linear]) -> nn.Linear:
    """One Linear whose output is the outputs of ``linears`` (same input) side by side."""
    weight = torch.cat([m.weight.detach() for m in linears])
    with_bias = [m.bias is not None for m in linears]
    if any(with_bias) and not all(with_bias):
        raise ValueError("cannot concatenate Linear layers with and without bias")
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=all(with_bias),
                      dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        fused.weight.copy_(weight)
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([m.bias.detach() for m in linears]))
    return fused


def fuse_projections(layers: nn.ModuleList, make: Callable[[nn.Linear], nn.Module]) -> None:
    """Replace every Linear of the decoder layers by ``make(linear)``, q/k/v and gate/up first
    fused into one Linear each (``qkv_proj``, ``gate_up_proj``): one kernel call where there
    were three and two (weight-only int8 and packed bfloat16 layers both use it)."""
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj = make(concat_linears([attn.q_proj, attn.k_proj, attn.v_proj]))
        del attn.q_proj, attn.k_proj, attn.v_proj
        attn.o_proj = make(attn.o_proj)
        mlp.gate_up_proj = make(concat_linears([mlp.gate_proj, mlp.up_proj]))
        del mlp.gate_proj, mlp.up_proj
        mlp.down_proj = make(mlp.down_proj)
