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

import numpy as np
import pytest
import torch

from tests.cv2_parity import parity_models
from tests.test_cv2_batching import (
    BATCH_LOGP_ATOL,
    TeacherJob,
    audio,
    audio_with_interleaved_starts,
    engine_requests,
    engines,  # noqa: F401 - fixture
    lm,  # noqa: F401 - fixture
    max_diff,
    model_dir,  # noqa: F401 - fixture
    prompt_rows,
    requests,  # noqa: F401 - fixture
    run_jobs,
    sequential_logps,
)
from tts_core.batching import lm_batch
from tts_core.batching.cosyvoice2_job import make_scheduler
from tts_core.batching.cuda_graphs import DecodeGraphs, buckets
from tts_core.batching.lm_batch import BackboneLM, batched_decode
from tts_core.batching.scheduler import MAX_OUTPUT_BATCH, BatchScheduler
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
    assert slab.keys[:, slab.scratch].abs().sum() > 0  # its padding row (3 -> 4) wrote there
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


def run_wide(model: CosyVoice2LM, jobs: list[TeacherJob], capacity: int,
             graphs: DecodeGraphs | None = None) -> BatchScheduler:
    """The teacher jobs on a scheduler whose BackboneLM hands out slab slots (``graphs``'s
    slab and fixed-shape steps, if given)."""
    backbone = model.llm.model.model
    slab = graphs.slab if graphs is not None else backbone.new_slab(len(jobs), capacity)
    lm_ = graphs.lm if graphs is not None else BackboneLM(backbone, model.llm_decoder, slab=slab)
    for job in jobs:
        job.cache = lm_.new_cache()
    return run_jobs(model, jobs, backbone_lm=lm_)


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
    # on a CPU the engine's own scheduler is narrow: per-request caches, MAX_OUTPUT_BATCH
    assert batched.scheduler.lm.slab is None and batched.scheduler.lm.graphs is None
    assert batched.scheduler.max_output_batch == MAX_OUTPUT_BATCH
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
        got = audio_with_interleaved_starts(batched, requests_, 0.1)
        assert batched.scheduler.stats.peak_batch >= 2 and max(rows) >= 2
        for w, g in zip(want, got, strict=True):
            assert g is not None and len(g) == len(w) > 0
            np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)
        gc.collect()
        assert batched.scheduler.lm.slab.free_slots() == 4  # every request gave its slot back
    finally:
        batched.scheduler.close()
        batched.scheduler = narrow


# ------------------------------------------------------------ the fixed-shape (CUDA graph) step


def test_buckets() -> None:
    assert buckets(1) == [1] and buckets(5) == [1, 2, 4, 5] and buckets(8) == [1, 2, 4, 8]


@torch.no_grad()
def test_fixed_shape_step_equals_each_request_alone(lm: CosyVoice2LM) -> None:  # noqa: F811
    """The step a CUDA graph records (here run eagerly): 3 requests in the 4-row bucket (one
    padding row on the scratch slot), every row over the slot's whole capacity, masked: the
    per-request path's log-probabilities within BATCH_LOGP_ATOL, and the slab keys it wrote."""
    backbone = lm.llm.model.model
    plain = BackboneLM(backbone, lm.llm_decoder)
    slab = backbone.new_slab(5, 96)
    fixed = BackboneLM(backbone, lm.llm_decoder, slab=slab)
    fixed.graphs = DecodeGraphs(fixed, slab, 5)
    assert not fixed.graphs.captured and fixed.graphs.buckets == [1, 2, 4, 5]
    gen = torch.Generator().manual_seed(3)
    d = backbone.config.hidden_size
    alone, in_slab = [], []
    for n in (3, 17, 40):
        p = torch.randn(1, n, d, generator=gen)
        for caches, model in ((alone, plain), (in_slab, fixed)):
            cache = model.new_cache()
            backbone(p, cache)
            caches.append(cache)
    calls = []
    step = fixed.graphs._step
    fixed.graphs._step = lambda rows: calls.append(rows) or step(rows)
    diffs = []
    for i in range(6):
        count = 3 if i % 2 == 0 else 2  # the 4-row and the 2-row bucket
        rows = torch.randn(count, d, generator=gen)
        got = fixed.decode(rows, in_slab[:count])
        want = plain.decode(rows, alone[:count])
        diffs.append(float((got - want).abs().max()))
    assert calls == [4, 2] * 3
    assert max(diffs) <= BATCH_LOGP_ATOL, diffs
    assert [len(c) for c in in_slab] == [len(c) for c in alone] == [9, 23, 43]
    for a, b in zip(alone, in_slab, strict=True):
        for layer in range(len(a._keys)):
            torch.testing.assert_close(b._keys[layer][:, :, :len(b)],
                                       a._keys[layer][:, :, :len(a)],
                                       atol=BATCH_LOGP_ATOL, rtol=0)


def test_scheduler_with_fixed_shape_steps_teacher_forced(lm: CosyVoice2LM,  # noqa: F811
                                                         requests,  # noqa: F811
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """make_scheduler with TTS_CUDA_GRAPHS=1 (on a CPU: the fixed-shape step run eagerly):
    teacher-forced jobs with interleaved starts give the sequential path's numbers."""
    monkeypatch.setenv("TTS_CUDA_GRAPHS", "1")
    scheduler = make_scheduler(lm, len(requests), wide=True)
    scheduler.close()
    graphs = scheduler.lm.graphs
    assert graphs is not None and not graphs.captured
    jobs = [TeacherJob(lm, prompt_rows(lm, t, pt, ps), f, start_step=3 * i)
            for i, (t, pt, ps, f) in enumerate(requests)]
    sizes = []
    step = graphs._step
    monkeypatch.setattr(graphs, "_step", lambda rows: sizes.append(rows) or step(rows))
    scheduler = run_wide(lm, jobs, 2048, graphs=graphs)
    assert scheduler.stats.peak_batch == len(jobs) and len(sizes) >= scheduler.stats.steps // 2
    for job, (t, pt, ps, f) in zip(jobs, requests, strict=True):
        assert job.error is None and job.out == f
        assert max_diff(job.logps, sequential_logps(lm, t, pt, ps, f)) <= BATCH_LOGP_ATOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_cuda_graph_replay_equals_each_request_alone() -> None:
    """On a GPU: the captured graphs (float32, TF32 off) against the eager per-request path on
    the same GPU, 3 requests in the 4-row bucket then 2 in the 2-row one, a few steps each."""
    import copy

    model = copy.deepcopy(parity_models().lm).cuda()
    backbone = model.llm.model.model
    plain = BackboneLM(backbone, model.llm_decoder)
    slab = backbone.new_slab(4, 128)
    fixed = BackboneLM(backbone, model.llm_decoder, slab=slab)
    fixed.graphs = DecodeGraphs(fixed, slab, 4)
    assert fixed.graphs.captured
    gen = torch.Generator().manual_seed(4)
    d = backbone.config.hidden_size
    alone, in_slab = [], []
    for n in (3, 17, 40):
        p = torch.randn(1, n, d, generator=gen).cuda()
        for caches, lm_ in ((alone, plain), (in_slab, fixed)):
            cache = lm_.new_cache()
            backbone(p, cache)
            caches.append(cache)
    diffs = []
    for i in range(8):
        count = 3 if i < 4 else 2
        rows = torch.randn(count, d, generator=gen).cuda()
        got = fixed.decode(rows, in_slab[:count])
        want = plain.decode(rows, alone[:count])
        diffs.append(float((got - want).abs().max()))
    print(f"\nCUDA graph decode, max log-prob difference per step: {max(diffs):.2e}")
    assert max(diffs) <= 1e-3, diffs  # float32 kernels of other shapes (padded, masked)
    assert [len(c) for c in in_slab] == [len(c) for c in alone] == [7, 25, 48]
