"""Steps of a Qwen2 backbone for many requests at once: a decode step, or prompts.

Decoding one token is memory-bound: each step reads every weight once, whatever the number of
rows multiplied by it. So the row-wise work of all decoding requests (norms, q/k/v projections,
attention output projection, MLP, speech head) runs as one [B, D] matrix, and only attention,
the one part that depends on each request's history, runs per request against that request's
own :class:`KVCache` (each of its own length, no padding). On a GPU, where each of those
per-request calls costs a kernel launch, the caches are slots of one :class:`KVSlab` and a step
of ``SLAB_MIN_ROWS`` or more requests attends for all of them in one call, each row masked to its
own length (:func:`slab_layers`; ``cuda_graphs`` replays it as a CUDA graph).

The step reads the weights through the backbone's own modules (``layer.self_attn.project_qkv`` ...)
and calls them, so it keeps working when those Linear layers are cast to bfloat16 or replaced by
dynamic-int8 modules. It reproduces ``Qwen2Model.forward`` for one new position per request;
``tests/test_cv2_batching.py`` checks that against the sequential path.

Prompts of several requests are packed the same way (:func:`packed_forward`; the decode step is
its one-row-per-request case): their rows are stacked along one axis, so every Linear of the
stack runs once over all of them. On the CPU a prefill reads the whole stack's weights from
memory (the flow and the vocoder evict them between steps), so two prompts fed in one call cost
far less than two calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tts_core.cosyvoice2.native_decode import native_decoder
from tts_core.cosyvoice2.qwen2 import KVCache, KVSlab, Qwen2Model, rotary_cos_sin


def batched_decode(backbone: Qwen2Model, rows: torch.Tensor,
                   caches: Sequence[KVCache]) -> torch.Tensor:
    """Feed one input row per request; return the final hidden states [B, D].

    rows: [B, D] embeddings, row i placed after the positions of ``caches[i]``, which is
    extended in place by one position.
    """
    if rows.shape[0] != len(caches):
        raise ValueError(f"{rows.shape[0]} rows for {len(caches)} caches")
    return packed_forward(backbone, list(rows[:, None]), caches)


@torch.inference_mode()
def packed_forward(backbone: Qwen2Model, segments: Sequence[torch.Tensor],
                   caches: Sequence[KVCache]) -> torch.Tensor:
    """Feed rows [L_i, D] of several requests, each after the positions of ``caches[i]``
    (extended in place); return the final hidden state of each request's last row [N, D].

    The row-wise work runs once over all rows; attention runs per request, as
    ``Qwen2Model.forward`` computes it for that request alone (causal within the new rows,
    everything cached before them visible).
    """
    cfg = backbone.config
    if len(segments) != len(caches) or not segments:
        raise ValueError(f"{len(segments)} row blocks for {len(caches)} caches")
    lengths = [int(s.shape[0]) for s in segments]
    pasts = [len(c) for c in caches]
    if max(p + n for p, n in zip(pasts, lengths, strict=True)) > cfg.max_position_embeddings:
        raise ValueError(f"a sequence would exceed max_position_embeddings "
                         f"({cfg.max_position_embeddings})")
    device = segments[0].device
    dtype = backbone.embed_tokens.weight.dtype
    x = torch.cat(list(segments)).to(dtype)  # [T, D]
    positions = torch.tensor([p + j for p, n in zip(pasts, lengths, strict=True)
                              for j in range(n)], device=device)
    cos, sin = rotary_cos_sin(positions, cfg.head_dim, cfg.rope_theta, dtype)  # [T, 1, hd]
    native = native_decoder(backbone, x.shape[0]) if x.shape[0] == len(segments) else None
    if native is not None:  # decode rows of an int8 stack: one native call per layer
        return backbone.norm(native.forward(x, cos, sin, caches).to(dtype))
    slab = shared_slab(caches) if x.shape[0] == len(segments) >= SLAB_MIN_ROWS else None
    if slab is not None:
        return backbone.norm(_slab_decode(backbone, slab, x, cos, sin, caches, pasts))
    heads, kv_heads, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(hd)
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    masks = [None if past == 0 or n == 1 else
             torch.arange(past + n, device=device)[None, :]
             <= torch.arange(past, past + n, device=device)[:, None]
             for past, n in zip(pasts, lengths, strict=True)]
    for layer in backbone.layers:
        attn = layer.self_attn
        qkv = attn.project_qkv(layer.input_layernorm(x)).view(x.shape[0], -1, hd)
        q, k, v = attn.rotate_qkv(qkv, cos, sin)  # [T, heads, hd]
        outs = []
        for i, cache in enumerate(caches):
            a, b, n = bounds[i], bounds[i + 1], lengths[i]
            keys, values = cache.update(attn.layer_index, k[a:b].transpose(0, 1)[None],
                                        v[a:b].transpose(0, 1)[None])
            if n == 1 and group > 1:  # as Qwen2Attention: the group's heads as query rows
                out = F.scaled_dot_product_attention(
                    q[a:b].reshape(1, kv_heads, group, hd), keys, values, scale=scale)
                outs.append(out.reshape(1, heads * hd))
                continue
            if group > 1:
                keys = keys.repeat_interleave(group, dim=1)
                values = values.repeat_interleave(group, dim=1)
            out = F.scaled_dot_product_attention(
                q[a:b].transpose(0, 1)[None], keys, values, attn_mask=masks[i],
                is_causal=masks[i] is None and n > 1, scale=scale)
            outs.append(out[0].transpose(0, 1).reshape(n, heads * hd))
        x = x + attn.o_proj(torch.cat(outs))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    if x.shape[0] > len(segments):  # each request's last row
        x = x.index_select(0, torch.tensor([b - 1 for b in bounds[1:]], device=device))
    return backbone.norm(x)


# Decode rows from which a step over slab caches runs as one batch (_slab_decode); fewer go
# through each request's slot one at a time, as other caches do. Measured on an H200 (bf16, full
# size, scripts/bench_cuda.sh): the batched step won at 16 and 32 streams (throughput x1.65 and
# x1.97) and lost at 1 and 4 (0.85x): its fixed calls (gathers, a masked attention) cost more
# than a few rows' own calls.
SLAB_MIN_ROWS = 8


def shared_slab(caches: Sequence[KVCache]) -> KVSlab | None:
    """The slab holding every cache, each with room for one more position; else None."""
    slab = caches[0].slab
    if slab is None or any(c.slab is not slab or len(c) >= slab.capacity for c in caches):
        return None
    return slab


# A batched slab step's shapes are padded to few distinct ones: rows to a power of two (the
# padding rows write into the slab's scratch slot) and the attended span to a multiple of
# SLAB_SPAN_STEP positions (masked). A GPU library may prepare work per new shape (attention
# backends choose kernels, some build plans), and a step whose shapes change with every token
# would pay that on every step: on an H200 the first run of this step took ~5x as long at one
# stream as the per-request path, whose shapes its warm-up had already seen.
SLAB_SPAN_STEP = 128


def _slab_decode(backbone: Qwen2Model, slab: KVSlab, x: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, caches: Sequence[KVCache], pasts: list[int]
                 ) -> torch.Tensor:
    """One decode row per request, all of whose caches are slots of ``slab``: per layer, one
    call writes every row's new key (and one its value) into its slot, one gathers the rows'
    slots, and one attention call covers them all, each row masked to its own length (shapes
    padded, see SLAB_SPAN_STEP). Returns the hidden states [B, D] before the final norm."""
    count, device = x.shape[0], x.device
    for cache in caches:
        cache.advance()
    pad = (1 << (count - 1).bit_length()) - count
    slots = torch.tensor([c.slot for c in caches] + [slab.scratch] * pad, device=device)
    written = torch.tensor(pasts + [0] * pad, device=device)
    if pad:
        x = torch.cat((x, x.new_zeros(pad, x.shape[1])))
        cos = torch.cat((cos, cos[:1].expand(pad, *cos.shape[1:])))
        sin = torch.cat((sin, sin[:1].expand(pad, *sin.shape[1:])))
    span = min(slab.capacity, -(-(max(pasts) + 1) // SLAB_SPAN_STEP) * SLAB_SPAN_STEP)
    return slab_layers(backbone, slab, x, cos, sin, slots, written, span)[:count]


def slab_layers(backbone: Qwen2Model, slab: KVSlab, x: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, slots: torch.Tensor, written: torch.Tensor, span: int
                ) -> torch.Tensor:
    """The decoder layers for one row per slot: row i's key and value go to position
    ``written[i]`` of slot ``slots[i]``, and it attends over that slot's first ``span``
    positions, masked to ``0..written[i]``. Tensor operations only, on shapes fixed by the row
    count and ``span``: a CUDA graph can replay it. Returns hidden states [B, D] (no norm)."""
    cfg = backbone.config
    heads, kv_heads, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    rows = x.shape[0]
    visible = (torch.arange(span, device=x.device)[None, :] <= written[:, None])[:, None, None]
    scale = 1.0 / math.sqrt(hd)
    for layer in backbone.layers:
        attn = layer.self_attn
        qkv = attn.project_qkv(layer.input_layernorm(x)).view(rows, -1, hd)
        q, k, v = attn.rotate_qkv(qkv, cos, sin)  # [B, heads | kv_heads, hd]
        keys, values = slab.keys[attn.layer_index], slab.values[attn.layer_index]
        keys[slots, :, written] = k.to(keys.dtype)
        values[slots, :, written] = v.to(values.dtype)
        # the group's query heads as query rows of their key/value head, as Qwen2Attention
        out = F.scaled_dot_product_attention(
            q.reshape(rows, kv_heads, heads // kv_heads, hd), keys[slots, :, :span],
            values[slots, :, :span], attn_mask=visible, scale=scale)
        x = x + attn.o_proj(out.reshape(rows, heads * hd))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return x


@dataclass
class BackboneLM:
    """A speech LM as the scheduler sees it: a Qwen2 backbone plus an output head.

    ``head`` maps final hidden states [N, D] to logits [N, V] (CosyVoice 2: ``llm_decoder``).
    Log-probabilities come back in float32 whatever the backbone's precision.
    """

    backbone: Qwen2Model
    head: Callable[[torch.Tensor], torch.Tensor]
    head_dtype: torch.dtype = torch.float32
    # Where new caches take their storage (:meth:`new_cache`): None, each its own.
    slab: KVSlab | None = None
    # Decode steps of slab caches through fixed buffers (cuda_graphs.DecodeGraphs), or None.
    graphs: Any = None

    @property
    def max_positions(self) -> int:
        return self.backbone.config.max_position_embeddings

    def new_cache(self) -> KVCache:
        """A request's empty cache: a slot of :attr:`slab` while one is free."""
        return self.backbone.new_cache(self.slab)

    @torch.inference_mode()
    def decode(self, rows: torch.Tensor, caches: Sequence[KVCache]) -> torch.Tensor:
        """One row per request -> float32 log-probabilities [B, V]."""
        if self.graphs is not None and self.graphs.fits(caches):
            return self.graphs.decode(rows, caches)
        hidden = batched_decode(self.backbone, rows, caches)
        return self.head(hidden.to(self.head_dtype)).float().log_softmax(dim=-1)

    @torch.inference_mode()
    def prefill(self, segments: Sequence[torch.Tensor], caches: Sequence[KVCache]
                ) -> torch.Tensor:
        """Rows [L_i, D] of one or more requests, each after its cache, in one packed call ->
        float32 log-probabilities [N, V] of each request's last row. (One request alone gives
        exactly ``Qwen2Model.forward``'s numbers.)"""
        hidden = packed_forward(self.backbone, segments, caches)
        return self.head(hidden.to(self.head_dtype)).float().log_softmax(dim=-1)
