"""The CosyVoice 3 DiT keeps its per-timestep modulations (``DiT._modulations``): a cache, so
it must not change any output, in float32 and in bfloat16 (where the DiT's products run on
packed weights), streamed in chunks and in one pass."""

from __future__ import annotations

import copy

import pytest
import torch

from tts_core.cosyvoice3.dit import (
    MODULATION_CACHE_SIZE,
    DiT,
    DiTCache,
    DiTConfig,
    ModulationCache,
)


def _dit(dtype: torch.dtype) -> DiT:
    torch.manual_seed(0)
    config = DiTConfig(dim=64, depth=2, heads=4, dim_head=16, static_chunk_size=8)
    dit = DiT(config).eval()
    with torch.no_grad():  # nn.Linear's init leaves adaLN at zero in the checkpoint's place
        for p in dit.parameters():
            p.normal_(0, 0.2)
    return dit.to(dtype)


def _inputs(dtype: torch.dtype, frames: int = 20, rows: int = 2):
    g = torch.Generator().manual_seed(1)
    x, mu, cond = (torch.randn(rows, 80, frames, generator=g).to(dtype) for _ in range(3))
    spks = torch.randn(rows, 80, generator=g).to(dtype)
    mask = torch.ones(rows, 1, frames, dtype=dtype)
    return x, mask, mu, spks, cond


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("streaming", [True, False])
@torch.inference_mode()
def test_kept_modulations_change_no_output(dtype: torch.dtype, streaming: bool) -> None:
    dit = _dit(dtype)
    x, mask, mu, spks, cond = _inputs(dtype)
    timesteps = [torch.tensor(v).expand(x.shape[0]) for v in (0.0, 0.37, 0.81)]

    def run(t: torch.Tensor) -> torch.Tensor:
        return dit(x, mask, mu, t, spks, cond, streaming=streaming,
                   cache=DiTCache() if streaming else None)

    missed = []  # each computed with nothing kept
    for t in timesteps:
        dit.modulation_cache = ModulationCache()
        missed.append(run(t))
    dit.modulation_cache = ModulationCache()
    filled = [run(t) for t in timesteps]  # kept as they are made
    assert len(dit.modulation_cache._entries) == len(timesteps)
    kept = [run(t) for t in timesteps]  # every one from the cache
    for a, b, c in zip(missed, filled, kept, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(missed[0], missed[1])  # the timestep matters
    # rows of different timesteps are computed per row and not kept
    mixed = torch.tensor([0.0, 0.37])
    out = dit(x, mask, mu, mixed, spks, cond, streaming=streaming,
              cache=DiTCache() if streaming else None)
    assert torch.equal(out[0], missed[0][0]) and torch.equal(out[1], missed[1][1])
    assert len(dit.modulation_cache._entries) == len(timesteps)


@torch.inference_mode()
def test_modulation_cache_is_bounded_and_not_copied() -> None:
    dit = _dit(torch.float32)
    x, mask, mu, spks, cond = _inputs(torch.float32, frames=8)
    for k in range(MODULATION_CACHE_SIZE + 5):
        dit(x, mask, mu, torch.tensor(k / 100).expand(2), spks, cond)
    assert len(dit.modulation_cache._entries) == MODULATION_CACHE_SIZE
    twin = copy.deepcopy(dit)
    assert len(twin.modulation_cache._entries) == 0
    # the same rows through a copy (fresh cache) give the same bits
    t = torch.tensor(0.5).expand(2)
    assert torch.equal(twin(x, mask, mu, t, spks, cond), dit(x, mask, mu, t, spks, cond))


@torch.inference_mode()
def test_bfloat16_products_run_on_packed_weights() -> None:
    """In bfloat16 on a CPU whose oneDNN has bfloat16 kernels, the DiT's linears use weights
    laid out once (packed_linear): 1.55x on a full-size CosyVoice 3 stream's flow."""
    from tts_core.cosyvoice2.packed_linear import NativeWeight, packs_bfloat16

    if not packs_bfloat16(torch.device("cpu")):
        pytest.skip("this CPU's oneDNN has no bfloat16 kernels")
    dit = _dit(torch.bfloat16)
    x, mask, mu, spks, cond = _inputs(torch.bfloat16)
    dit(x, mask, mu, torch.tensor(0.5).expand(2), spks, cond, streaming=True, cache=DiTCache())
    block = dit.transformer_blocks[0]
    for layer in (block.attn.to_q, block.attn.to_k, block.attn.to_v, block.attn.to_out[0],
                  block.ff.ff[0][0], block.ff.ff[2]):
        prepared = layer.__dict__["_derived_weight"][1]
        assert isinstance(prepared, NativeWeight) or prepared.is_mkldnn


def test_nothing_is_kept_where_autograd_records() -> None:
    dit = _dit(torch.float32)
    x, mask, mu, spks, cond = _inputs(torch.float32, frames=8)
    out = dit(x, mask, mu, torch.tensor(0.5).expand(2), spks, cond)
    out.square().mean().backward()
    assert len(dit.modulation_cache._entries) == 0
    assert dit.transformer_blocks[0].attn_norm.linear.weight.grad.abs().sum() > 0
