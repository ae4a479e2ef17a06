"""Continuous batching (tts_core.batching): a request inside a batch gives what it gives alone.

LM-level tests drive the scheduler with teacher-forced jobs on the parity directory's LM and
compare every step's log-probabilities with the sequential path (``CosyVoice2LM.inference``) and
with the reference vectors. Engine-level tests run the CosyVoice 2 engine on a generated
directory with ``max_batch`` > 1 against the same engine at ``max_batch`` 1 (same seed).

Tolerance: in float32 a batched [B, D] matmul may sum in another order than the [1, D] one
(other GEMM kernels and blockings), so log-probabilities may differ in the last bits. Measured on
this machine (torch 2.13 CPU, parity LM, chunked prefill included): at most 1.2e-5 on
log-probabilities of magnitude ~9, i.e. about 12 float32 ulps (one ulp there is 9.5e-7). We allow
``BATCH_LOGP_ATOL`` = 5e-5, four times that and still half the 1e-4 the parity README suggests
for an independent implementation; tokens under teacher forcing must be identical.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from tests.cv2_parity import parity_models, vectors
from tests.scheduler_gate import held_until
from tts_core.batching.lm_batch import BackboneLM, batched_decode, packed_forward
from tts_core.batching.scheduler import BatchScheduler
from tts_core.cosyvoice2.engine import CosyVoice2Engine
from tts_core.cosyvoice2.llm import SOS_ROW, TASK_ID_ROW, CosyVoice2LM, DecodeStep
from tts_core.cosyvoice2.sampling import RasSampler
from tts_core.cosyvoice2.testing.make_model_dir import make_model_dir
from tts_core.engine import Audio, Mode, SynthesisRequest
from tts_core.memory import format_gib

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
BATCH_LOGP_ATOL = 5e-5
PROMPT_TEXT = "希望你以后能够做的比我还好呦。"

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- LM level


class TeacherJob:
    """An LM-only job: fixed prompt rows, then forced tokens (or its own seeded sampler)."""

    def __init__(self, lm: CosyVoice2LM, prompt_rows: torch.Tensor, tokens: list[int],
                 sampler: RasSampler | None = None, steps: int | None = None,
                 start_step: int = 0, fail_at: int | None = None) -> None:
        self.lm = lm
        self.cache = lm.llm.model.model.new_cache()
        self.rows: torch.Tensor | None = prompt_rows
        self.tokens = tokens
        self.sampler = sampler
        self.steps = steps if steps is not None else len(tokens)
        self.start_step = start_step
        self.fail_at = fail_at
        self.scheduler: BatchScheduler | None = None
        self.logps: list[torch.Tensor] = []
        self.out: list[int] = []
        self.accept_steps: list[int] = []
        self.error: BaseException | None = None
        self.finished = threading.Event()
        self.cancelled = False

    def lm_inputs(self) -> torch.Tensor | None:
        assert self.scheduler is not None
        if self.scheduler.stats.steps < self.start_step:
            return None
        return self.rows

    def lm_cache(self):
        return self.cache

    def lm_accept(self, logp: torch.Tensor) -> None:
        assert self.scheduler is not None
        index = len(self.logps)
        if self.fail_at is not None and index == self.fail_at:
            raise ValueError(f"this request breaks at step {index}")
        self.logps.append(logp.clone())
        self.accept_steps.append(self.scheduler.stats.steps)
        if self.sampler is not None:
            token = self.sampler(logp, self.out, True)
        else:
            token = self.tokens[index]
        self.out.append(token)
        if len(self.out) >= self.steps:
            self.rows = None
            self.finished.set()
        else:
            self.rows = self.lm.speech_embedding.weight.detach()[token][None]

    def output_due(self) -> bool:
        return False

    def output_rank(self, now: float) -> tuple[int, float]:
        return (1, float("inf"))

    def run_output(self) -> None:
        raise AssertionError("no output work")

    def done(self) -> bool:
        return self.finished.is_set()

    def stopped(self) -> bool:
        return self.cancelled

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.finished.set()


def prompt_rows(lm: CosyVoice2LM, text: list[int], prompt_text: list[int],
                prompt_speech: list[int]) -> torch.Tensor:
    parts = [lm._special_row(SOS_ROW)[0], lm.embed_text(prompt_text + text)[0],
             lm._special_row(TASK_ID_ROW)[0]]
    if prompt_speech:
        parts.append(lm.embed_speech(prompt_speech)[0])
    return torch.cat(parts)


def sequential_logps(lm: CosyVoice2LM, text: list[int], prompt_text: list[int],
                     prompt_speech: list[int], tokens: list[int]) -> list[torch.Tensor]:
    """The sequential path's log-probabilities under teacher forcing (one per token)."""
    steps: list[DecodeStep] = []
    forced = iter(tokens)

    def sampler(logp: torch.Tensor, decoded: list[int], ignore_eos: bool) -> int:
        return next(forced, lm.config.eos_token)

    out = list(lm.inference(text, prompt_text, prompt_speech, sampler,
                            min_token_text_ratio=0, max_token_text_ratio=1000,
                            on_step=steps.append))
    assert out == tokens
    return [s.logp for s in steps[:len(tokens)]]


def run_jobs(lm: CosyVoice2LM, jobs: list[TeacherJob], max_batch: int | None = None,
             prefill_chunk: int = 64, together: bool = False,
             backbone_lm: BackboneLM | None = None) -> BatchScheduler:
    """``together``: no step is taken before every job is in (see held_until);
    ``backbone_lm``: the scheduler's LM (default: the backbone with the speech head)."""
    backbone_lm = backbone_lm or BackboneLM(lm.llm.model.model, lm.llm_decoder)
    scheduler = BatchScheduler(backbone_lm, max_batch or len(jobs), prefill_chunk=prefill_chunk)
    try:
        with held_until(scheduler, len(jobs) if together else 0):
            for job in jobs:
                job.scheduler = scheduler
                scheduler.submit(job)
        deadline = time.monotonic() + 60
        while not all(job.done() or job.error is not None for job in jobs):
            assert time.monotonic() < deadline, "jobs did not finish"
            time.sleep(0.002)
    finally:
        scheduler.close()
    return scheduler


def ids(t: torch.Tensor) -> list[int]:
    return [int(i) for i in t.flatten()]


@pytest.fixture(scope="module")
def lm() -> CosyVoice2LM:
    return parity_models().lm


@pytest.fixture(scope="module")
def requests(lm: CosyVoice2LM) -> list[tuple[list[int], list[int], list[int], list[int]]]:
    """(text, prompt text, prompt speech, forced tokens) of requests with different lengths."""
    v = vectors("llm_teacher_forced")
    text, ptext, pspeech = ids(v["text"]), ids(v["prompt_text"]), ids(v["prompt_speech_token"])
    forced = ids(v["forced_speech_token"])
    return [(text, ptext, pspeech, forced),
            (text[:4], [], [], forced[:12]),
            (text + text, ptext, pspeech[:7], forced[::-1] + forced[:9]),
            (text[3:], ptext[:2], pspeech, forced[5:])]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def test_batched_decode_step_equals_single_steps(lm: CosyVoice2LM) -> None:
    """The batched step against Qwen2Model.forward, one request at a time, 3 cache lengths."""
    backbone = lm.llm.model.model
    gen = torch.Generator().manual_seed(0)
    d = backbone.config.hidden_size
    prompts = [torch.randn(1, n, d, generator=gen) for n in (3, 17, 40)]
    alone, batched = [], []
    for p in prompts:
        for caches in (alone, batched):
            cache = backbone.new_cache()
            backbone(p, cache)
            caches.append(cache)
    for _ in range(5):
        rows = torch.randn(3, d, generator=gen)
        got = batched_decode(backbone, rows, batched)
        want = torch.cat([backbone(rows[i][None, None], alone[i])[0] for i in range(3)])
        torch.testing.assert_close(got, want, atol=BATCH_LOGP_ATOL, rtol=0)
    assert [len(c) for c in batched] == [len(c) for c in alone] == [8, 22, 45]


def test_packed_forward_equals_each_request_alone(lm: CosyVoice2LM) -> None:
    """Several requests' rows in one call, against Qwen2Model.forward one request at a time:
    fresh caches, a cache already holding a prompt's first part, and a single row."""
    backbone = lm.llm.model.model
    gen = torch.Generator().manual_seed(1)
    d = backbone.config.hidden_size
    history = {0: 0, 1: 9, 2: 0, 3: 30}  # cached positions before the call
    lengths = {0: 12, 1: 5, 2: 1, 3: 27}
    alone, packed = [], []
    for i in range(4):
        before = torch.randn(1, history[i], d, generator=gen)
        for caches in (alone, packed):
            cache = backbone.new_cache()
            if history[i]:
                backbone(before, cache)
            caches.append(cache)
    segments = [torch.randn(lengths[i], d, generator=gen) for i in range(4)]
    got = packed_forward(backbone, segments, packed)
    want = torch.cat([backbone(s[None], c)[0, -1:] for s, c in zip(segments, alone, strict=True)])
    torch.testing.assert_close(got, want, atol=BATCH_LOGP_ATOL, rtol=0)
    assert [len(c) for c in packed] == [len(c) for c in alone] == [12, 14, 1, 57]
    # and every cached key/value equals the sequential one, so decoding goes on the same way
    rows = torch.randn(4, d, generator=gen)
    torch.testing.assert_close(batched_decode(backbone, rows, packed),
                               batched_decode(backbone, rows, alone), atol=BATCH_LOGP_ATOL, rtol=0)


def test_prompts_that_arrive_together_are_fed_in_one_call(lm: CosyVoice2LM, requests) -> None:
    jobs = [TeacherJob(lm, prompt_rows(lm, t, pt, ps), f) for t, pt, ps, f in requests]
    rows = sum(job.rows.shape[0] for job in jobs)
    scheduler = run_jobs(lm, jobs, prefill_chunk=rows, together=True)
    assert scheduler.stats.prefill_calls == 1 and scheduler.stats.prefill_rows == rows
    for job, (t, pt, ps, f) in zip(jobs, requests, strict=True):
        assert job.error is None and job.out == f
        assert max_diff(job.logps, sequential_logps(lm, t, pt, ps, f)) <= BATCH_LOGP_ATOL
    # a budget smaller than all of them: oldest first, the rest in later calls
    jobs = [TeacherJob(lm, prompt_rows(lm, t, pt, ps), f) for t, pt, ps, f in requests]
    first = jobs[0].rows.shape[0]
    scheduler = run_jobs(lm, jobs, prefill_chunk=first + 3, together=True)
    assert scheduler.stats.prefill_calls > 1 and scheduler.stats.prefill_rows == rows
    assert all(job.error is None and job.out == f
               for job, (*_, f) in zip(jobs, requests, strict=True))


class SilentTeacherJob(TeacherJob):
    """A teacher job that has delivered no audio yet (a newcomer's rank)."""

    def output_rank(self, now: float) -> tuple[int, float]:
        return (0, 0.0)


def test_prompts_are_not_split_while_no_stream_is_playing(lm: CosyVoice2LM, requests) -> None:
    """The per-step row limit protects streams a listener hears; with none playing, every
    waiting prompt goes in at once, whatever the limit."""
    jobs = [SilentTeacherJob(lm, prompt_rows(lm, t, pt, ps), f) for t, pt, ps, f in requests]
    rows = sum(job.rows.shape[0] for job in jobs)
    scheduler = run_jobs(lm, jobs, prefill_chunk=8, together=True)
    assert scheduler.stats.prefill_calls == 1 and scheduler.stats.prefill_rows == rows
    for job, (t, pt, ps, f) in zip(jobs, requests, strict=True):
        assert job.error is None and job.out == f
        assert max_diff(job.logps, sequential_logps(lm, t, pt, ps, f)) <= BATCH_LOGP_ATOL


def test_batch_equals_alone_teacher_forced_with_interleaved_starts(lm: CosyVoice2LM,
                                                                   requests) -> None:
    jobs = [TeacherJob(lm, prompt_rows(lm, t, pt, ps), f, start_step=3 * i)
            for i, (t, pt, ps, f) in enumerate(requests)]
    scheduler = run_jobs(lm, jobs)
    assert scheduler.stats.peak_batch == len(jobs)  # they really ran together
    diffs = []
    for job, (t, pt, ps, f) in zip(jobs, requests, strict=True):
        assert job.error is None and job.out == f
        diffs.append(max_diff(job.logps, sequential_logps(lm, t, pt, ps, f)))
    assert max(diffs) <= BATCH_LOGP_ATOL, diffs
    # and the request of the reference vectors matches the reference itself
    v = vectors("llm_teacher_forced")
    torch.testing.assert_close(torch.stack(jobs[0].logps), v["logp"][:len(jobs[0].logps)],
                               atol=1e-4, rtol=0)


def test_per_request_randomness(lm: CosyVoice2LM, requests) -> None:
    """Same seed => same tokens, in a batch or alone; other seeds in the same batch differ."""
    t, pt, ps, _ = requests[0]

    def job(seed: int) -> TeacherJob:
        sampler = RasSampler.seeded(lm.config.sampling, lm.config.speech_token_size, seed)
        return TeacherJob(lm, prompt_rows(lm, t, pt, ps), [], sampler=sampler, steps=25)

    alone = job(7)
    run_jobs(lm, [alone])
    batch = [job(7), job(8), job(7)]
    run_jobs(lm, batch)
    assert batch[0].out == batch[2].out == alone.out
    assert batch[1].out != alone.out


def test_bad_request_joining_a_running_batch_fails_alone(lm: CosyVoice2LM, requests) -> None:
    t, pt, ps, f = requests[0]
    good = TeacherJob(lm, prompt_rows(lm, t, pt, ps), f)
    breaks = TeacherJob(lm, prompt_rows(lm, t, pt, ps), f, start_step=4, fail_at=3)
    wrong_width = TeacherJob(lm, torch.zeros(5, lm.config.qwen.hidden_size + 1), f, start_step=6)
    too_long = TeacherJob(lm, torch.zeros(lm.config.qwen.max_position_embeddings + 1,
                                          lm.config.qwen.hidden_size), f, start_step=8)
    run_jobs(lm, [good, breaks, wrong_width, too_long])
    assert isinstance(breaks.error, ValueError) and "step 3" in str(breaks.error)
    assert len(breaks.logps) == 3
    assert wrong_width.error is not None and "wide" in str(wrong_width.error)
    assert too_long.error is not None and "positions" in str(too_long.error)
    assert good.error is None and good.out == f
    assert max_diff(good.logps, sequential_logps(lm, t, pt, ps, f)) <= BATCH_LOGP_ATOL


def test_long_prefill_is_chunked_and_does_not_stall_decoding(lm: CosyVoice2LM,
                                                              requests) -> None:
    t, pt, ps, f = requests[0]
    long_text = (t * 8)[:70]
    decoding = TeacherJob(lm, prompt_rows(lm, t, pt, ps), f)
    long_job = TeacherJob(lm, prompt_rows(lm, long_text, pt, ps), f[:10], start_step=5)
    chunk = 8
    rows = long_job.rows.shape[0]
    run_jobs(lm, [decoding, long_job], prefill_chunk=chunk)
    # while the long prompt went in chunk by chunk, the other request took a token every step
    first = long_job.accept_steps[0]
    feeding = range(first - (rows + chunk - 1) // chunk + 1, first + 1)
    during = [s for s in decoding.accept_steps if s in feeding]
    assert len(during) == len(feeding), (decoding.accept_steps, list(feeding))
    assert decoding.out == f and long_job.out == f[:10]
    assert max_diff(decoding.logps, sequential_logps(lm, t, pt, ps, f)) <= BATCH_LOGP_ATOL
    assert max_diff(long_job.logps, sequential_logps(lm, long_text, pt, ps, f[:10])
                    ) <= BATCH_LOGP_ATOL


def test_cancelled_job_leaves_within_one_step(lm: CosyVoice2LM, requests) -> None:
    t, pt, ps, f = requests[0]
    keep = TeacherJob(lm, prompt_rows(lm, t, pt, ps), f)
    leave = TeacherJob(lm, prompt_rows(lm, t, pt, ps), f)
    head = lm.llm_decoder
    scheduler = BatchScheduler(BackboneLM(lm.llm.model.model, head), 2)
    try:
        for job in (keep, leave):
            job.scheduler = scheduler
            scheduler.submit(job)
        while len(leave.out) < 5:
            time.sleep(0.001)
        leave.cancelled = True
        at = len(leave.out)
        assert keep.finished.wait(60)
    finally:
        scheduler.close()
    assert len(leave.out) <= at + 1 and scheduler.stats.active == 0
    assert keep.out == f


# ----------------------------------------------------------------------------- engine level


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("cv2-batch") / "tiny", "tiny", seed=11)


@pytest.fixture(scope="module")
def engines(model_dir: Path) -> tuple[CosyVoice2Engine, CosyVoice2Engine]:
    # float32: the batch must reproduce the exact path (auto may quantise the LM on CPU, and
    # int8 kernels round differently for different row counts)
    alone = CosyVoice2Engine.from_model_dir(model_dir, threads=1, device="cpu", seed=5,
                                            precision="float32")
    batched = CosyVoice2Engine.from_model_dir(model_dir, threads=1, device="cpu", seed=5,
                                              max_batch=4, precision="float32")
    samples, rate = soundfile.read(SHARED / "audio" / "zero_shot_prompt.wav", dtype="float32")
    for engine in (alone, batched):  # a stored speaker: its streams share the prompt's flow
        engine.register_speaker("stored", Audio(samples, rate), prompt_text=PROMPT_TEXT)
    return alone, batched


def engine_requests(prompt: Audio) -> list[SynthesisRequest]:
    source = Audio(prompt.samples[: prompt.sample_rate * 2], prompt.sample_rate)
    return [
        SynthesisRequest(Mode.ZERO_SHOT, text="今天天气很好，我们去公园散步吧！你好。",
                         prompt=prompt, prompt_text=PROMPT_TEXT),
        SynthesisRequest(Mode.CROSS_LINGUAL, text="Hello there, this is a test.", prompt=prompt,
                         stream=False),
        SynthesisRequest(Mode.VOICE_CONVERSION, prompt=prompt, source=source),
        SynthesisRequest(Mode.ZERO_SHOT, text="一二三四五六七八九十。", prompt=prompt,
                         prompt_text=PROMPT_TEXT, speed=1.5),
        SynthesisRequest(Mode.ZERO_SHOT, text="收到好友从远方寄来的生日礼物。",
                         speaker_id="stored"),
    ]


def audio(engine: CosyVoice2Engine, request: SynthesisRequest,
          cancel: threading.Event | None = None) -> np.ndarray:
    chunks = list(engine.synthesize(request, cancel or threading.Event()))
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


def audio_with_interleaved_starts(engine: CosyVoice2Engine, requests: list[SynthesisRequest],
                                  gap: float) -> list[np.ndarray | None]:
    """Each request's audio, request i started ``gap * i`` seconds after the first, all on
    threads of their own (None where one did not finish in time)."""
    got: list[np.ndarray | None] = [None] * len(requests)

    def run(i: int) -> None:
        time.sleep(gap * i)
        got[i] = audio(engine, requests[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    return got


def test_engine_batch_gives_the_audio_of_each_request_alone(engines, prompt: Audio,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    alone, batched = engines
    requests = engine_requests(prompt)
    want = [audio(alone, r) for r in requests]
    start_stream, prompt_caches = batched.token2wav.start_stream, []

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - the wrapped method's
        prompt_caches.append(kwargs.get("prompt_cache"))
        return start_stream(*args, **kwargs)

    monkeypatch.setattr(batched.token2wav, "start_stream", spy)
    got = audio_with_interleaved_starts(batched, requests, 0.15)
    assert batched.scheduler is not None and batched.scheduler.stats.peak_batch >= 2
    for w, g in zip(want, got, strict=True):
        assert g is not None and len(g) == len(w) > 0
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)
    # the stored speaker's stream started from its prompt cache (the others from the recording's
    # once the engine had seen it before, see prompt_cache.py; the first of them from none)
    stored_cache = batched.flow_prompt_cache_of("stored")
    assert len(prompt_caches) == 3 and any(cache is stored_cache for cache in prompt_caches)
    assert any(cache is None for cache in prompt_caches)


def test_engine_cancel_in_the_middle_of_a_batch(engines, prompt: Audio) -> None:
    alone, batched = engines
    request = engine_requests(prompt)[0]
    want = audio(alone, request)
    cancel = threading.Event()
    result: dict[str, np.ndarray] = {}

    def other() -> None:
        result["other"] = audio(batched, request)

    th = threading.Thread(target=other)
    th.start()
    chunks = batched.synthesize(request, cancel)
    first = next(chunks)
    assert len(first) > 0
    cancel.set()
    assert list(chunks) == []  # nothing more once cancelled, not even chunks already made
    th.join(120)
    np.testing.assert_allclose(result["other"], want, atol=1e-5, rtol=0)
    deadline = time.monotonic() + 5
    while batched.batch_occupancy()[0] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batched.batch_occupancy() == (0, 4)


def test_engine_flow_chunks_solved_together_and_a_failing_one_fails_alone(
        engines, prompt: Audio, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three streams whose chunks fall due together: their flow chunks are solved in one
    estimator run per Euler step, each stream's audio stays that of the request alone, and a
    stream whose chunk fails to start fails alone."""
    from tts_core.batching import cosyvoice2_job

    alone, batched = engines
    scheduler = batched.scheduler
    assert scheduler is not None
    good = [SynthesisRequest(Mode.ZERO_SHOT, text=text, prompt=prompt, prompt_text=PROMPT_TEXT)
            for text in ("今天天气很好，我们去公园散步吧！", "一二三四五六七八九十。")]
    # the failing one is told apart by its mode: cross-lingual gives the LM no prompt text
    bad = SynthesisRequest(Mode.CROSS_LINGUAL, text="收到好友从远方寄来的生日礼物。", prompt=prompt)
    want = [audio(alone, r) for r in good]
    begin = cosyvoice2_job.CosyVoice2Job.begin_output

    def begin_output(job):  # noqa: ANN001, ANN202 - the patched method
        if not job.voice.lm_prompt_text_ids:
            raise ValueError("this request's chunk cannot start")
        return begin(job)

    monkeypatch.setattr(cosyvoice2_job.CosyVoice2Job, "begin_output", begin_output)
    got: list[np.ndarray | BaseException | None] = [None] * 3

    def run(i: int, request: SynthesisRequest) -> None:
        try:
            got[i] = audio(batched, request)
        except BaseException as error:  # noqa: BLE001 - handed to the test
            got[i] = error

    threads = [threading.Thread(target=run, args=(i, r)) for i, r in enumerate(good + [bad])]
    # the three start together, so their chunks fall due together
    with held_until(scheduler, 3):
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
    assert scheduler.stats.peak_output_batch >= 2
    for w, g in zip(want, got[:2], strict=True):
        assert isinstance(g, np.ndarray) and len(g) == len(w) > 0
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)
    assert isinstance(got[2], ValueError) and "cannot start" in str(got[2])


# ----------------------------------------------------------------------------- service level


def test_service_admission_follows_max_batch(model_dir: Path, tmp_path: Path) -> None:
    """--max-batch 3 through the real launcher: 3 run in one batch, 1 queues, the next gets 503
    (RESOURCE_EXHAUSTED), and GetServerStatus shows the batch filling up; --flow-cache-memory
    reaches the engine, which shares it among the 3."""
    import grpc
    from conftest import AUDIO_DIR, collect_replies, rpc_error, start_stack, stop_stack

    from service.gen.cosyvoice.v1 import tts_pb2, tts_pb2_grpc

    stack = start_stack(tmp_path / "stack", max_concurrent=1, max_queue=1,
                        extra_args=("--engine", "cosyvoice2", "--model-dir", str(model_dir),
                                    "--max-batch", "3", "--flow-cache-memory", "600M"))
    try:
        status = stack.status()
        assert (status["max_batch"], status["max_concurrent"]) == (3, 3)
        share = format_gib((600 << 20) // 3)
        assert f"3 concurrent streams (--flow-cache-memory): {share} per stream" in stack.logs()
        prompt = tts_pb2.PromptAudio(data=(AUDIO_DIR / "zero_shot_prompt.wav").read_bytes(),
                                     format=tts_pb2.PROMPT_AUDIO_FORMAT_CONTAINER)
        request = tts_pb2.SynthesizeRequest(
            text="收到好友从远方寄来的生日礼物。" * 3,
            zero_shot=tts_pb2.ZeroShotMode(prompt_audio=prompt, prompt_text=PROMPT_TEXT))
        with grpc.insecure_channel(stack.grpc_target) as channel:
            stub = tts_pb2_grpc.TextToSpeechServiceStub(channel)
            calls = [stub.Synthesize(request, metadata=stack.metadata, timeout=300)
                     for _ in range(4)]
            peak = 0
            deadline = time.monotonic() + 120
            while True:
                status = stack.status()
                peak = max(peak, int(status.get("batch_occupancy", 0)))
                if (status.get("active_syntheses"), status.get("queued_syntheses")) == (3, 1):
                    break
                assert time.monotonic() < deadline, status
                time.sleep(0.05)
            extra = rpc_error(stub.Synthesize(request, metadata=stack.metadata, timeout=60))
            assert extra.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            while peak < 2 and time.monotonic() < deadline:
                peak = max(peak, int(stack.status().get("batch_occupancy", 0)))
                time.sleep(0.05)
            assert peak >= 2
            for call in calls:
                chunks, stats = collect_replies(call)
                assert chunks and stats.audio_seconds > 0
        assert int(stack.wait_idle().get("batch_occupancy", 0)) == 0
    finally:
        stop_stack(stack)


class OutputJob(TeacherJob):
    """A teacher-forced job with output work: one chunk due every ``hop`` tokens."""

    def __init__(self, *args, hop: int, lead: float, log: list, name: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hop, self.lead, self.log, self.name = hop, lead, log, name
        self.emitted = 0

    def output_due(self) -> bool:
        return len(self.out) // self.hop > self.emitted

    def output_rank(self, now: float) -> tuple[int, float]:
        return (0, 0.0) if self.emitted == 0 else (1, self.lead)

    def run_output(self) -> None:
        assert self.scheduler is not None
        self.emitted += 1
        self.log.append((self.name, self.scheduler.stats.steps, len(self.out)))

    def done(self) -> bool:
        return self.finished.is_set() and not self.output_due()


def test_first_chunks_go_before_streams_with_audio_buffered(lm: CosyVoice2LM, requests) -> None:
    t, pt, ps, f = requests[0]
    log: list[tuple[str, int, int]] = []
    # "old" has 10 s of audio buffered after its first chunk; "new" joins while old has due work
    old = OutputJob(lm, prompt_rows(lm, t, pt, ps), f, hop=2, lead=10.0, log=log, name="old")
    new = OutputJob(lm, prompt_rows(lm, t, pt, ps), f, hop=6, lead=10.0, log=log, name="new",
                    start_step=8)
    run_jobs(lm, [old, new])
    new_first = next(i for i, entry in enumerate(log) if entry[0] == "new")
    # the newcomer's first chunk ran in the step where it became due ...
    assert log[new_first][2] == 6
    # ... and while it waited for it, the long stream's non-urgent chunks were held back
    waiting = [e for e in log[:new_first] if e[0] == "old" and e[1] > new.accept_steps[0]]
    assert waiting == [], log
    # nothing starves: every chunk of both was produced in the end
    assert old.emitted == len(f) // 2 and new.emitted == len(f) // 6


def test_cosyvoice3_lm_batches_the_same_way() -> None:
    """The scheduler drives CosyVoice 3's LM (same Qwen2 backbone, other speech tables)."""
    from tests import cv3_parity
    from tests.test_cv3_llm_parity import build_config
    from tts_core.cosyvoice2.checkpoint import load_strict
    from tts_core.cosyvoice3.llm import CosyVoice3LM

    path = cv3_parity.parity_dir()
    lm3 = CosyVoice3LM(build_config(path))
    load_strict(lm3, torch.load(path / "llm.pt", weights_only=True, map_location="cpu"), "llm.pt")
    lm3.eval()
    v = cv3_parity.vectors("llm_teacher_forced")
    text, ptext = ids(v["text"]), ids(v["prompt_text"])
    pspeech, forced = ids(v["prompt_speech_token"]), ids(v["forced_speech_token"])
    variants = [(text, ptext, pspeech, forced), (text, ptext, pspeech[:5], forced[:11])]
    jobs = [TeacherJob(lm3, prompt_rows(lm3, t, pt, ps), f, start_step=2 * i)
            for i, (t, pt, ps, f) in enumerate(variants)]
    run_jobs(lm3, jobs)
    for job, (t, pt, ps, f) in zip(jobs, variants, strict=True):
        assert job.error is None and job.out == f
        assert max_diff(job.logps, sequential_logps(lm3, t, pt, ps, f)) <= BATCH_LOGP_ATOL
    torch.testing.assert_close(torch.stack(jobs[0].logps), v["logp"][:len(forced)],
                               atol=1e-4, rtol=0)
