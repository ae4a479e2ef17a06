"""One decode step of a Qwen2 backbone for many requests at once.

Decoding one token is memory-bound: each step reads every weight once, whatever the number of
rows multiplied by it. So the row-wise work of all decoding requests (norms, q/k/v projections,
attention output projection, MLP, speech head) runs as one [B, D] matrix, and only attention,
the one part that depends on each request's history, runs per request against that request's
own :class:`KVCache` (each of its own length, no padding).

The step reads the weights through the backbone's own modules (``layer.self_attn.project_qkv`` ...)
and calls them, so it keeps working when those Linear layers are cast to bfloat16 or replaced by
dynamic-int8 modules. It reproduces ``Qwen2Model.forward`` for one new position per request;
``tests/test_cv2_batching.py`` checks that against the sequential path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tts_core.cosyvoice2.qwen2 import KVCache, Qwen2Model, rotary_cos_sin


@torch.inference_mode()
def batched_decode(backbone: Qwen2Model, rows: torch.Tensor,
                   caches: Sequence[KVCache]) -> torch.Tensor:
    """Feed one input row per request; return the final hidden states [B, D].

    rows: [B, D] embeddings, row i placed after the positions of ``caches[i]``, which is
    extended in place by one position.
    """
    cfg = backbone.config
    batch = rows.shape[0]
    if batch != len(caches):
        raise ValueError(f"{batch} rows for {len(caches)} caches")
    positions = torch.tensor([len(c) for c in caches], device=rows.device)
    if int(positions.max()) + 1 > cfg.max_position_embeddings:
        raise ValueError(f"a sequence would exceed max_position_embeddings "
                         f"({cfg.max_position_embeddings})")
    dtype = backbone.embed_tokens.weight.dtype
    x = rows.to(dtype)
    cos, sin = rotary_cos_sin(positions, cfg.head_dim, cfg.rope_theta, dtype)  # [B, 1, hd]
    heads, kv_heads, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(hd)
    for layer in backbone.layers:
        attn = layer.self_attn
        qkv = attn.project_qkv(layer.input_layernorm(x)).view(batch, -1, hd)
        q, k, v = attn.rotate_qkv(qkv, cos, sin)  # [B, heads, hd]
        # the `group` query heads sharing a key/value head are `group` query rows against it
        q = q.reshape(batch, kv_heads, group, hd)
        k, v = k.unsqueeze(2), v.unsqueeze(2)  # [B, kv_heads, 1, hd]: one new position
        outs = []
        for qi, ki, vi, cache in zip(q.split(1), k.split(1), v.split(1), caches, strict=True):
            keys, values = cache.update(attn.layer_index, ki, vi)
            outs.append(F.scaled_dot_product_attention(qi, keys, values, scale=scale))
        x = x + attn.o_proj(torch.cat(outs).view(batch, heads * hd))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return backbone.norm(x)


@dataclass
class BackboneLM:
    """A speech LM as the scheduler sees it: a Qwen2 backbone plus an output head.

    ``head`` maps final hidden states [N, D] to logits [N, V] (CosyVoice 2: ``llm_decoder``).
    Log-probabilities come back in float32 whatever the backbone's precision.
    """

    backbone: Qwen2Model
    head: Callable[[torch.Tensor], torch.Tensor]
    head_dtype: torch.dtype = torch.float32

    @property
    def max_positions(self) -> int:
        return self.backbone.config.max_position_embeddings

    def new_cache(self) -> KVCache:
        return self.backbone.new_cache()

    @torch.inference_mode()
    def decode(self, rows: torch.Tensor, caches: Sequence[KVCache]) -> torch.Tensor:
        """One row per request -> float32 log-probabilities [B, V]."""
        hidden = batched_decode(self.backbone, rows, caches)
        return self.head(hidden.to(self.head_dtype)).float().log_softmax(dim=-1)

    @torch.inference_mode()
    def prefill(self, rows: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Rows [L, D] of one request after its cache -> log-probabilities [V] of the last."""
        dtype = self.backbone.embed_tokens.weight.dtype
        hidden = self.backbone(rows[None].to(dtype), cache)[0, -1]
        return self.head(hidden.to(self.head_dtype)).float().log_softmax(dim=-1)
