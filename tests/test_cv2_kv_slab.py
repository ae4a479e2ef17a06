"""KV slab (qwen2.KVSlab) and the wide scheduler a GPU engine runs: same numbers as alone.

A wide scheduler keeps every request's LM keys/values in slots of one slab and runs a decode
step of all of them with a few calls per layer (lm_batch._slab_decode): each row attends over
its slot up to the longest request, masked to its own length. In float32 that is the per-request
attention summed over a padded length, so the same tolerance as the other batching tests
applies (``BATCH_LOGP_ATOL``, see tests/test_cv2_batching.py; measured here: hidden states
within 1.5e-6 of the sequential path over 30 steps on the parity LM). These run on the CPU; on
a GPU the same code only takes fewer launches (scripts/bench_cuda.sh measures that).
"""

from __future__ import annotations

import gc
import threading
import time

import numpy as np
import pytest
import torch

from tests.cv2_parity import parity_models
from tests.test_cv2_batching import (
    BATCH_LOGP_ATOL,
    TeacherJob,
    audio,
    engine_requests,
    engines,  # noqa: F401 - fixture
    lm,  # noqa: F401 - fixture
    max_diff,
    model_dir,  # noqa: F401 - fixture
    prompt_rows,
    requests,  # noqa: F401 - fixture
    sequential_logps,
)
from tts_core.batching import lm_batch
from tts_core.batching.cosyvoice2_job import make_scheduler
from tts_core.batching.lm_batch import BackboneLM, batched_decode
from tts_core.batching.scheduler import BatchScheduler
from tts_core.cosyvoice2.llm import CosyVoice2LM
from tts_core.engine import Audio

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _every_batch_on_the_slab(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests run 3-5 requests: take the batched slab step from one row on."""
    monkeypatch.setattr(lm_batch, "SLAB_MIN_ROWS", 1)


@torch.no_grad()  # not inference_mode: its tensors (RMSNorm's eps) would reach other tests
def _decode_alone_and_in_slab(slots: int, capacity: int, prompts: list[int], steps: int,
                              seed: int) -> tuple[list, list, list[float], object]:
    backbone = parity_models().lm.llm.model.model
    slab = backbone.new_slab(slots, capacity)
    gen = torch.Generator().manual_seed(seed)
    d = backbone.config.hidden_size
    alone, in_slab = [], []
    for n in prompts:
        p = torch.randn(1, n, d, generator=gen)
        for caches, source in ((alone, None), (in_slab, slab)):
            cache = backbone.new_cache(source)
            backbone(p, cache)  # a prefill writes through the slot's views
            caches.append(cache)
    diffs = []
    for _ in range(steps):
        rows = torch.randn(len(prompts), d, generator=gen)
        got = batched_decode(backbone, rows, in_slab)
        want = torch.cat([backbone(rows[i][None, None], c)[0] for i, c in enumerate(alone)])
        diffs.append(float((got - want).abs().max()))
    return alone, in_slab, diffs, slab


def test_slab_decode_equals_each_request_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    slab_decode = lm_batch._slab_decode
    monkeypatch.setattr(lm_batch, "_slab_decode",
                        lambda *a: calls.append(len(a[5])) or slab_decode(*a))
    alone, in_slab, diffs, slab = _decode_alone_and_in_slab(4, 128, [3, 17, 40], 12, seed=0)
    assert calls == [3] * 12  # every step took the slab path
    assert max(diffs) <= BATCH_LOGP_ATOL, diffs
    assert [len(c) for c in in_slab] == [len(c) for c in alone] == [15, 29, 52]
    assert sorted(c.slot for c in in_slab) == [0, 1, 2] and slab.free_slots() == 1
    # the slot holds exactly the keys the request's own cache holds
    for a, b in zip(alone, in_slab, strict=True):
        for layer in range(len(a._keys)):
            torch.testing.assert_close(b._keys[layer][:, :, :len(b)], a._keys[layer][:, :, :len(a)],
                                       atol=BATCH_LOGP_ATOL, rtol=0)
    del in_slab, a, b
    gc.collect()
    assert slab.free_slots() == 4  # a cache gives its slot back when it is garbage


def test_a_request_outgrowing_its_slot_moves_out_and_stays_exact() -> None:
    # capacity 48: the 40-row request fills its slot after 8 steps and leaves the slab; the
    # others go on (the step then runs per request) and every number stays the sequential one
    alone, in_slab, diffs, slab = _decode_alone_and_in_slab(3, 48, [40, 5, 11], 14, seed=1)
    assert max(diffs) <= BATCH_LOGP_ATOL, diffs
    assert [len(c) for c in in_slab] == [54, 19, 25]
    assert in_slab[0].slab is None and in_slab[0].slot == -1
    assert slab.free_slots() == 1  # its slot went back at once
    assert all(c.slab is slab for c in in_slab[1:])


def test_few_rows_use_each_slot_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Below SLAB_MIN_ROWS a step goes request by request through the slots: same numbers."""
    monkeypatch.setattr(lm_batch, "SLAB_MIN_ROWS", 4)
    calls = []
    slab_decode = lm_batch._slab_decode
    monkeypatch.setattr(lm_batch, "_slab_decode",
                        lambda *a: calls.append(len(a[5])) or slab_decode(*a))
    alone, in_slab, diffs, slab = _decode_alone_and_in_slab(4, 128, [3, 17, 40], 6, seed=2)
    assert calls == [] and max(diffs) <= BATCH_LOGP_ATOL, diffs
    assert all(c.slab is slab for c in in_slab) and [len(c) for c in in_slab] == [9, 23, 46]


def test_no_free_slot_gives_a_cache_of_its_own() -> None:
    backbone = parity_models().lm.llm.model.model
    slab = backbone.new_slab(1, 32)
    first, second = backbone.new_cache(slab), backbone.new_cache(slab)
    assert first.slab is slab and second.slab is None and slab.free_slots() == 0
    copy = first.clone()  # a copy never shares the slot
    assert copy.slab is None
    del first
    gc.collect()
    assert slab.free_slots() == 1


def run_wide(model: CosyVoice2LM, jobs: list[TeacherJob], capacity: int) -> BatchScheduler:
    """The teacher jobs on a scheduler whose BackboneLM hands out slab slots."""
    backbone = model.llm.model.model
    slab = backbone.new_slab(len(jobs), capacity)
    scheduler = BatchScheduler(BackboneLM(backbone, model.llm_decoder, slab=slab), len(jobs),
                               prefill_chunk=64)
    for job in jobs:
        job.cache = scheduler.lm.new_cache()
    try:
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


@pytest.mark.parametrize("capacity", [2048, 60])
def test_wide_scheduler_teacher_forced_with_interleaved_starts(lm: CosyVoice2LM,  # noqa: F811
                                                              requests, capacity: int  # noqa: F811
                                                              ) -> None:
    """Capacity 60: the longer requests outgrow their slots midway."""
    jobs = [TeacherJob(lm, prompt_rows(lm, t, pt, ps), f, start_step=3 * i)
            for i, (t, pt, ps, f) in enumerate(requests)]
    scheduler = run_wide(lm, jobs, capacity)
    assert scheduler.stats.peak_batch == len(jobs)
    diffs = []
    for job, (t, pt, ps, f) in zip(jobs, requests, strict=True):
        assert job.error is None and job.out == f
        diffs.append(max_diff(job.logps, sequential_logps(lm, t, pt, ps, f)))
    assert max(diffs) <= BATCH_LOGP_ATOL, diffs


def test_wide_engine_gives_the_audio_of_each_request_alone(engines, prompt: Audio,  # noqa: F811
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """The engine as it runs on a GPU (slab slots, every due stream in one output round), here
    on the CPU in float32: each request's audio is its audio alone."""
    alone, batched = engines
    rows = []
    slab_decode = lm_batch._slab_decode
    monkeypatch.setattr(lm_batch, "_slab_decode",
                        lambda *a: rows.append(len(a[5])) or slab_decode(*a))
    narrow = batched.scheduler
    batched.scheduler = make_scheduler(batched.models.lm, 4, wide=True)
    try:
        assert batched.scheduler.max_output_batch == 4 and batched.scheduler.lm.slab is not None
        requests_ = engine_requests(prompt)
        want = [audio(alone, r) for r in requests_]
        got: list[np.ndarray | None] = [None] * len(requests_)

        def run(i: int) -> None:
            time.sleep(0.1 * i)
            got[i] = audio(batched, requests_[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests_))]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        assert batched.scheduler.stats.peak_batch >= 2 and max(rows) >= 2
        for w, g in zip(want, got, strict=True):
            assert g is not None and len(g) == len(w) > 0
            np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)
        gc.collect()
        assert batched.scheduler.lm.slab.free_slots() == 4  # every request gave its slot back
    finally:
        batched.scheduler.close()
        batched.scheduler = narrow
