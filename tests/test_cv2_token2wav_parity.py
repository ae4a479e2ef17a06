"""Token-to-waveform driver: reference vectors (one shot and streaming) and per-request state.

Two kinds of check:
* stage-isolated: the flow's part is replayed from the recorded flow outputs (the replay also
  asserts that the driver makes exactly the reference's flow calls), so the driver's caches,
  cross-fade and vocoder are held to the tight stage tolerance;
* end to end: the real flow model (tts_core.cosyvoice2.flow) from the recorded tokens.

Flow and vocoder are the ones the model-directory loader builds for the engine. The streaming
schedule and the cache sizes come from the vectors' metadata, the ratios from the flow's config.
"""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
import torch

from tests.cv2_parity import metadata, parity_models, reference_stream_schedule, vectors
from tts_core.cosyvoice2.flow import CausalFlow
from tts_core.cosyvoice2.hift import HiFTGenerator
from tts_core.cosyvoice2.token2wav import ChunkTrace, StreamSchedule, Token2Wav

STAGE_ATOL = 1e-4  # README: flow mel and vocoder stages fed recorded tensors
F0_RTOL = 1e-5
E2E_ATOL = 5e-2  # README: end-to-end waveforms, given the vocoder's sensitivity
E2E_RMS = 1e-2

CHUNK_TENSORS = [  # (ChunkTrace field, vector suffix)
    ("hift_in_mel", "hift_in_mel"),
    ("cache_source", "hift_in_cache_source"),
    ("hift_out_wav", "hift_out_wav"),
    ("hift_out_source", "hift_out_source"),
    ("wav", "wav"),
]


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).pow(2).mean().sqrt().item()


load = vectors


@pytest.fixture(scope="module", autouse=True)
def _threads() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def hift() -> HiFTGenerator:
    return parity_models().hift


@pytest.fixture(scope="module")
def flow() -> CausalFlow:
    return parity_models().flow


@pytest.fixture(scope="module")
def schedule() -> StreamSchedule:
    """The reference driver's schedule, as recorded with the streaming flow calls."""
    meta = metadata("flow_stream")
    return StreamSchedule(first_hop=int(meta["token_hop_len"]),
                          growth=float(meta["stream_scale_factor"]),
                          max_hop=int(meta["token_max_hop_len"]))


@pytest.fixture(scope="module")
def driver_options(schedule) -> dict:
    mel_cache_len = int(metadata("token2wav_stream")["mel_cache_len"])
    return {"schedule": schedule, "mel_cache_len": mel_cache_len}


@pytest.fixture(scope="module")
def t2w(flow, hift, driver_options) -> Token2Wav:
    return Token2Wav(flow, hift, deterministic=True, **driver_options)


@pytest.fixture(scope="module")
def stream_vec() -> dict[str, torch.Tensor]:
    return load("token2wav_stream")


class ReplayFlow:
    """Returns the recorded flow outputs in order, checking each call against the record."""

    def __init__(self, calls: list[tuple[int, bool, bool, torch.Tensor]], token: torch.Tensor,
                 ratio: int, lookahead: int):
        self.calls = calls
        self.token = token
        self.token_mel_ratio = ratio
        self.pre_lookahead_len = lookahead
        self.made = 0

    def inference(self, token, prompt_token, prompt_feat, embedding, streaming, finalize):
        length, want_streaming, want_finalize, mel = self.calls[self.made]
        self.made += 1
        assert token.shape == (1, length)
        assert torch.equal(token.long(), self.token[:, :length].long())
        assert (streaming, finalize) == (want_streaming, want_finalize)
        return mel


def run_stream(driver: Token2Wav, vec: dict[str, torch.Tensor], token: torch.Tensor | None = None,
               **options) -> tuple[list[torch.Tensor], list[ChunkTrace]]:
    traces: list[ChunkTrace] = []
    stream = driver.start_stream(vec["prompt_token"], vec["prompt_feat"], vec["embedding"],
                                 on_chunk=traces.append, **options)
    chunks: list[torch.Tensor] = []
    for t in (vec["token"] if token is None else token)[0].tolist():
        chunks += stream.push([t])  # one token at a time, as the LLM yields them
    chunks.append(stream.finish())
    return chunks, traces


def check_stream_against_record(chunks, traces, vec, hift, tolerance: float, label: str) -> None:
    n = len(traces)
    assert n == vec["chunk_token_len"].numel()
    assert [t.token_len for t in traces] == vec["chunk_token_len"].tolist()
    assert [t.token_offset for t in traces] == vec["chunk_token_offset"].tolist()
    assert [t.streaming for t in traces] == vec["chunk_stream_flag"].tolist()
    assert [t.finalize for t in traces] == vec["chunk_finalize"].tolist()
    report = []
    for i, trace in enumerate(traces):
        errors = {}
        for attr, suffix in CHUNK_TENSORS:
            errors[suffix] = max_abs(getattr(trace, attr), vec[f"chunk{i}_{suffix}"])
        with torch.inference_mode():
            f0 = hift.predict_f0(trace.hift_in_mel)
        errors["hift_f0"] = max_abs(f0, vec[f"chunk{i}_hift_f0"])
        mel_tol = STAGE_ATOL  # the mel is the flow's output, tight in both kinds of test
        assert errors["hift_in_mel"] <= mel_tol, (i, errors)
        for key in ("hift_in_cache_source", "hift_out_wav", "hift_out_source", "wav"):
            assert errors[key] <= tolerance, (i, key, errors)
        ref_f0 = vec[f"chunk{i}_hift_f0"]
        rel = ((f0 - ref_f0).abs() / ref_f0.abs().clamp(min=1.0)).max().item()
        assert rel <= (F0_RTOL if tolerance == STAGE_ATOL else 1e-2), (i, rel)
        assert torch.equal(chunks[i], trace.wav)
        report.append(f"chunk{i}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    wav = torch.cat(chunks, dim=1)
    assert wav.shape == vec["wav"].shape
    assert [c.shape[1] for c in chunks] == [vec[f"chunk{i}_wav"].shape[1] for i in range(n)]
    assert max_abs(wav, vec["wav"]) <= tolerance
    if tolerance > STAGE_ATOL:
        assert rms(wav, vec["wav"]) <= E2E_RMS
    print(f"\n[{label}] final wav max abs {max_abs(wav, vec['wav']):.2e}, "
          f"rms {rms(wav, vec['wav']):.2e}\n  " + "\n  ".join(report))


# --- stage-isolated (recorded flow outputs) ------------------------------------------------


def replay_of(flow: CausalFlow, calls, token: torch.Tensor) -> ReplayFlow:
    return ReplayFlow(calls, token, flow.config.token_mel_ratio, flow.config.pre_lookahead_len)


def test_stream_driver_with_recorded_flow_outputs(flow, hift, driver_options, stream_vec) -> None:
    flow_vec = load("flow_stream")
    calls = [(int(flow_vec["chunk_token_len"][i]), bool(flow_vec["chunk_stream_flag"][i]),
              bool(flow_vec["chunk_finalize"][i]), flow_vec[f"chunk{i}_mel"])
             for i in range(flow_vec["chunk_token_len"].numel())]
    replay = replay_of(flow, calls, stream_vec["token"])
    driver = Token2Wav(replay, hift, deterministic=True, **driver_options)
    assert driver.source_cache_len == int(metadata("token2wav_stream")["source_cache_len"])
    chunks, traces = run_stream(driver, stream_vec)
    assert replay.made == len(calls)
    assert driver.speech_window.dtype == torch.float64
    assert torch.equal(driver.speech_window, stream_vec["speech_window"])
    check_stream_against_record(chunks, traces, stream_vec, hift, STAGE_ATOL, "replayed flow")


def test_nonstream_driver_with_recorded_flow_output(flow, hift) -> None:
    vec = load("token2wav_nonstream")
    n = vec["token"].shape[1]
    replay = replay_of(flow, [(n, False, True, vec["mel"])], vec["token"])
    driver = Token2Wav(replay, hift, deterministic=True)
    wav = driver.synthesize(vec["token"], vec["prompt_token"], vec["prompt_feat"],
                            vec["embedding"])
    assert wav.shape == (1, n * driver.samples_per_token)
    assert int(metadata("token2wav_nonstream")["sample_rate"]) == driver.sample_rate
    assert max_abs(wav, vec["wav"]) <= STAGE_ATOL
    with torch.inference_mode():
        f0 = hift.predict_f0(vec["mel"])
        source, _ = hift.source_from_f0(vec["f0"], deterministic=True)
    torch.testing.assert_close(f0, vec["f0"], rtol=F0_RTOL, atol=1e-6)
    assert max_abs(source, vec["source"]) <= STAGE_ATOL
    print(f"\n[replayed flow] nonstream wav {max_abs(wav, vec['wav']):.2e}, "
          f"f0 {max_abs(f0, vec['f0']):.2e}, source {max_abs(source, vec['source']):.2e}")


# --- end to end (real flow) ------------------------------------------------------------------


def test_nonstream_end_to_end(t2w, hift) -> None:
    vec = load("token2wav_nonstream")
    args = (vec["token"], vec["prompt_token"], vec["prompt_feat"], vec["embedding"])
    mel = t2w.flow.inference(*args, streaming=False, finalize=True)
    assert max_abs(mel, vec["mel"]) <= STAGE_ATOL
    wav, source = hift.inference(mel, deterministic=True)
    with torch.inference_mode():
        f0 = hift.predict_f0(mel)
    assert ((f0 - vec["f0"]).abs() / vec["f0"].clamp(min=1.0)).max().item() <= 1e-2
    assert max_abs(source, vec["source"]) <= E2E_ATOL
    driven = t2w.synthesize(*args)
    assert torch.equal(driven, wav)
    assert max_abs(driven, vec["wav"]) <= E2E_ATOL and rms(driven, vec["wav"]) <= E2E_RMS
    print(f"\n[e2e] nonstream mel {max_abs(mel, vec['mel']):.2e}, f0 {max_abs(f0, vec['f0']):.2e}"
          f", source {max_abs(source, vec['source']):.2e}, wav {max_abs(driven, vec['wav']):.2e}"
          f" (rms {rms(driven, vec['wav']):.2e})")


def test_stream_end_to_end(t2w, hift, stream_vec) -> None:
    chunks, traces = run_stream(t2w, stream_vec)
    check_stream_against_record(chunks, traces, stream_vec, hift, E2E_ATOL, "e2e")


def traced_schedule(traces: list[ChunkTrace]) -> list[tuple[int, int, bool, bool]]:
    return [(t.token_len, t.token_offset, t.streaming, t.finalize) for t in traces]


def readme_schedule(t2w: Token2Wav, request: dict[str, torch.Tensor],
                    schedule: StreamSchedule) -> list[tuple[int, int, bool, bool]]:
    """The reference driver's calls for this request (README rule, independent of our driver)."""
    return reference_stream_schedule(
        request["prompt_token"].shape[1], request["token"].shape[1], schedule.first_hop,
        schedule.max_hop, int(schedule.growth), t2w.pre_lookahead_len)


def _second_request(vec: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Another request: a shorter prompt and the tokens in another order."""
    prompt = max(1, vec["prompt_token"].shape[1] * 2 // 3)
    ratio = vec["prompt_feat"].shape[1] // vec["prompt_token"].shape[1]
    tokens = max(1, vec["token"].shape[1] * 5 // 6)
    return {"prompt_token": vec["prompt_token"][:, :prompt],
            "prompt_feat": vec["prompt_feat"][:, :prompt * ratio],
            "embedding": -vec["embedding"], "token": vec["token"].flip(1)[:, :tokens]}


def _long_request(vec: dict[str, torch.Tensor], at_least: int) -> dict[str, torch.Tensor]:
    """The recorded request with its tokens repeated until there are ``at_least``."""
    token = vec["token"]
    repeats = -(-at_least // token.shape[1])
    return {**vec, "token": token.repeat(1, repeats)}


def test_interleaved_streams_equal_each_alone(t2w, schedule, stream_vec) -> None:
    requests = [stream_vec, _second_request(stream_vec)]
    runs = [run_stream(t2w, r) for r in requests]
    alone = [chunks for chunks, _ in runs]
    for request, (_, traces) in zip(requests, runs, strict=True):  # other P and N than recorded
        assert traced_schedule(traces) == readme_schedule(t2w, request, schedule)
    again = [run_stream(t2w, r)[0] for r in requests]  # a request after others: same chunks
    for first, second in zip(alone, again, strict=True):
        assert [c.shape[1] for c in first] == [c.shape[1] for c in second]
        assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))

    streams = [t2w.start_stream(r["prompt_token"], r["prompt_feat"], r["embedding"])
               for r in requests]
    tokens = [r["token"][0].tolist() for r in requests]
    out: list[list[torch.Tensor]] = [[], []]
    for i in range(max(map(len, tokens))):
        for k in (1, 0):
            if i < len(tokens[k]):
                out[k] += streams[k].push([tokens[k][i]])
    for k in (0, 1):
        out[k].append(streams[k].finish())
        assert [c.shape[1] for c in out[k]] == [c.shape[1] for c in alone[k]]
        assert all(torch.equal(a, b) for a, b in zip(out[k], alone[k], strict=True))

    # and truly concurrent: one thread per request on the same shared driver
    results: dict[int, list[torch.Tensor]] = {}
    threads = [threading.Thread(target=lambda k=k: results.__setitem__(
        k, run_stream(t2w, requests[k])[0])) for k in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for k in (0, 1):
        assert all(torch.equal(a, b) for a, b in zip(results[k], alone[k], strict=True))


def test_smaller_first_chunk_is_shorter_and_keeps_the_total(t2w, schedule, stream_vec) -> None:
    reference_schedule, small_schedule = schedule, replace(schedule, first_hop=10)
    prompt = stream_vec["prompt_token"].shape[1]
    ref_first = reference_schedule.first_hop + reference_schedule.prompt_pad(prompt)
    small_first = small_schedule.first_hop + small_schedule.prompt_pad(prompt)
    # enough tokens for several chunks whatever the recorded length
    request = _long_request(stream_vec, 3 * (ref_first + t2w.pre_lookahead_len))
    reference, ref_traces = run_stream(t2w, request, schedule=reference_schedule)
    small, small_traces = run_stream(t2w, request, schedule=small_schedule)
    assert traced_schedule(ref_traces) == readme_schedule(t2w, request, reference_schedule)
    assert ref_traces[0].token_len == ref_first + t2w.pre_lookahead_len
    assert small_traces[0].token_len == small_first + t2w.pre_lookahead_len
    assert small_first < ref_first
    assert small[0].shape[1] == small_first * t2w.samples_per_token - t2w.source_cache_len
    assert small[0].shape[1] < reference[0].shape[1]
    n = request["token"].shape[1]
    total = sum(c.shape[1] for c in small)
    assert total == sum(c.shape[1] for c in reference) == n * t2w.samples_per_token
    assert len(small) > len(reference)
    # its quality cost is measured by scripts/bench_cv2_stream_quality.py
    whole = torch.cat(small, 1)
    assert torch.isfinite(whole).all() and whole.abs().max() <= 0.99


def test_stream_helper_equals_push_and_finish(t2w, stream_vec) -> None:
    chunks, _ = run_stream(t2w, stream_vec)
    helper = list(t2w.stream(iter(stream_vec["token"][0].tolist()), stream_vec["prompt_token"],
                             stream_vec["prompt_feat"], stream_vec["embedding"]))
    assert len(helper) == len(chunks)
    assert all(torch.equal(a, b) for a, b in zip(helper, chunks, strict=True))


def test_cancel_stops_between_chunks(t2w, schedule, stream_vec) -> None:
    cancel = threading.Event()
    stream = t2w.start_stream(stream_vec["prompt_token"], stream_vec["prompt_feat"],
                              stream_vec["embedding"], cancel=cancel,
                              on_chunk=lambda trace: cancel.set())
    two_chunks = (schedule.first_hop + schedule.prompt_pad(stream_vec["prompt_token"].shape[1])
                  + schedule.next_hop(schedule.first_hop) + t2w.pre_lookahead_len)
    request = _long_request(stream_vec, two_chunks)  # enough tokens for two chunks
    ready = stream.push(request["token"][0])
    assert len(ready) == 1 and stream.cancelled and stream.chunks == 1
    assert stream.finish().shape == (1, 0)


def test_random_excitation_per_stream_generator(flow, hift, driver_options, stream_vec) -> None:
    driver = Token2Wav(flow, hift, **driver_options)  # random excitation, as in real synthesis
    runs = [torch.cat(run_stream(driver, stream_vec,
                                 generator=torch.Generator().manual_seed(seed))[0], 1)
            for seed in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_misuse_is_refused(t2w, stream_vec) -> None:
    too_short = StreamSchedule(first_hop=t2w.mel_cache_len // t2w.token_mel_ratio)
    with pytest.raises(ValueError, match="first_hop"):  # leaves nothing beyond the overlap
        t2w.start_stream(stream_vec["prompt_token"], stream_vec["prompt_feat"],
                         stream_vec["embedding"], schedule=too_short)
    with pytest.raises(ValueError, match="growth"):
        StreamSchedule(growth=0.5)
    stream = t2w.start_stream(stream_vec["prompt_token"], stream_vec["prompt_feat"],
                              stream_vec["embedding"])
    assert stream.finish().shape == (1, 0)  # no tokens at all: nothing to say
    with pytest.raises(RuntimeError, match="after finish"):
        stream.push([1, 2, 3])
    with pytest.raises(RuntimeError, match="twice"):
        stream.finish()
