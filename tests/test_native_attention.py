"""The native bfloat16 attention of the flow's chunk runs (tts_core/cosyvoice2/attention_bf16.c):
outputs against a float64 reference next to PyTorch's bfloat16 kernel on the same inputs, over
query and key counts around the tile sizes, per-row key ranges (chunk masks, left windows), inputs
read in place through strides; the same bits on any thread count and from concurrent callers;
PyTorch's own AMX kernels unharmed after it; and the switch that turns it off."""

from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tts_core.cosyvoice2 import flow_decoder, packed_linear
from tts_core.cosyvoice2.attention_native import SWITCH, NativeAttention, native_attention
from tts_core.cosyvoice2.flow import CausalFlow, FlowConfig
from tts_core.cosyvoice2.flow_decoder import FlowDecoderConfig
from tts_core.cosyvoice2.flow_encoder import FlowEncoderConfig
from tts_core.cosyvoice2.flow_matching import CFMConfig
from tts_core.cosyvoice2.testing.make_model_dir import randomize

ROOT = Path(__file__).resolve().parents[1]
HEAD_DIM = 64
kernel = native_attention()
needs_kernel = pytest.mark.skipif(kernel is None, reason="the native attention kernel does not "
                                  "run here (no AMX bfloat16 or no C compiler)")


def _inputs(batch: int, rows: int, keys: int, heads: int, seed: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries as a slice of a fused q/k/v product, keys and values as rows of a larger cache
    (strided, as the flow passes them)."""
    g = torch.Generator().manual_seed(seed)
    width = heads * HEAD_DIM
    fused = (torch.randn(batch, rows, 3 * width, generator=g) * 2).bfloat16()
    cache = (torch.randn(2, batch, keys + 7, width, generator=g) * 2).bfloat16()
    return fused[..., :width], cache[0, :, 3:3 + keys], cache[1, :, 3:3 + keys]


def _chunk_ranges(rows: int, keys: int, chunk: int, left: int | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The flow's visibility for rows that are the last ``rows`` of ``keys`` frames: own chunk
    and earlier ones (within ``left`` frames)."""
    start = keys - rows
    row_chunk = start + torch.arange(rows) // chunk * chunk
    end = torch.clamp(row_chunk + chunk, max=keys)
    begin = torch.zeros(rows, dtype=torch.long) if left is None \
        else torch.clamp(row_chunk - left, min=0)
    return begin.int(), end.int()


def _mask(begin: torch.Tensor, end: torch.Tensor, keys: int) -> torch.Tensor:
    key = torch.arange(keys)
    return (key[None, :] >= begin[:, None]) & (key[None, :] < end[:, None])


def _pytorch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
             heads: int) -> torch.Tensor:
    def split(t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (heads, HEAD_DIM)).transpose(1, 2)
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=visible)
    return out.transpose(1, 2).flatten(2)


def _native(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, begin: torch.Tensor,
            end: torch.Tensor, heads: int) -> torch.Tensor:
    assert kernel is not None
    out = torch.full(q.shape, float("nan"), dtype=torch.bfloat16)
    kernel.attend(q, k, v, out, begin, end, heads)
    return out


def _errors(got: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    diff = (got.double() - exact).abs()
    return diff.max().item(), (diff.sum() / exact.abs().sum()).item()


@needs_kernel
@pytest.mark.parametrize(("rows", "keys", "chunk", "left"), [
    (1, 1, 50, None), (3, 160, 50, None), (16, 16, 50, None), (17, 49, 50, None),
    (26, 176, 50, None), (33, 33, 50, None), (50, 250, 50, None),
    (100, 300, 50, None), (150, 150, 50, None), (120, 300, 50, 50), (64, 64, 16, 16),
])
def test_as_accurate_as_pytorchs_kernel(rows: int, keys: int, chunk: int, left: int | None
                                        ) -> None:
    """Against float64 on the same bfloat16 inputs the native kernel errs no more than PyTorch's
    flash kernel (both round the softmax weights and the output to bfloat16; small slack for
    where the two roundings fall)."""
    heads = 8
    q, k, v = _inputs(2, rows, keys, heads, seed=rows * 1000 + keys)
    begin, end = _chunk_ranges(rows, keys, chunk, left)
    visible = _mask(begin, end, keys)
    exact = _pytorch(q.double(), k.double(), v.double(), visible, heads)
    mine = _errors(_native(q, k, v, begin, end, heads), exact)
    theirs = _errors(_pytorch(q, k, v, visible, heads), exact)
    assert mine[0] <= 1.5 * theirs[0] + 2e-3, (mine, theirs)
    assert mine[1] <= 1.2 * theirs[1] + 1e-4, (mine, theirs)
    assert mine[1] < 5e-3  # bfloat16's own rounding of the outputs is about 1.6e-3


@needs_kernel
def test_ranges_are_clipped_and_empty_rows_are_zero() -> None:
    """A range past the keys reads no further than the keys (same output as the range cut at
    the end); a row that sees no key gets zeros, not NaN."""
    q, k, v = _inputs(1, 5, 40, 2, seed=3)
    begin = torch.tensor([0, 0, 10, 7, -4], dtype=torch.int32)
    end = torch.tensor([40, 400, 10, 3, 20], dtype=torch.int32)
    got = _native(q, k, v, begin, end, 2)
    clipped = _native(q, k, v, begin.clamp(min=0), end.clamp(max=40), 2)
    assert torch.equal(got, clipped)
    assert torch.equal(got[:, 2:4], torch.zeros_like(got[:, 2:4]))
    assert torch.isfinite(got.float()).all()


@needs_kernel
def test_same_bits_on_any_thread_count_and_from_concurrent_callers() -> None:
    """Each (batch, head) pair is one thread's work from start to end, so the thread count does
    not change a bit; callers on several Python threads each get their own scratch."""
    q, k, v = _inputs(2, 26, 176, 8, seed=7)
    begin, end = _chunk_ranges(26, 176, 50, None)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(_native(q, k, v, begin, end, 8))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(results[0], r) for r in results[1:])
    other = _inputs(2, 150, 150, 8, seed=8)
    other_ranges = _chunk_ranges(150, 150, 50, None)
    expected_other = _native(*other, *other_ranges, 8)
    failures: list[str] = []

    def call(inputs: tuple, ranges: tuple, expected: torch.Tensor) -> None:
        for _ in range(20):
            if not torch.equal(_native(*inputs, *ranges, 8), expected):
                failures.append("differs")
    workers = [threading.Thread(target=call, args=((q, k, v), (begin, end), results[0])),
               threading.Thread(target=call, args=(other, other_ranges, expected_other))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not failures


@needs_kernel
def test_pytorchs_amx_kernels_unharmed() -> None:
    """The kernel restores each thread's tile configuration: PyTorch's bfloat16 products and
    attention (oneDNN / brgemm on AMX) give the same bits before and after it."""
    g = torch.Generator().manual_seed(11)
    a = torch.randn(52, 256, generator=g).bfloat16()
    w = torch.randn(1536, 256, generator=g).bfloat16()
    q, k, v = _inputs(2, 26, 176, 8, seed=12)
    visible = torch.ones(26, 176, dtype=torch.bool)
    linear_before, attention_before = F.linear(a, w), _pytorch(q, k, v, visible, 8)
    begin, end = _chunk_ranges(26, 176, 50, None)
    for _ in range(3):
        _native(q, k, v, begin, end, 8)
        assert torch.equal(F.linear(a, w), linear_before)
        assert torch.equal(_pytorch(q, k, v, visible, 8), attention_before)


@needs_kernel
def test_refuses_mismatched_inputs() -> None:
    assert kernel is not None
    q, k, v = _inputs(1, 4, 8, 2, seed=1)
    ranges = _chunk_ranges(4, 8, 50, None)
    with pytest.raises(ValueError, match="values"):
        kernel.attend(q, k, v[..., :64], torch.empty_like(q), *ranges, 2)
    with pytest.raises(ValueError, match="key ranges"):
        kernel.attend(q, k, v, torch.empty_like(q), ranges[0].long(), ranges[1], 2)
    assert not kernel.takes(q.float(), HEAD_DIM) and not kernel.takes(q, 80)


def test_switch_turns_it_off() -> None:
    """TTS_NATIVE_ATTENTION=0 keeps PyTorch's attention (for comparisons, or a CPU that
    misbehaves)."""
    code = ("from tts_core.cosyvoice2.attention_native import native_attention; "
            "print(native_attention() is None)")
    env = {**os.environ, SWITCH: "0", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "True"


def _flow_with_64_channel_heads() -> CausalFlow:
    """A small CosyVoice 2 flow whose estimator has the official head size (64), so its
    bfloat16 chunk runs take the native attention, products and norms."""
    config = FlowConfig(
        input_size=48, output_size=32, spk_embed_dim=24, vocab_size=97, token_mel_ratio=2,
        pre_lookahead_len=2, spk_proj_dim=32,
        encoder=FlowEncoderConfig(input_size=48, output_size=48, attention_heads=3,
                                  linear_units=80, num_blocks=2, num_up_blocks=2, lookahead=2,
                                  upsample_stride=2, static_chunk_size=8),
        estimator=FlowDecoderConfig(in_channels=128, out_channels=32, channels=(128,),
                                    attention_head_dim=64, n_blocks=2, num_mid_blocks=2,
                                    num_heads=2, static_chunk_size=16,
                                    num_decoding_left_chunks=-1),
        cfm=CFMConfig(n_feats=32, inference_cfg_rate=0.7, n_timesteps=4))
    flow = CausalFlow(config).eval()
    randomize(flow, torch.Generator().manual_seed(21))
    return flow


def _mel_of(seed: int, streaming: bool) -> Callable[[CausalFlow], torch.Tensor]:
    """A flow's float32 mel for a fixed random prompt and 30 tokens."""
    g = torch.Generator().manual_seed(seed)
    prompt = (torch.randint(0, 97, (1, 20), generator=g), torch.randn(1, 40, 32, generator=g),
              torch.randn(1, 24, generator=g))
    tokens = torch.randint(0, 97, (1, 30), generator=g)

    def mel(model: CausalFlow) -> torch.Tensor:
        with torch.inference_mode():
            return model.inference(tokens, *prompt, streaming=streaming, finalize=True).float()
    return mel


@needs_kernel
def test_streamed_flow_on_native_kernels_as_close_to_float32_as_pytorchs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the flow's streamed chunk runs (prompt chunks together, then chunk by chunk):
    the bfloat16 mel with the native kernels is as close to float32's as the bfloat16 mel on
    PyTorch's kernels, and inside the bfloat16 tolerance (tests/test_cv2_precision.py)."""
    flow = _flow_with_64_channel_heads()
    mel = _mel_of(seed=22, streaming=True)
    reference = mel(flow)
    calls = []
    attend_parts = NativeAttention.attend_parts

    def counted(self: NativeAttention, *args: object, **kwargs: object) -> None:
        calls.append(1)
        attend_parts(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(NativeAttention, "attend_parts", counted)
    native = mel(copy.deepcopy(flow).to(torch.bfloat16))
    assert calls, "the native attention did not run"
    with monkeypatch.context() as patch:
        for module in (flow_decoder, packed_linear):
            patch.setattr(module, "native_gemm", lambda: None)
        patch.setattr(flow_decoder, "native_attention", lambda: None)
        before = len(calls)
        plain = mel(copy.deepcopy(flow).to(torch.bfloat16))
        assert len(calls) == before

    def relative(m: torch.Tensor) -> float:
        return float((m - reference).abs().sum() / reference.abs().sum())

    print(f"streamed mel relative L1: native {relative(native):.4f}, PyTorch {relative(plain):.4f}")
    assert relative(native) <= 1.25 * relative(plain) + 1e-3, (relative(native), relative(plain))
    assert relative(native) <= 0.02


@needs_kernel
def test_whole_flow_in_bfloat16_runs_on_native_kernels_as_accurately(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-streaming bfloat16 call runs as one chunk seen whole on the native kernels: as
    close to float32's mel as the module forward on PyTorch's kernels, and inside the bfloat16
    tolerance."""
    flow = _flow_with_64_channel_heads()
    mel = _mel_of(seed=23, streaming=False)
    reference = mel(flow)
    runs = []
    forward_chunks = flow_decoder.CausalConditionalDecoder.forward_chunks

    def counted(self: object, *args: object, **kwargs: object) -> object:
        runs.append(kwargs.get("full_attention", False))
        return forward_chunks(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(flow_decoder.CausalConditionalDecoder, "forward_chunks", counted)
    native = mel(copy.deepcopy(flow).to(torch.bfloat16))
    assert runs and all(runs), "the whole call did not run as one full-attention chunk"
    with monkeypatch.context() as patch:
        patch.setattr(flow_decoder, "native_gemm", lambda: None)
        module_forward = mel(copy.deepcopy(flow).to(torch.bfloat16))
    assert len(runs) == 4  # one per Euler step, none from the module forward

    def relative(m: torch.Tensor) -> float:
        return float((m - reference).abs().sum() / reference.abs().sum())

    print(f"whole mel relative L1: native {relative(native):.4f}, module forward "
          f"{relative(module_forward):.4f}")
    assert relative(native) <= 1.25 * relative(module_forward) + 1e-3
    assert relative(native) <= 0.02


@needs_kernel
def test_finished_chunks_run_together_with_the_same_bits(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """On the native kernels a call's finished chunks go through the estimator as one run.
    Every output bit is what chunk-by-chunk runs give, in each call of a stream and against the
    uncached one-call path (which groups the chunks otherwise), because every native operation
    is row by row; a stream over its memory budget (recomputing its finished chunks) too.
    float32 and a left attention window keep chunk-by-chunk runs."""
    flow = _flow_with_64_channel_heads()
    estimator = flow.decoder.estimator
    assert not estimator.merges_chunk_runs_exactly()  # float32
    low = copy.deepcopy(flow).to(torch.bfloat16)
    assert low.decoder.estimator.merges_chunk_runs_exactly()
    windowed = copy.deepcopy(low)
    windowed.decoder.estimator.config = dataclasses.replace(estimator.config,
                                                                num_decoding_left_chunks=1)
    assert not windowed.decoder.estimator.merges_chunk_runs_exactly()

    g = torch.Generator().manual_seed(24)
    prompt = (torch.randint(0, 97, (1, 20), generator=g), torch.randn(1, 40, 32, generator=g),
              torch.randn(1, 24, generator=g))
    tokens = torch.randint(0, 97, (1, 52), generator=g)
    runs: list[int] = []
    forward_chunks = flow_decoder.CausalConditionalDecoder.forward_chunks

    def counted(self: object, parts: list, *args: object, **kwargs: object) -> object:
        runs.append(max(part.rows for part in parts))
        return forward_chunks(self, parts, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(flow_decoder.CausalConditionalDecoder, "forward_chunks", counted)

    def stream(budget: int | None = None) -> list[torch.Tensor]:
        cache = low.new_stream_cache(budget)
        with torch.inference_mode():
            outs = [low.inference_cached(tokens[:, :n], *prompt, cache, finalize=n == 52)
                    for n in (6, 14, 46, 52)]
        assert cache.lean == (budget is not None)
        return outs

    # a budget for about 60 frames: the stream goes over it on the way and recomputes its
    # finished chunks from then on (the lean path), joined into one run as well
    budget = 60 * low.stream_cache_bytes_per_frame(torch.bfloat16)
    lean = stream(budget)
    runs[:] = []
    merged = stream()
    merged_runs, runs[:] = list(runs), []
    with torch.inference_mode():
        one_call = low.inference(tokens, *prompt, streaming=True, finalize=True)
    runs[:] = []
    with monkeypatch.context() as patch:
        patch.setattr(flow_decoder.CausalConditionalDecoder, "merges_chunk_runs_exactly",
                      lambda self: False)
        apart = stream()
        apart_runs = list(runs)
        lean_apart = stream(budget)
    for a, b in zip(merged, apart, strict=True):
        assert torch.equal(a, b)
    for a, b, c in zip(lean, lean_apart, merged, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.equal(merged[-1], one_call)
    # the third call finishes several chunks: one run, not one per chunk (apart, only the
    # prompt's chunks run together)
    assert max(merged_runs) > max(apart_runs) and len(merged_runs) < len(apart_runs), \
        (merged_runs, apart_runs)
