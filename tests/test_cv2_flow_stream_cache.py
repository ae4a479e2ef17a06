"""The flow's streaming cache: a stream that computes only new frames must give exactly what
re-running the flow on every token so far gives (torch.equal, not a tolerance), whatever the
chunk hops, for a registered speaker's prompt cache, and with streams interleaved.

Exactness holds by construction (the uncached streaming path is the chunked path from an empty
cache, and every op runs on shapes that depend only on its chunk); these tests pin it down on
the parity model, a small model with other sizes, and a generated model directory.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tests.cv2_parity import parity_models, vectors
from tts_core.cosyvoice2.engine import default_schedule
from tts_core.cosyvoice2.flow import CausalFlow, FlowConfig, FlowStreamCache
from tts_core.cosyvoice2.flow_decoder import FlowDecoderConfig
from tts_core.cosyvoice2.flow_encoder import FlowEncoderConfig
from tts_core.cosyvoice2.flow_matching import CFMConfig
from tts_core.cosyvoice2.model_dir import load_model_dir
from tts_core.cosyvoice2.testing.make_model_dir import make_model_dir, randomize
from tts_core.cosyvoice2.token2wav import ChunkTrace, StreamSchedule, Token2Wav

torch.set_num_threads(1)


def run_cached(flow: CausalFlow, token: torch.Tensor, prompt: tuple[torch.Tensor, ...],
               lengths: list[int], cache: FlowStreamCache | None = None
               ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Stream calls on token[:, :n] for each n (the last one final, chunk attention); return
    (cached output, uncached output) per call, both with already emitted frames cut."""
    cache = cache if cache is not None else FlowStreamCache()
    lookahead, ratio = flow.config.pre_lookahead_len, flow.config.token_mel_ratio
    pairs, emitted = [], 0
    for i, n in enumerate(lengths):
        final = i == len(lengths) - 1
        cached = flow.inference_cached(token[:, :n], *prompt, cache, finalize=final,
                                       skip=emitted)
        whole = flow.inference(token[:, :n], *prompt, streaming=True, finalize=final)
        pairs.append((cached, whole[:, :, emitted:]))
        assert whole.shape[-1] == ratio * (prompt[0].shape[1] + n - (0 if final else lookahead)) \
            - prompt[1].shape[1]
        emitted = whole.shape[-1]
    return pairs


def assert_all_equal(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for i, (cached, whole) in enumerate(pairs):
        assert cached.shape == whole.shape, f"call {i}"
        assert torch.equal(cached, whole), \
            f"call {i}: max abs diff {(cached - whole).abs().max().item():.3e}"


@pytest.fixture(scope="module")
def parity() -> tuple[CausalFlow, dict[str, torch.Tensor]]:
    return parity_models().flow, vectors("flow_stream")


# the reference schedule; hops off the 25-token attention chunks; one token at a time around
# chunk boundaries (the unfinished chunk recomputed again and again)
@pytest.mark.parametrize("lengths", [[33, 83, 95], [13, 20, 41, 57, 90, 95],
                                     [4, 5, 6, 7, 8, 9, 30, 31, 32, 33, 60, 95]])
def test_parity_model_cached_equals_uncached(parity, lengths: list[int]) -> None:
    flow, s = parity
    prompt = (s["prompt_token"], s["prompt_feat"], s["embedding"])
    assert_all_equal(run_cached(flow, s["token"], prompt, lengths))


def test_parity_model_streaming_still_matches_the_reference(parity) -> None:
    """The chunked path is what streaming calls run now; the recorded non-final chunks of
    the reference check it (the parity tests do too, this names the reason)."""
    flow, s = parity
    prompt = (s["prompt_token"], s["prompt_feat"], s["embedding"])
    cache = FlowStreamCache()
    for i in range(2):
        n = int(s["chunk_token_len"][i])
        mel = flow.inference_cached(s["token"][:, :n], *prompt, cache, finalize=False)
        assert (mel - s[f"chunk{i}_mel"]).abs().max() < 1e-4


def _small_flow(cfg_rate: float, seed: int) -> CausalFlow:
    config = FlowConfig(
        input_size=48, output_size=32, spk_embed_dim=24, vocab_size=97, token_mel_ratio=3,
        pre_lookahead_len=2, spk_proj_dim=32,
        encoder=FlowEncoderConfig(input_size=48, output_size=48, attention_heads=3,
                                  linear_units=80, num_blocks=2, num_up_blocks=2, lookahead=2,
                                  upsample_stride=3, static_chunk_size=5),
        estimator=FlowDecoderConfig(in_channels=128, out_channels=32, channels=(40,),
                                    attention_head_dim=8, n_blocks=2, num_mid_blocks=1,
                                    num_heads=2, static_chunk_size=15,
                                    num_decoding_left_chunks=-1),
        cfm=CFMConfig(n_feats=32, inference_cfg_rate=cfg_rate, n_timesteps=3))
    flow = CausalFlow(config).eval()
    randomize(flow, torch.Generator().manual_seed(seed))
    return flow


@pytest.mark.parametrize("cfg_rate", [0.7, 0.0])
def test_small_model_prompt_cache_and_interleaving(cfg_rate: float) -> None:
    flow = _small_flow(cfg_rate, seed=1)
    gen = torch.Generator().manual_seed(2)
    prompt_token = torch.randint(0, 97, (1, 18), generator=gen)  # 3 chunks + 3 tokens
    prompt = (prompt_token, torch.randn(1, 54, 32, generator=gen), torch.randn(1, 24,
                                                                                generator=gen))
    tokens = torch.randint(0, 97, (1, 40), generator=gen)
    lengths = [3, 4, 9, 16, 17, 29, 40]

    speaker = flow.prompt_cache(*prompt)
    assert speaker.encoder.tokens == 15 and speaker.frames == 45  # (18 - 2) // 5 * 5 tokens
    kept = copy.deepcopy(speaker)
    with_prompt_cache = run_cached(flow, tokens, prompt, lengths, speaker.clone())
    assert_all_equal(with_prompt_cache)
    assert_all_equal(run_cached(flow, tokens, prompt, lengths))
    # the speaker's cache was only copied, never written
    assert all(torch.equal(a, b) for a, b in zip(kept.encoder.keys, speaker.encoder.keys,
                                                 strict=True))
    assert all(torch.equal(a, b) for step_a, step_b in zip(kept.estimator, speaker.estimator,
                                                           strict=True)
               for a, b in zip(step_a.keys + step_a.convs, step_b.keys + step_b.convs,
                               strict=True))
    # a cache refuses another prompt
    other = (prompt_token.flip(1), prompt[1], prompt[2])
    with pytest.raises(ValueError, match="another prompt"):
        flow.inference_cached(tokens[:, :10], *other, speaker.clone())

    # two requests interleaved call by call: each equals itself alone
    second = (torch.randint(0, 97, (1, 7), generator=gen), torch.randn(1, 21, 32, generator=gen),
              torch.randn(1, 24, generator=gen))
    caches = [FlowStreamCache(), FlowStreamCache()]
    alone = [run_cached(flow, tokens, p, lengths) for p in (prompt, second)]
    for i, n in enumerate(lengths):
        for k, p in enumerate((prompt, second)):
            emitted = 0 if i == 0 else 3 * (p[0].shape[1] + lengths[i - 1] - 2) - p[1].shape[1]
            out = flow.inference_cached(tokens[:, :n], *p, caches[k],
                                        finalize=i == len(lengths) - 1, skip=emitted)
            assert torch.equal(out, alone[k][i][0])


class _Uncached:
    """The flow without its stream cache: every chunk recomputes everything."""

    def __init__(self, flow: CausalFlow):
        self.flow, self.config = flow, flow.config

    def inference(self, *args, **kwargs) -> torch.Tensor:
        return self.flow.inference(*args, **kwargs)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory):
    path = make_model_dir(tmp_path_factory.mktemp("cv2-cache") / "tiny", "tiny", seed=21)
    return load_model_dir(Path(path), device="cpu", require_frontend=False)


@pytest.mark.parametrize("schedule", [
    default_schedule(25, 10),  # the engine's: hops after the first end on attention chunks
    StreamSchedule(first_hop=7, growth=1.5, max_hop=33, prompt_align=0,
                   full_attention_final=False),
    StreamSchedule(),  # the reference's: aligned hops, full attention in the last call
])
def test_token2wav_streams_with_speaker_cache_equal_recomputation(tiny_models, schedule
                                                                  ) -> None:
    models = tiny_models
    gen = torch.Generator().manual_seed(3)
    prompt_token = torch.randint(0, 6561, (1, 61), generator=gen, dtype=torch.int32)
    prompt_feat = torch.randn(1, 122, 80, generator=gen)
    embedding = torch.randn(1, 192, generator=gen)
    tokens = torch.randint(0, 6561, (131,), generator=gen).tolist()
    cached = Token2Wav(models.flow, models.hift, deterministic=True, schedule=schedule)
    uncached = Token2Wav(_Uncached(models.flow), models.hift, deterministic=True,
                         schedule=schedule)
    assert cached.caches_streams and not uncached.caches_streams
    speaker = cached.prompt_cache(prompt_token, prompt_feat, embedding)
    assert speaker is not None and speaker.encoder.tokens == 50

    def run(driver: Token2Wav, **options) -> list[torch.Tensor]:
        return list(driver.stream(iter(tokens), prompt_token, prompt_feat, embedding,
                                  **options))

    expected = run(uncached)
    traces: list[ChunkTrace] = []
    for chunks in (run(cached, on_chunk=traces.append), run(cached, prompt_cache=speaker)):
        assert len(chunks) == len(expected) >= 3
        assert all(torch.equal(a, b) for a, b in zip(chunks, expected, strict=True))
    if schedule.hop_align:  # every chunk after the first starts on an attention chunk
        assert [(61 + t.token_offset) % 25 for t in traces[2:len(expected)]] \
            == [0] * (len(expected) - 2)
        assert (61 + traces[1].token_offset) % 25 != 0
    with pytest.raises(ValueError, match="no stream cache"):
        uncached.start_stream(prompt_token, prompt_feat, embedding, prompt_cache=speaker)


def test_reduced_precision_cache_is_exact_too(parity) -> None:
    """The modules work in whatever dtype they are cast to; the cache stays exact there."""
    flow, s = parity
    low = copy.deepcopy(flow).to(torch.bfloat16)
    prompt = (s["prompt_token"], s["prompt_feat"], s["embedding"])
    pairs = run_cached(low, s["token"], prompt, [13, 41, 95])
    assert_all_equal(pairs)
    assert all(cached.dtype == torch.float32 for cached, _ in pairs)  # the solver's dtype


def test_prompt_chunks_run_together_as_they_would_apart() -> None:
    """A stream's prompt chunks go through the estimator as one run with a block-causal mask;
    mathematically that is the chunk-by-chunk computation (only the rounding differs)."""
    flow = _small_flow(0.7, seed=4)
    gen = torch.Generator().manual_seed(5)
    prompt = (torch.randint(0, 97, (1, 18), generator=gen), torch.randn(1, 54, 32, generator=gen),
              torch.randn(1, 24, generator=gen))
    tokens = torch.randint(0, 97, (1, 12), generator=gen)
    assert flow.prompt_chunks(18) == 3
    apart = copy.copy(flow)
    apart.group_prompt_chunks = False
    for final in (False, True):
        together = flow.inference(tokens, *prompt, streaming=True, finalize=final)
        separately = apart.inference(tokens, *prompt, streaming=True, finalize=final)
        assert together.shape == separately.shape
        assert (together - separately).abs().max() < 1e-4


@pytest.mark.parametrize("budget_frames", [0, 70, 100])
def test_memory_budget_recomputes_bit_identically(budget_frames: int) -> None:
    """Past its memory budget a stream drops the estimator's keys/values and recomputes one
    Euler step at a time; the output stays bit-identical to the uncached path."""
    flow = _small_flow(0.7, seed=1)
    gen = torch.Generator().manual_seed(2)
    prompt = (torch.randint(0, 97, (1, 18), generator=gen), torch.randn(1, 54, 32, generator=gen),
              torch.randn(1, 24, generator=gen))
    tokens = torch.randint(0, 97, (1, 40), generator=gen)
    lengths = [3, 4, 9, 16, 17, 29, 40]
    budget = flow.stream_cache_bytes_per_frame() * budget_frames
    for start in (FlowStreamCache(), flow.prompt_cache(*prompt).clone()):
        cache = start.with_budget(budget)
        assert_all_equal(run_cached(flow, tokens, prompt, lengths, cache))
        assert cache.lean and cache.estimator == []
    # a budget that is never reached keeps the cache
    cache = FlowStreamCache().with_budget(flow.stream_cache_bytes_per_frame() * 1000)
    assert_all_equal(run_cached(flow, tokens, prompt, lengths, cache))
    assert not cache.lean and cache.estimator


def _stream_inputs(seed: int, prompt_tokens: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    prompt = (torch.randint(0, 97, (1, prompt_tokens), generator=gen),
              torch.randn(1, 3 * prompt_tokens, 32, generator=gen),
              torch.randn(1, 24, generator=gen))
    return prompt, torch.randint(0, 97, (1, 40), generator=gen)


@pytest.mark.parametrize("cfg_rate", [0.7, 0.0])
def test_streams_solved_together_match_each_alone(cfg_rate: float) -> None:
    """Several streams' chunks in one estimator run per Euler step (what the batch scheduler
    does): different prompts, call lengths and cache states (a speaker's prompt cache, an empty
    one, one over its memory budget) give each stream its own output. The packed products may
    round differently from one stream's, so this is a tolerance, not equality."""
    flow = _small_flow(cfg_rate, seed=3)
    streams = [_stream_inputs(4, 18), _stream_inputs(5, 7), _stream_inputs(6, 11)]
    schedules = [[3, 9, 17, 29, 40], [5, 6, 20, 33, 40], [4, 16, 30, 31, 40]]
    alone = [run_cached(flow, tokens, prompt, lengths)
             for (prompt, tokens), lengths in zip(streams, schedules, strict=True)]
    caches = [flow.prompt_cache(*streams[0][0]).clone(), FlowStreamCache(),
              FlowStreamCache().with_budget(1)]  # the third recomputes every call
    emitted = [0, 0, 0]
    worst = 0.0
    for i in range(5):
        final = i == 4
        calls = [flow.begin_cached(tokens[:, :lengths[i]], *prompt, cache, finalize=final,
                                   skip=skip)
                 for (prompt, tokens), lengths, cache, skip
                 in zip(streams, schedules, caches, emitted, strict=True)]
        flow.decoder.solve_streams([call.solve for call in calls])
        for k, call in enumerate(calls):
            out = flow.end_cached(call)
            want = alone[k][i][0]
            assert out.shape == want.shape, (i, k)
            worst = max(worst, (out - want).abs().max().item())
            emitted[k] += out.shape[-1]
    assert caches[2].lean
    print(f"largest difference, together vs alone: {worst:.2e}")
    assert worst < 1e-4, worst


def test_a_stream_cancelled_inside_a_shared_solve_leaves_the_others_intact() -> None:
    import threading

    from tts_core import cancellation

    flow = _small_flow(0.7, seed=7)
    streams = [_stream_inputs(8, 12), _stream_inputs(9, 9)]
    alone = [run_cached(flow, tokens, prompt, [20, 40]) for prompt, tokens in streams]
    cancel = threading.Event()
    caches = [FlowStreamCache(), FlowStreamCache()]
    calls = [flow.begin_cached(tokens[:, :20], *prompt, cache, cancel=event)
             for (prompt, tokens), cache, event in zip(streams, caches, [cancel, None],
                                                       strict=True)]
    estimator, runs = flow.decoder.estimator, []
    original = estimator.forward_chunks

    def cancel_after_first_step(parts, time):  # noqa: ANN001, ANN202 - the wrapped call's
        runs.append(len(parts))
        cancel.set()
        return original(parts, time)

    estimator.forward_chunks = cancel_after_first_step
    try:
        flow.decoder.solve_streams([call.solve for call in calls])
    finally:
        del estimator.forward_chunks
    # the first step ran both streams together, the later ones the survivor alone
    assert runs[0] == 2 and runs[-1] == 1 and runs == sorted(runs, reverse=True)
    with pytest.raises(cancellation.Cancelled):
        flow.end_cached(calls[0])
    out = flow.end_cached(calls[1])
    assert (out - alone[1][0][0]).abs().max().item() < 1e-4
    # the survivor goes on alone and stays right
    rest = flow.inference_cached(streams[1][1], *streams[1][0], caches[1], finalize=True,
                                 skip=out.shape[-1])
    assert (rest - alone[1][1][0]).abs().max().item() < 1e-4


@pytest.mark.parametrize("cfg_rate", [0.7, 0.0])
def test_streams_in_pooled_blocks_equal_recomputation(cfg_rate: float) -> None:
    """Streams whose keys/values live in a block of the arena pool (what the engine's streams
    do, see kv_arena) give the uncached output bit for bit, whoever used the block before: the
    same speaker (its prompt rows are then not copied again), another speaker, a zero-shot
    stream (of another voice) that wrote over the prompt rows, and the speaker again after it."""
    flow = _small_flow(cfg_rate, seed=5)
    prompt_a, tokens = _stream_inputs(6, 18)
    prompt_b, _ = _stream_inputs(7, 23)
    budget = flow.stream_cache_bytes_per_frame() * 200
    lengths = [3, 4, 9, 16, 17, 29, 40]
    speakers = {"a": (prompt_a, flow.prompt_cache(*prompt_a)),
                "b": (prompt_b, flow.prompt_cache(*prompt_b))}
    kept = copy.deepcopy(speakers["a"][1])
    blocks = set()
    for who in ["a", "a", "b", "a", "zero-shot", "a", "a"]:
        prompt, speaker = speakers["b" if who == "zero-shot" else who]
        cache = flow.new_stream_cache(budget, None if who == "zero-shot" else speaker)
        step = cache.estimator[0]
        assert step.room is not None, "the stream got no block"
        blocks.add(step.room.data_ptr())
        assert_all_equal(run_cached(flow, tokens, prompt, lengths, cache))
        assert not cache.lean
        del cache, step  # the stream ends: its block goes back to the pool
    assert flow.arenas.allocated == 1 and len(blocks) == 1, "the block was not reused"
    # the speaker's shared cache was never written through the streams
    for step_a, step_b in zip(kept.estimator, speakers["a"][1].estimator, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(step_a.keys + step_a.values,
                                                     step_b.keys + step_b.values, strict=True))


def test_pooled_blocks_are_shared_out_one_per_live_stream() -> None:
    """Streams alive at once each have their own block; a clone of a stream's cache keeps the
    block out of the pool while it shares rows in it; a stream that leaves its budget gives
    its block back and goes on recomputing, still bit-identical."""
    flow = _small_flow(0.7, seed=5)
    prompt, tokens = _stream_inputs(6, 18)
    lengths = [3, 4, 9, 16, 17, 29, 40]
    budget = flow.stream_cache_bytes_per_frame() * 200
    first, second = flow.new_stream_cache(budget), flow.new_stream_cache(budget)
    assert first.estimator[0].room.data_ptr() != second.estimator[0].room.data_ptr()
    run_cached(flow, tokens, prompt, lengths[:4], first)
    shared = first.clone()
    del first
    assert flow.arenas.free_blocks() == 0  # the clone still reads rows in the block
    del shared
    assert flow.arenas.free_blocks() == 1
    del second
    assert flow.arenas.free_blocks() == 2 and flow.arenas.allocated == 2
    # over budget (100 frames): lean from then on, the block handed back at once
    lean = flow.new_stream_cache(flow.stream_cache_bytes_per_frame() * 100)
    assert_all_equal(run_cached(flow, tokens, prompt, lengths, lean))
    assert lean.lean and flow.arenas.free_blocks() == 3


def test_a_stored_speakers_stream_gets_the_block_that_holds_its_prompt() -> None:
    """Among free blocks, a stream of a stored speaker takes one whose last stream was of the
    same speaker (its prompt rows are in place), not merely the last one given back."""
    flow = _small_flow(0.7, seed=5)
    prompt_a, tokens = _stream_inputs(6, 18)
    prompt_b, _ = _stream_inputs(7, 23)
    budget = flow.stream_cache_bytes_per_frame() * 200
    speaker_a, speaker_b = flow.prompt_cache(*prompt_a), flow.prompt_cache(*prompt_b)
    first = flow.new_stream_cache(budget, speaker_a)
    second = flow.new_stream_cache(budget, speaker_b)
    block_a = first.estimator[0].room.data_ptr()
    del first, second  # b's block is given back last
    again = flow.new_stream_cache(budget, speaker_a)
    assert again.estimator[0].room.data_ptr() == block_a
    assert_all_equal(run_cached(flow, tokens, prompt_a, [3, 4, 9, 16, 17, 29, 40], again))
    assert flow.arenas.allocated == 2
