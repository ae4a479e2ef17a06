"""One memory budget for the flow stream caches of all concurrent streams of an engine.

Sizes and free memory are read from real texts (sizes, /proc/meminfo, cgroup files in a temporary
tree); the budgets are those real engines on the generated tiny model directories hand to their
streams, and a stream whose budget is too small to cache must give the samples, bit for bit, of
one whose budget is never reached.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import tts_core.cosyvoice2.engine as cv2_engine
from service.options import ServerOptions, parse_server_options
from tts_core.cosyvoice2.engine import FLOW_STREAM_CACHE_BYTES, CosyVoice2Engine
from tts_core.cosyvoice2.testing.make_model_dir import make_model_dir
from tts_core.cosyvoice3.engine import CosyVoice3Engine
from tts_core.cosyvoice3.token2wav import DIT_CACHE_MAX_FRAMES
from tts_core.engine import Audio, Mode, SynthesisRequest
from tts_core.memory import cgroup_available, host_available, meminfo_available, parse_size
from tts_core.registry import create_engine

PROMPT_TEXT = "希望你以后能够做的比我还好呦。"
TEXT = "收到好友从远方寄来的生日礼物，那份意外的惊喜让我心中充满了甜蜜。"

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(("text", "size"), [
    ("8G", 8 << 30), ("512M", 512 << 20), ("512m", 512 << 20), ("1.5GiB", 3 << 29),
    ("2 GB", 2 << 30), ("1073741824", 1 << 30), ("64k", 64 << 10), ("100B", 100), ("0", 0),
    (" 1T ", 1 << 40)])
def test_sizes_are_read(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "-1G", "8X", "1e9", "8GG", "G", "8 G B"])
def test_bad_sizes_are_refused_with_a_usable_message(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not a size: give bytes or a number with K, M, G "
                                         r"or T .* e\.g\. 8G, 512M"):
        parse_size(text)


def test_server_flag(capsys: pytest.CaptureFixture[str]) -> None:
    options = parse_server_options(["--flow-cache-memory", "6G", "--max-batch", "4"])
    assert options.flow_cache_memory == 6 << 30
    # the gateway starts its replicas with argv(): the value survives the round trip
    assert parse_server_options(options.argv()) == options
    assert parse_server_options([]).flow_cache_memory is None
    assert "--flow-cache-memory" not in ServerOptions().argv()
    with pytest.raises(SystemExit) as exit_info:
        parse_server_options(["--flow-cache-memory", "8X"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "argument --flow-cache-memory: '8X' is not a size" in error and "8G, 512M" in error


def test_registry_refuses_budgets_it_cannot_use(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--flow-cache-memory must be >= 0"):
        create_engine("cosyvoice2", model_dir=tmp_path, flow_cache_memory=-1)
    with pytest.raises(ValueError, match="--flow-cache-memory and --flow-cache-share apply"):
        create_engine("embedded", flow_cache_memory=1 << 30)
    with pytest.raises(ValueError, match="--flow-cache-memory and --flow-cache-share apply"):
        create_engine("embedded", flow_cache_share=0.25)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"--flow-cache-share must be in \(0, 1\]"):
            create_engine("cosyvoice2", model_dir=tmp_path, flow_cache_share=bad)


# ----------------------------------------------------------------------------- free memory

MEMINFO = """MemTotal:       24567012 kB
MemFree:          612340 kB
MemAvailable:   18874368 kB
Buffers:           81234 kB
Cached:          9123456 kB
SwapTotal:             0 kB
"""


def test_meminfo_available() -> None:
    assert meminfo_available(MEMINFO) == 18874368 * 1024  # 18 GiB
    assert meminfo_available(MEMINFO.replace("MemAvailable", "MemAvail")) is None
    assert meminfo_available("") is None


def test_cgroup_available() -> None:
    stat = "anon 4000\nfile 9000\ninactive_file 3000\nactive_file 6000\n"
    # limit 10000, working set 8000 - 3000 (reclaimable page cache)
    assert cgroup_available("10000\n", "8000\n", stat) == 5000
    assert cgroup_available("10000", "8000") == 2000  # no memory.stat: count all of it
    assert cgroup_available("5000", "8000", "") == 0  # over the limit already
    assert cgroup_available("max\n", "8000\n", stat) is None
    # cgroup v1: its own stat key; "no limit" is a number near 2**63
    assert cgroup_available("10000", "8000", "total_inactive_file 1000\ninactive_file 3000\n",
                            version=1) == 3000
    assert cgroup_available("9223372036854771712", "8000", "", version=1) is None


def test_host_available_takes_the_tightest_limit(tmp_path: Path) -> None:
    """MemAvailable, the process's own cgroup and the ones above it: the least room wins."""
    proc, cgroups = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(MEMINFO)
    (proc / "self" / "cgroup").write_text("0::/system.slice/tts.service\n")
    own, parent = cgroups / "system.slice" / "tts.service", cgroups / "system.slice"
    own.mkdir(parents=True)
    assert host_available(proc, cgroups) == 18 << 30  # no limits: MemAvailable
    (own / "memory.max").write_text("max\n")
    (own / "memory.current").write_text(f"{1 << 30}\n")
    (parent / "memory.max").write_text(f"{12 << 30}\n")
    (parent / "memory.current").write_text(f"{4 << 30}\n")
    assert host_available(proc, cgroups) == 8 << 30  # the parent's limit
    (own / "memory.max").write_text(f"{3 << 30}\n")
    assert host_available(proc, cgroups) == 2 << 30  # its own, tighter
    (proc / "meminfo").write_text(MEMINFO.replace("18874368", "1048576"))
    assert host_available(proc, cgroups) == 1 << 30  # the machine, tighter still
    # cgroup v1: the memory hierarchy's own mount
    (proc / "meminfo").unlink()
    (proc / "self" / "cgroup").write_text("4:memory:/tts\n1:cpu:/\n")
    v1 = cgroups / "memory" / "tts"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(f"{6 << 30}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{1 << 30}\n")
    assert host_available(proc, cgroups) == 5 << 30
    assert host_available(tmp_path / "nothing", tmp_path / "none") is None


# ----------------------------------------------------------------------------- CosyVoice 2


@pytest.fixture(scope="module")
def cv2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("cv2-memory") / "tiny", "tiny", seed=11)


def cv2(path: Path, **options: Any) -> CosyVoice2Engine:
    return CosyVoice2Engine.from_model_dir(path, threads=1, device="cpu", seed=5,
                                           precision="float32", **options)


def frame_bytes(engine: CosyVoice2Engine) -> int:
    return engine.models.flow.stream_cache_bytes_per_frame(torch.float32)


def test_streams_share_the_total(cv2_dir: Path, prompt: Audio,
                                 caplog: pytest.LogCaptureFixture) -> None:
    """Each of max_batch streams gets total // max_batch (its keys/values block holds exactly
    that, see kv_arena), and no more than the per-stream limit; the engine says so once."""
    total = 1 << 30
    caplog.set_level(logging.INFO, logger=cv2_engine.__name__)
    engine = cv2(cv2_dir, max_batch=4, flow_cache_memory=total)
    try:
        share = total // 4
        assert share < FLOW_STREAM_CACHE_BYTES
        assert engine.flow_cache_bytes == engine.token2wav.flow_cache_bytes == share
        # what a stream's cache is given
        stream = engine.token2wav.start_stream(torch.zeros(1, 0, dtype=torch.int32),
                                               torch.zeros(1, 0, 80), torch.zeros(1, 192))
        assert stream._flow_cache.max_bytes == share
        seconds = share // frame_bytes(engine) / 50  # 50 mel frames a second
        lines = [r.getMessage() for r in caplog.records if "flow stream caches" in r.getMessage()]
        assert len(lines) == 1
        assert "4 concurrent streams" in lines[0] and "0.25 GiB per stream" in lines[0]
        assert f"{seconds:.1f} s of prompt + speech" in lines[0]
    finally:
        assert engine.scheduler is not None
        engine.scheduler.close()
    # without a batch, the caller's admission (the server's --max-concurrent) shares it
    assert cv2(cv2_dir, flow_cache_memory=total, concurrent_streams=3).flow_cache_bytes \
        == total // 3
    # a large total never raises a stream past the per-stream limit
    assert cv2(cv2_dir, flow_cache_memory=1 << 40).flow_cache_bytes == FLOW_STREAM_CACHE_BYTES


def test_default_total_is_half_the_free_memory(cv2_dir: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The free memory is an input of the rule (fixed here: the machine's changes while the
    test runs); without any reading the per-stream limit applies, as before."""
    seen: list[str] = []

    def free(device: str) -> int | None:
        seen.append(device)
        return 12 << 30

    monkeypatch.setattr(cv2_engine, "available_memory", free)
    assert cv2(cv2_dir, max_batch=1, concurrent_streams=8).flow_cache_bytes \
        == (6 << 30) // 8
    assert seen == ["cpu"]
    # a replica sharing the machine with two others takes a third of the share
    assert cv2(cv2_dir, max_batch=1, concurrent_streams=8, flow_cache_share=0.5 / 3
               ).flow_cache_bytes == int((12 << 30) * (0.5 / 3)) // 8
    monkeypatch.setattr(cv2_engine, "available_memory", lambda device: None)
    assert cv2(cv2_dir, concurrent_streams=8).flow_cache_bytes == FLOW_STREAM_CACHE_BYTES


def stream_and_watch(engine: Any, request: SynthesisRequest, monkeypatch: pytest.MonkeyPatch,
                     state: Any) -> tuple[list[np.ndarray], list[Any]]:
    """The request's chunks, and ``state(stream)`` after every chunk of its streams."""
    start_stream, states = engine.token2wav.start_stream, []

    def watched(*args: Any, **kwargs: Any) -> Any:
        streams: list[Any] = []
        kwargs["on_chunk"] = lambda trace: states.append(state(streams[0]))
        streams.append(start_stream(*args, **kwargs))
        return streams[0]

    with monkeypatch.context() as patch:
        patch.setattr(engine.token2wav, "start_stream", watched)
        chunks = list(engine.synthesize(request, threading.Event()))
    return chunks, states


def test_a_stream_over_its_budget_gives_the_same_audio(cv2_dir: Path, prompt: Audio,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Streams whose share is nothing or runs out midway recompute; the samples are those of a
    stream whose cache never fills, bit for bit."""
    request = SynthesisRequest(Mode.ZERO_SHOT, text=TEXT, prompt=prompt, prompt_text=PROMPT_TEXT,
                               stream=True)
    roomy = cv2(cv2_dir, flow_cache_memory=1 << 34)

    def lean(stream: Any) -> bool:
        return stream._flow_cache.lean

    want, states = stream_and_watch(roomy, request, monkeypatch, lean)
    assert len(want) >= 3 and not any(states)
    # a share of 150 mel frames: the aligned prompt and the first chunks fit, later ones not
    midway = 150 * frame_bytes(roomy) + 1
    for total in (0, midway):
        engine = cv2(cv2_dir, flow_cache_memory=total)
        got, states = stream_and_watch(engine, request, monkeypatch, lean)
        assert states[-1] and (total == 0) == states[0]
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            assert np.array_equal(a, b)


def test_batched_streams_over_their_budget_give_the_audio_alone(cv2_dir: Path, prompt: Audio
                                                                ) -> None:
    """Two streams at once in a batch whose total leaves each too little: every chunk
    recomputes, and each gives its audio alone (within the batch's rounding, see
    test_cv2_batching.py)."""
    requests = [SynthesisRequest(Mode.ZERO_SHOT, text=text, prompt=prompt,
                                 prompt_text=PROMPT_TEXT, stream=True)
                for text in (TEXT, "今天天气很好，我们去公园散步吧！")]
    alone = cv2(cv2_dir, flow_cache_memory=1 << 34)
    want = [np.concatenate(list(alone.synthesize(r, threading.Event()))) for r in requests]
    batched = cv2(cv2_dir, max_batch=2, flow_cache_memory=frame_bytes(alone))
    got: list[np.ndarray | None] = [None, None]

    def run(i: int) -> None:
        got[i] = np.concatenate(list(batched.synthesize(requests[i], threading.Event())))

    try:
        assert batched.flow_cache_bytes < frame_bytes(alone)  # not even one frame
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        assert batched.scheduler is not None and batched.scheduler.stats.peak_batch == 2
    finally:
        assert batched.scheduler is not None
        batched.scheduler.close()
    for g, w in zip(got, want, strict=True):
        assert g is not None and len(g) == len(w) > 0
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- CosyVoice 3


def cv3(path: Path, **options: Any) -> CosyVoice3Engine:
    return CosyVoice3Engine.from_model_dir(path, threads=1, device="cpu", seed=5,
                                           precision="float32", **options)


def test_cosyvoice3_dit_cache_bytes_per_frame(cv3_model_dir: Path) -> None:
    """What stream_cache_bytes_per_frame says is what a stream's DiT cache holds."""
    flow = cv3(cv3_model_dir).models.flow
    config, gen = flow.config, torch.Generator().manual_seed(1)
    prompt_token = torch.randint(0, config.vocab_size, (1, 30), generator=gen, dtype=torch.int32)
    prompt_feat = torch.randn(1, 30 * config.token_mel_ratio, config.output_size, generator=gen)
    token = torch.randint(0, config.vocab_size, (1, 60), generator=gen, dtype=torch.int32)
    embedding = torch.randn(1, config.spk_embed_dim, generator=gen)
    cache = flow.new_stream_cache()
    flow.inference(token, prompt_token, prompt_feat, embedding, streaming=True, finalize=False,
                   cache=cache)
    held = sum(t.numel() * t.element_size() for step in cache.steps
               for t in (*step.keys, *step.values))
    assert cache.frames > 0 and held == cache.frames * flow.stream_cache_bytes_per_frame()


def test_cosyvoice3_streams_share_the_total_and_keep_their_audio(
        cv3_model_dir: Path, prompt: Audio, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CosyVoice 3 engine bounds its streams' DiT caches (in frames) by the same rule, and a
    stream whose bound is nothing gives the samples of one whose bound is never reached."""
    roomy = cv3(cv3_model_dir, flow_cache_memory=1 << 34)
    per_frame = roomy.models.flow.stream_cache_bytes_per_frame()
    assert roomy.token2wav.dit_cache_max_frames == DIT_CACHE_MAX_FRAMES  # the per-stream limit
    total = 10 << 20
    shared = cv3(cv3_model_dir, max_batch=4, flow_cache_memory=total)
    assert shared.scheduler is not None
    shared.scheduler.close()
    assert shared.flow_cache_bytes == int(total // 4 / 1.1)
    assert shared.token2wav.dit_cache_max_frames == shared.flow_cache_bytes // per_frame

    def frames(stream: Any) -> int:
        cache = stream._driver.flow.cache
        return -1 if cache is None else cache.frames  # None after the final call

    request = SynthesisRequest(Mode.ZERO_SHOT, text=TEXT, prompt=prompt, prompt_text=PROMPT_TEXT,
                               stream=True)
    want, held = stream_and_watch(roomy, request, monkeypatch, frames)
    assert len(want) >= 2 and max(held) > 0
    tight = cv3(cv3_model_dir, flow_cache_memory=0)
    assert tight.token2wav.dit_cache_max_frames == 0
    got, held = stream_and_watch(tight, request, monkeypatch, frames)
    assert max(held) <= 0
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert np.array_equal(a, b)
