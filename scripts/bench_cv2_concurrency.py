#!/usr/bin/env python3
"""Many streams at once through the real gRPC server: throughput, first audio, stalls.

    scripts/bench_cv2_concurrency.py (--model-dir DIR | --preset tiny) [--streams 1,2,4,8]
        [--tokens 100] [--rounds 2] [--threads 2] [--max-batch 8] [--baseline]

A CosyVoice 3 directory (``cosyvoice3.yaml``) runs the CosyVoice 3 engine, which shares the
scheduler. The model directory is loaded once; for each server setting (the batch scheduler with
``--max-batch``, and with ``--baseline`` also today's thread-per-request server at
``--max-concurrent 2``) an in-process gRPC server is started on a real socket and 1, 2, 4, 8
concurrent streaming Synthesize calls are sent from client threads. Every request speaks
exactly ``--tokens`` speech tokens (the sampler refuses stop ids until then, then stops, as the
speed benchmark does), so every setting makes the same audio. The voice is a speaker registered
once from shared/audio/zero_shot_prompt.wav (or ``--prompt``), so no request pays for prompt
encoding.

Per concurrency level it prints: aggregate audio seconds per wall second (and its ratio to one
stream), p50/p95 time to first audio over all streams of all rounds, stalls per stream (a chunk
arriving after the audio before it would have finished playing, playback starting at the first
chunk), seconds stalled per stream, the longest gap between two chunks of a stream, and the mean
decode batch of the scheduler, the mean number of streams per output round (their flow chunks
are solved together), the share of its time spent in LM steps (the rest is flow + vocoder
chunks) and the "LM-free bound": the ratio to one stream this level could reach if every LM
step cost nothing, i.e. one stream's wall seconds per audio second over this level's flow +
vocoder seconds per audio second. On a CPU those are compute on cores one stream already keeps
busy, so no faster LM step beats that bound; only flow and vocoder work that costs less per
stream (packed better, or faster kernels that do not speed one stream up as much) moves it.
``--compare-flow`` also runs the scheduler with every flow chunk solved alone, side by
side in the same process. ``uptime`` load is printed before and after: the figures depend
on what else runs on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402
import soundfile  # noqa: E402
import torch  # noqa: E402

from service.gen.cosyvoice.v1 import tts_pb2, tts_pb2_grpc  # noqa: E402
from service.server import start_server  # noqa: E402
from tts_core.allocator import tune_allocator  # noqa: E402
from tts_core.batching.cuda_graphs import ENV_SWITCH  # noqa: E402
from tts_core.batching.scheduler import MAX_OUTPUT_BATCH  # noqa: E402
from tts_core.cosyvoice2.engine import CosyVoice2Engine, _Randomness  # noqa: E402
from tts_core.cosyvoice2.testing.make_model_dir import make_model_dir  # noqa: E402
from tts_core.cosyvoice3.engine import CosyVoice3Engine  # noqa: E402
from tts_core.engine import Audio  # noqa: E402
from tts_core.registry import detect_engine  # noqa: E402
from tts_core.short_thread import on_short_thread  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PROMPT_TEXT = "希望你以后能够做的比我还好呦。"
TEXT = "收到好友从远方寄来的生日礼物，那份意外的惊喜让我心中充满了快乐。"


class ForcedLength:
    """Refuses stop ids until ``n`` tokens, then stops: every request makes ``n`` tokens."""

    def __init__(self, inner, n: int, eos: int) -> None:  # noqa: ANN001 - any sampler
        self.inner, self.n, self.eos = inner, n, eos

    def __call__(self, logp: torch.Tensor, decoded: list[int], ignore_eos: bool) -> int:
        if len(decoded) >= self.n:
            return self.eos
        return self.inner(logp, decoded, True)


def bench_engine(base: type[CosyVoice2Engine]) -> type[CosyVoice2Engine]:
    """``base`` (the CosyVoice 2 or 3 engine) with every request forced to ``forced_tokens``."""

    class BenchEngine(base):  # type: ignore[valid-type,misc]
        forced_tokens = 100

        def _sampler(self, randomness: _Randomness):  # noqa: ANN202
            return ForcedLength(super()._sampler(randomness), self.forced_tokens,
                                self.models.lm.config.eos_token)

    return BenchEngine


@dataclass
class StreamResult:
    start: float
    arrivals: list[tuple[float, float]]  # (time, seconds of audio in the chunk)
    error: str = ""

    @property
    def audio(self) -> float:
        return sum(a for _, a in self.arrivals)

    @property
    def first(self) -> float:
        return self.arrivals[0][0] - self.start if self.arrivals else float("nan")

    def stalls(self) -> tuple[int, float, float]:
        """(stalls, seconds stalled, longest gap between chunks) of real-time playback."""
        if not self.arrivals:
            return 0, 0.0, 0.0
        played_until = self.arrivals[0][0]  # wall time at which the buffer runs dry
        count, stalled, gap = 0, 0.0, 0.0
        previous = self.arrivals[0][0]
        for when, seconds in self.arrivals:
            gap = max(gap, when - previous)
            previous = when
            if when > played_until + 1e-3:
                count += 1
                stalled += when - played_until
                played_until = when
            played_until += seconds
        return count, stalled, gap


def one_stream(target: str, key: str, request: tts_pb2.SynthesizeRequest,
               result: StreamResult) -> None:
    try:
        with grpc.insecure_channel(target) as channel:
            stub = tts_pb2_grpc.TextToSpeechServiceStub(channel)
            result.start = time.perf_counter()
            for reply in stub.Synthesize(request, metadata=(("x-api-token", key),),
                                         timeout=3600):
                if reply.HasField("audio"):
                    chunk = reply.audio
                    result.arrivals.append((time.perf_counter(),
                                            len(chunk.data) / 2 / chunk.sample_rate))
    except grpc.RpcError as error:
        result.error = f"{error.code().name}: {error.details()}"


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def run_level(target: str, key: str, request: tts_pb2.SynthesizeRequest, streams: int
              ) -> tuple[float, list[StreamResult]]:
    results = [StreamResult(0.0, []) for _ in range(streams)]
    threads = [threading.Thread(target=one_stream, args=(target, key, request, r))
               for r in results]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, results


def bench_server(engine: CosyVoice2Engine, label: str, max_concurrent: int,
                 levels: list[int], rounds: int, request: tts_pb2.SynthesizeRequest,
                 expected_audio: float, warmup: int = 1) -> None:
    key = secrets.token_urlsafe(24)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    running = asyncio.run_coroutine_threadsafe(start_server(
        engine, host="127.0.0.1", port=0, api_keys=[key], max_concurrent=max_concurrent,
        max_queue=64), loop).result()
    target = f"127.0.0.1:{running.port}"
    try:
        # Warm-up: one round at the most streams, so that each level measures a server that
        # has served that many at once. The memory a server keeps for its streams (key/value
        # blocks, see kv_arena) is then in place; the first time a server reaches N streams
        # its Nth stream pays for faulting its block in (seconds on this project's VM).
        run_level(target, key, request, warmup)
        print(f"\n{label}  ({load()})")
        print("streams  audio s/s  x1-stream  first audio p50 / p95 (s)  stalls/stream  "
              "stalled s/stream  max gap s  mean batch  flow batch  LM share  LM-free bound")
        base = None
        for streams in levels:
            rates, firsts, stalls, stalled, gaps = [], [], [], [], []
            scheduler = engine.scheduler
            # The last round's counters are bumped after its audio went out: let them land
            # before the snapshot, or they count for this level.
            while scheduler is not None and scheduler.occupancy():
                time.sleep(0.01)
            steps0 = scheduler.stats.steps if scheduler else 0
            rows0 = scheduler.stats.decoded_rows if scheduler else 0
            lm0 = scheduler.stats.lm_seconds if scheduler else 0.0
            out0 = scheduler.stats.output_seconds if scheduler else 0.0
            outputs0 = scheduler.stats.outputs if scheduler else 0
            rounds0 = scheduler.stats.output_batches if scheduler else 0
            for _ in range(rounds):
                wall, results = run_level(target, key, request, streams)
                errors = [r.error for r in results if r.error]
                if errors:
                    raise SystemExit(f"{streams} streams: {errors[0]}")
                short = [r.audio for r in results if abs(r.audio - expected_audio) > 0.05]
                if short:
                    raise SystemExit(f"a stream starved: {short[0]:.2f} s of audio instead of "
                                     f"{expected_audio:.2f} s")
                rates.append(sum(r.audio for r in results) / wall)
                for r in results:
                    firsts.append(r.first)
                    count, seconds, gap = r.stalls()
                    stalls.append(count)
                    stalled.append(seconds)
                    gaps.append(gap)
            rate = statistics.median(rates)
            base = base or rate
            batch = share = flow = bound = "-"
            if scheduler:
                output_rounds = max(scheduler.stats.output_batches - rounds0, 1)
                flow = f"{(scheduler.stats.outputs - outputs0) / output_rounds:.2f}"
                steps = scheduler.stats.steps - steps0
                batch = f"{(scheduler.stats.decoded_rows - rows0) / max(steps, 1):.2f}"
                lm = scheduler.stats.lm_seconds - lm0
                output = scheduler.stats.output_seconds - out0
                share = f"{lm / max(lm + output, 1e-9):.0%}"
                # What this level could reach over one stream if its LM steps cost nothing.
                audio = rounds * streams * expected_audio
                bound = f"{(1 / base) / max(output / audio, 1e-9):.2f}"
            print(f"{streams:7d}  {rate:9.3f}  {rate / base:9.2f}  "
                  f"{percentile(firsts, 50):12.2f} / {percentile(firsts, 95):5.2f}  "
                  f"{statistics.mean(stalls):13.2f}  {statistics.mean(stalled):16.2f}  "
                  f"{max(gaps):9.2f}  {batch:>10s}  {flow:>10s}  {share:>8s}  {bound:>13s}",
                  flush=True)
        print(f"({load()})")
    finally:
        asyncio.run_coroutine_threadsafe(running.stop(1.0), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--preset", choices=("tiny",), help="generate a tiny random directory")
    parser.add_argument("--streams", default="1,2,4,8")
    parser.add_argument("--tokens", type=int, default=100,
                        help="speech tokens per request (25 per second of audio)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup-streams", type=int, default=0,
                        help="streams of the unmeasured warm-up round (default: the most "
                             "streams; 1 measures the first time the server reaches a level)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="float32",
                        help="precision option of the engine (float32, auto, int8w, bf16, ...)")
    parser.add_argument("--max-batch", type=int, default=0, help="default: the most streams")
    parser.add_argument("--baseline", action="store_true",
                        help="also measure today's thread-per-request server (max_concurrent 2)")
    parser.add_argument("--prompt", type=Path, default=SHARED / "audio" / "zero_shot_prompt.wav",
                        help="the registered speaker's prompt recording (its transcript is "
                             "PROMPT_TEXT)")
    parser.add_argument("--compare-flow", action="store_true",
                        help="also measure the scheduler with each stream's flow chunk solved "
                             "alone (before the flow was batched across streams)")
    parser.add_argument("--compare-narrow", action="store_true",
                        help="on a GPU, also measure the scheduler as it runs on a CPU (each "
                             "request's own KV cache, at most MAX_OUTPUT_BATCH streams per "
                             "output round): the wide scheduler's gain, side by side")
    parser.add_argument("--compare-graphs", action="store_true",
                        help="on a GPU, also measure the wide scheduler with its decode step "
                             "replayed as CUDA graphs (TTS_CUDA_GRAPHS=1)")
    args = parser.parse_args()
    levels = [int(s) for s in args.streams.split(",")]
    torch.set_num_threads(args.threads)
    tune_allocator()  # as the service and the engine do (allocator.py)
    tmp = None
    model_dir = args.model_dir
    if model_dir is None:
        if args.preset is None:
            parser.error("give --model-dir or --preset tiny")
        tmp = tempfile.TemporaryDirectory(prefix="cv2-bench-")
        model_dir = make_model_dir(Path(tmp.name), args.preset, seed=0)
    print(f"uptime: {load()}; {os.cpu_count()} cores, torch threads {args.threads}")
    started = time.perf_counter()
    # as the engine's from_model_dir does: no OpenMP pool left on this thread (short_thread.py)
    engine_class = bench_engine(CosyVoice3Engine if detect_engine(model_dir) == "cosyvoice3"
                                else CosyVoice2Engine)
    models = on_short_thread(engine_class.load_models, model_dir, device=args.device,
                             onnx_threads=1, precision=args.precision)
    plan = models.precision
    described = f"LM {plan.lm_description}, flow {plan.flow_dtype}" if plan else models.dtype
    print(f"loaded {model_dir} in {time.perf_counter() - started:.1f} s "
          f"({engine_class.__mro__[1].__name__}; {described})")
    samples, rate = soundfile.read(args.prompt, dtype="float32")
    request = tts_pb2.SynthesizeRequest(text=TEXT, zero_shot=tts_pb2.ZeroShotMode(
        speaker_id="bench"))
    expected = args.tokens * models.token_mel_ratio * models.hift.config.upsample_factor
    expected_audio = expected / models.sample_rate
    print(f"{args.tokens} speech tokens per request = {expected_audio:.2f} s of audio; "
          f"{args.rounds} rounds per level (medians of throughput), after a warm-up round of "
          f"{args.warmup_streams or max(levels)} streams")

    most = args.max_batch or max(levels)
    wide = " (wide: KV slab, every due stream per output round)" if models.device.type == \
        "cuda" else ""
    settings = [(f"batch scheduler, max_batch {most}, flow batched across streams{wide}", most,
                 True, False, False)]
    if args.compare_graphs:
        settings.append((f"batch scheduler, max_batch {most}, wide, decode step as CUDA graphs",
                         most, True, False, True))
    if args.compare_narrow:
        settings.insert(0, (f"batch scheduler, max_batch {most}, narrow (per-request KV caches, "
                            f"at most {MAX_OUTPUT_BATCH} streams per output round)", most, True,
                            True, False))
    if args.compare_flow:
        settings.insert(0, (f"batch scheduler, max_batch {most}, flow one stream at a time",
                            most, False, False, False))
    if args.baseline:
        settings.insert(0, ("thread per request, max_concurrent 2 (before)", 1, False, False,
                            False))
    for label, max_batch, batch_flow, narrow, graphs in settings:
        os.environ[ENV_SWITCH] = "1" if graphs else "0"
        engine = engine_class(models, seed=1, max_batch=max_batch)
        if graphs and (engine.scheduler is None or engine.scheduler.lm.graphs is None):
            print(f"\n{label}: no graphs were made (see the log); skipped")
            continue
        if engine.scheduler is not None and not batch_flow:
            engine.scheduler.run_outputs = None
        if engine.scheduler is not None and narrow:
            engine.scheduler.lm.slab = None
            engine.scheduler.max_output_batch = MAX_OUTPUT_BATCH
        engine.forced_tokens = args.tokens
        engine.register_speaker("bench", Audio(samples, rate), prompt_text=PROMPT_TEXT)
        bench_server(engine, label, max_batch if max_batch > 1 else 2, levels, args.rounds,
                     request, expected_audio, args.warmup_streams or max(levels))
        if engine.scheduler is not None:
            engine.scheduler.close()
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
