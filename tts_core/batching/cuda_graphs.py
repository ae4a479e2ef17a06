"""The wide scheduler's decode step replayed as a CUDA graph (opt-in: ``TTS_CUDA_GRAPHS=1``).

On an H200 one request's decode step took ~14 ms where reading the bfloat16 weights takes
~0.25 ms: the step is some 500 kernel launches, each paid on the host in Python and the
dispatcher. A CUDA graph records those launches once and replays them with one call.

A graph replays fixed shapes and addresses, so the step it records is :func:`static_decode`:
rows, slots and positions come from buffers owned here, one graph per bucket of row counts
(1, 2, 4, 8, ... up to the scheduler's ``max_batch``; a step of 5 rows runs the 8-row graph,
its 3 padding rows writing into the slab's scratch slot), and every row attends over its slot's
whole capacity, masked to its own length, so one graph serves any lengths. The LM head and the
log-softmax are in the graph too. Prompts (prefill) stay eager.

Not on by default: this module ran on a CPU only (where :class:`DecodeGraphs` runs the same
static step eagerly, which the tests compare with the per-request path); the GPU leases so far
ended before it was written. ``scripts/bench_cuda.sh`` measures it beside the eager step.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch

from tts_core.cosyvoice2.qwen2 import KVCache, KVSlab, rotary_cos_sin

from .lm_batch import BackboneLM, shared_slab, slab_layers

log = logging.getLogger(__name__)

ENV_SWITCH = "TTS_CUDA_GRAPHS"


def graphs_requested() -> bool:
    return os.environ.get(ENV_SWITCH, "0") == "1"


def static_decode(lm: BackboneLM, slab: KVSlab, x: torch.Tensor, slots: torch.Tensor,
                  positions: torch.Tensor) -> torch.Tensor:
    """Float32 log-probabilities [B, V] of one decode row per slot (rows ``x`` [B, D] at
    ``positions``), attending over the slab's whole capacity: shapes fixed by B alone."""
    cfg = lm.backbone.config
    cos, sin = rotary_cos_sin(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
    hidden = slab_layers(lm.backbone, slab, x, cos, sin, slots, positions, slab.capacity)
    hidden = lm.backbone.norm(hidden)
    return lm.head(hidden.to(lm.head_dtype)).float().log_softmax(dim=-1)


def buckets(max_rows: int) -> list[int]:
    """Row counts with a graph of their own: powers of two below ``max_rows``, and it."""
    sizes, size = [], 1
    while size < max_rows:
        sizes.append(size)
        size *= 2
    return [*sizes, max_rows]


class DecodeGraphs:
    """Decode steps of up to ``max_rows`` slab requests through fixed buffers; on a GPU each
    bucket's step is captured as a CUDA graph when this is made, elsewhere it runs eagerly
    (the same operations on the same shapes, for tests)."""

    def __init__(self, lm: BackboneLM, slab: KVSlab, max_rows: int) -> None:
        self.lm, self.slab = lm, slab
        weight = lm.backbone.embed_tokens.weight
        device = weight.device
        self.buckets = buckets(max_rows)
        self.x = torch.zeros(max_rows, lm.backbone.config.hidden_size, dtype=weight.dtype,
                             device=device)
        self.slots = torch.full((max_rows,), slab.scratch, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_rows, dtype=torch.long, device=device)
        self.captured = device.type == "cuda"
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if self.captured:
            with torch.inference_mode():
                for rows in reversed(self.buckets):
                    self._graphs[rows] = self._capture(rows)
            log.info("decode step captured as CUDA graphs for %s rows", self.buckets)

    def _step(self, rows: int) -> torch.Tensor:
        return static_decode(self.lm, self.slab, self.x[:rows], self.slots[:rows],
                             self.positions[:rows])

    def _capture(self, rows: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm-up on a side stream first (the library handles and the modules' cached tensors
        # are made there, not during capture); padding rows only touch the scratch slot.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(rows)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._step(rows)
        return graph, out

    def fits(self, caches: Sequence[KVCache]) -> bool:
        """Whether a step of these caches can run here: all slots of the slab, with room."""
        return 0 < len(caches) <= self.buckets[-1] and shared_slab(caches) is self.slab

    @torch.inference_mode()
    def decode(self, rows: torch.Tensor, caches: Sequence[KVCache]) -> torch.Tensor:
        """One row per request (:meth:`fits`) -> float32 log-probabilities [B, V]."""
        count = len(caches)
        size = next(b for b in self.buckets if b >= count)
        pasts = [len(c) for c in caches]
        for cache in caches:
            cache.advance()
        pad = size - count
        self.x[:count].copy_(rows)
        self.x[count:size].zero_()
        self.slots[:size].copy_(torch.tensor([c.slot for c in caches] + [self.slab.scratch] * pad))
        self.positions[:size].copy_(torch.tensor(pasts + [0] * pad))
        if not self.captured:
            return self._step(size)[:count]
        graph, out = self._graphs[size]
        graph.replay()
        return out[:count].clone()  # the next replay writes over ``out``
