"""The CosyVoice 3 engine on the batch scheduler (``max_batch`` > 1), as CosyVoice 2 does.

A generated tiny CosyVoice 3 directory; the same engine at ``max_batch`` 1 (sequential, same
seed) is the reference. The LM is teacher-forced (a fixed token sequence, with long silent runs
so the silence thinning is exercised): a batched float32 step rounds in other bits than a
single-row one (log-probabilities within 5e-5, checked on CosyVoice 3's LM in
``test_cv2_batching.py``), and the random tiny model's near-flat distributions make such ulps
enough to flip a sampled token now and then (seen here: a divergence after 6 tokens). With the
tokens fixed, the waveforms of a request in a batch and alone agree within 1e-5.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from tests.scheduler_gate import held_until
from tts_core.batching.cosyvoice2_job import CosyVoice2Job
from tts_core.cosyvoice3.engine import TRAINED_INSTRUCTIONS, CosyVoice3Engine
from tts_core.cosyvoice3.llm import MAX_SILENT_RUN, SILENT_TOKENS, SilenceThinner
from tts_core.engine import Audio, Mode, SynthesisRequest

PROMPT_TEXT = "希望你以后能够做的比我还好呦。"
SAMPLES_PER_TOKEN = 960
WAV_ATOL = 1e-5

torch.set_num_threads(1)


class Teacher:
    """Sampler replaying a fixed sequence (never looking at the log-probabilities); stops
    after ``length`` tokens once the LM's minimum length allows."""

    def __init__(self, tokens: list[int], stop: int, length: int = 40) -> None:
        self.tokens, self.stop, self.length = tokens, stop, length

    def __call__(self, logp: torch.Tensor, decoded: list[int], ignore_eos: bool) -> int:
        if len(decoded) >= self.length and not ignore_eos:
            return self.stop
        return self.tokens[len(decoded) % len(self.tokens)]


def teacher_tokens(size: int) -> list[int]:
    g = torch.Generator().manual_seed(1)
    tokens: list[int] = []
    for _ in range(6):
        tokens += torch.randint(0, size, (9,), generator=g).tolist()
        tokens += [sorted(SILENT_TOKENS)[1]] * (MAX_SILENT_RUN + 3)
    return tokens


@pytest.fixture(scope="module")
def engines(cv3_model_dir: Path) -> tuple[CosyVoice3Engine, CosyVoice3Engine]:
    alone = CosyVoice3Engine.from_model_dir(cv3_model_dir, threads=1, device="cpu", seed=5,
                                            precision="float32")
    batched = CosyVoice3Engine.from_model_dir(cv3_model_dir, threads=1, device="cpu", seed=5,
                                              max_batch=4, precision="float32")
    size = alone.models.lm.config.speech_token_size
    tokens = teacher_tokens(size)
    for engine in (alone, batched):
        engine._sampler = lambda randomness: Teacher(tokens, size)  # type: ignore[method-assign]
    yield alone, batched
    assert batched.scheduler is not None
    batched.scheduler.close()


def mixed_requests(prompt: Audio) -> list[SynthesisRequest]:
    source = Audio(prompt.samples[: prompt.sample_rate * 2], prompt.sample_rate)
    return [
        SynthesisRequest(Mode.ZERO_SHOT, text="今天天气很好，我们去公园散步吧！你好。",
                         prompt=prompt, prompt_text=PROMPT_TEXT),
        SynthesisRequest(Mode.CROSS_LINGUAL, text="Hello there, this is a test.", prompt=prompt,
                         stream=False),
        SynthesisRequest(Mode.INSTRUCT, text="收到好友从远方寄来的生日礼物。", prompt=prompt,
                         instruct_text=TRAINED_INSTRUCTIONS[0]),
        SynthesisRequest(Mode.VOICE_CONVERSION, prompt=prompt, source=source),
    ]


def audio(engine: CosyVoice3Engine, request: SynthesisRequest,
          cancel: threading.Event | None = None) -> np.ndarray:
    chunks = list(engine.synthesize(request, cancel or threading.Event()))
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


def run_together(engine: CosyVoice3Engine, requests_: list[SynthesisRequest],
                 stagger: float = 0.15) -> list[np.ndarray | BaseException | None]:
    """Start the requests ``stagger`` s apart; the scheduler waits for the first two, so two
    share a batch however fast the machine runs the tiny model, and the others join it."""
    got: list[np.ndarray | BaseException | None] = [None] * len(requests_)
    scheduler = engine.scheduler
    assert scheduler is not None

    def run(i: int) -> None:
        time.sleep(stagger * i)  # interleaved starts: each joins a batch already running
        try:
            got[i] = audio(engine, requests_[i])
        except BaseException as error:  # noqa: BLE001 - handed to the test
            got[i] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests_))]
    with held_until(scheduler, 2):
        for th in threads:
            th.start()
        for th in threads:
            th.join(180)
    return got


def test_registry_gives_cosyvoice3_a_scheduler(cv3_model_dir: Path) -> None:
    from tts_core.registry import create_engine

    engine = create_engine("cosyvoice3", model_dir=cv3_model_dir, threads=1, device="cpu",
                           precision="float32", max_batch=2)
    try:
        assert engine.scheduler is not None and engine.batch_occupancy() == (0, 2)
    finally:
        engine.scheduler.close()


def test_batch_gives_the_audio_of_each_request_alone(engines, prompt: Audio) -> None:
    alone, batched = engines
    requests_ = mixed_requests(prompt)
    want = [audio(alone, r) for r in requests_]
    got = run_together(batched, requests_)
    assert batched.scheduler is not None and batched.scheduler.stats.peak_batch >= 2
    for w, g in zip(want, got, strict=True):
        assert isinstance(g, np.ndarray) and len(g) == len(w) > 0
        assert len(g) % SAMPLES_PER_TOKEN == 0
        np.testing.assert_allclose(g, w, atol=WAV_ATOL, rtol=0)


class SilentRuns:
    """Sampler that answers a fixed pattern with long runs of silent tokens."""

    def __init__(self, pattern: list[int]) -> None:
        self.pattern = pattern

    def __call__(self, logp: torch.Tensor, decoded: list[int], ignore_eos: bool) -> int:
        return self.pattern[len(decoded) % len(self.pattern)]


def test_long_silences_are_thinned_in_the_batch_too(engines, prompt: Audio,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    silent = sorted(SILENT_TOKENS)[0]
    pattern = [7, *[silent] * (MAX_SILENT_RUN + 4), 8]
    alone, batched = engines
    for engine in engines:
        monkeypatch.setattr(engine, "_sampler", lambda randomness: SilentRuns(pattern))
    request = SynthesisRequest(Mode.CROSS_LINGUAL, text="Hello there.", prompt=prompt)
    want, got = audio(alone, request), audio(batched, request)
    text_ids = alone.tokenizer.encode(alone.text.segments(request.text)[0])
    made = int(len(text_ids) * alone.models.lm.config.max_token_text_ratio)  # never stops
    expected_tokens, run = 0, 0
    for token in (pattern * made)[:made]:
        run = run + 1 if token == silent else 0
        expected_tokens += run <= MAX_SILENT_RUN
    assert expected_tokens < made  # something was thinned
    assert len(want) == expected_tokens * SAMPLES_PER_TOKEN
    assert len(got) == len(want)
    np.testing.assert_allclose(got, want, atol=WAV_ATOL, rtol=0)


def test_silence_thinner_is_drop_long_silences_token_by_token() -> None:
    silent = sorted(SILENT_TOKENS)
    tokens = [3, *[silent[0]] * 7, 4, silent[1], silent[2], *[silent[3]] * 9, 5]
    keep = SilenceThinner()
    engine = CosyVoice3Engine.__new__(CosyVoice3Engine)
    assert [t for t in tokens if keep(t)] == list(engine._lm_tokens(iter(tokens)))


def test_cancel_in_the_middle_of_a_batch(engines, prompt: Audio) -> None:
    alone, batched = engines
    request = mixed_requests(prompt)[0]
    want = audio(alone, request)
    cancel = threading.Event()
    result: dict[str, np.ndarray] = {}
    th = threading.Thread(target=lambda: result.update(other=audio(batched, request)))
    th.start()
    chunks = batched.synthesize(request, cancel)
    assert len(next(chunks)) > 0
    cancel.set()
    assert list(chunks) == []  # nothing more once cancelled, not even chunks already made
    th.join(180)
    np.testing.assert_allclose(result["other"], want, atol=WAV_ATOL, rtol=0)
    deadline = time.monotonic() + 5
    while batched.batch_occupancy()[0] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batched.batch_occupancy() == (0, 4)


def test_bad_request_joining_a_running_batch_fails_alone(engines, prompt: Audio) -> None:
    """A job whose LM prompt lacks ``<|endofprompt|>`` joins while another request decodes: it
    fails with a clear error, the other one gives its audio unchanged."""
    alone, batched = engines
    assert batched.scheduler is not None
    request = mixed_requests(prompt)[0]
    want = audio(alone, request)
    result: dict[str, np.ndarray] = {}
    th = threading.Thread(target=lambda: result.update(good=audio(batched, request)))
    th.start()
    deadline = time.monotonic() + 60
    while batched.batch_occupancy()[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    voice = dataclasses.replace(batched._voice(request), lm_prompt_text_ids=[])
    bad = CosyVoice2Job(batched.models.lm, batched.token2wav, voice,
                        [batched.tokenizer.encode("你好。")],
                        lambda: batched._sampler(batched._randomness()), None, threading.Event(),
                        stream=True)
    batched.scheduler.submit(bad)
    with pytest.raises(ValueError, match="endofprompt"):
        list(bad.chunks())
    th.join(180)
    np.testing.assert_allclose(result["good"], want, atol=WAV_ATOL, rtol=0)


def test_service_runs_cosyvoice3_batched_and_scrapes_batch_occupancy(cv3_model_dir: Path,
                                                                     tmp_path: Path) -> None:
    """--engine cosyvoice3 --max-batch 2 through the real launcher: two streams in one batch,
    GetServerStatus and the /metrics gauges show it."""
    import grpc
    from conftest import AUDIO_DIR, collect_replies, start_stack, stop_stack

    from service.gen.cosyvoice.v1 import tts_pb2, tts_pb2_grpc
    from tests.test_metrics import parse, value

    stack = start_stack(tmp_path / "stack", max_concurrent=1, max_queue=1,
                        extra_args=("--engine", "cosyvoice3", "--model-dir", str(cv3_model_dir),
                                    "--max-batch", "2"))
    try:
        def scrape() -> dict:
            return parse(requests.get(stack.metrics_url, timeout=10).text)

        idle = scrape()
        assert value(idle, "cosyvoice_max_batch") == 2
        assert value(idle, "cosyvoice_batch_occupancy") == 0
        prompt = tts_pb2.PromptAudio(data=(AUDIO_DIR / "zero_shot_prompt.wav").read_bytes(),
                                     format=tts_pb2.PROMPT_AUDIO_FORMAT_CONTAINER)
        request = tts_pb2.SynthesizeRequest(
            text="收到好友从远方寄来的生日礼物。" * 3,
            zero_shot=tts_pb2.ZeroShotMode(prompt_audio=prompt, prompt_text=PROMPT_TEXT))
        with grpc.insecure_channel(stack.grpc_target) as channel:
            stub = tts_pb2_grpc.TextToSpeechServiceStub(channel)
            calls = [stub.Synthesize(request, metadata=stack.metadata, timeout=300)
                     for _ in range(2)]
            peak_status = peak_metric = 0
            deadline = time.monotonic() + 120
            while (peak_status < 2 or peak_metric < 2) and time.monotonic() < deadline:
                peak_status = max(peak_status, int(stack.status().get("batch_occupancy", 0)))
                peak_metric = max(peak_metric, value(scrape(), "cosyvoice_batch_occupancy"))
                time.sleep(0.05)
            assert (peak_status, peak_metric) == (2, 2)
            for call in calls:
                chunks, stats = collect_replies(call)
                assert chunks and stats.audio_seconds > 0
        assert int(stack.wait_idle().get("batch_occupancy", 0)) == 0
        assert value(scrape(), "cosyvoice_batch_occupancy") == 0
    finally:
        stop_stack(stack)
