#!/usr/bin/env python
"""First audio of the embedded engine for a two-sentence text: p50/p95, in-process and through
the gateway, plus the real-time factor and the memory the process holds.

    .venv/bin/python scripts/bench_embedded_ttfb.py [--runs 10] [--threads N] [--no-gateway]
        [--speakers 英文女,中文女]

In-process: ``EmbeddedEngine.synthesize`` until its first chunk, then cancelled. Gateway: the
stack of scripts/bench_ttfb.py (Envoy + gRPC server, embedded engine, loopback ports), REST
``/inference_sft`` through Envoy and direct gRPC ``Synthesize``, time to the first audio byte,
then the call is closed. Every figure is over ``--runs`` runs after one untimed warm-up run per
text; p95 is the nearest-rank value. Then the real-time factor of whole texts (wall time /
audio time) and the process's peak memory. Run it on a quiet machine: the load average is
printed before and after.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS.parent))
sys.path.insert(0, str(SCRIPTS))

from tts_core.embedded import runners  # noqa: E402
from tts_core.embedded.engine import SAMPLE_RATE, EmbeddedEngine  # noqa: E402
from tts_core.engine import Mode, SynthesisRequest  # noqa: E402

# Two sentences per preset, none of them in the tuning or the test sets.
TWO_SENTENCES = {
    "英文女": "Good evening, and welcome back. Tonight we look at how rivers shape the land.",
    "英文男": "The meeting has been moved to Friday. Please bring the printed plans with you.",
    "中文女": "欢迎收听今天的晚间新闻。首先来看一下明天的天气情况。",
    "中文男": "我们的列车即将到达终点站。请带好您的随身物品，准备下车。",
    "日语男": "本日はご来店ありがとうございます。ごゆっくりお過ごしください。",
    "粤语女": "各位乘客，列車即將到站。請準備好你嘅行李。",
    "韩语女": "오늘 회의는 오후 세 시에 시작합니다. 늦지 않게 와 주세요.",
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def first_chunk(engine: EmbeddedEngine, speaker: str, text: str, stream: bool = True
                ) -> tuple[float, float]:
    """(seconds to the first chunk, its audio seconds); the request is cancelled after it.
    ``stream=False`` is sentence mode: no short first piece, the whole first sentence first."""
    request = SynthesisRequest(Mode.SFT, text=text, speaker_id=speaker, stream=stream)
    cancel = threading.Event()
    start = time.perf_counter()
    chunk = next(engine.synthesize(request, cancel))
    elapsed = time.perf_counter() - start
    cancel.set()
    return elapsed, len(chunk) / SAMPLE_RATE


def whole(engine: EmbeddedEngine, speaker: str, text: str) -> tuple[float, float, float]:
    """(wall seconds, audio seconds, stall seconds) of the whole text. A stall is time a
    listener who starts playing at the first chunk waits for a later chunk: with a short first
    piece, the next one must be ready before the first has played."""
    request = SynthesisRequest(Mode.SFT, text=text, speaker_id=speaker)
    start = time.perf_counter()
    samples, stall, playing_until = 0, 0.0, None
    for chunk in engine.synthesize(request, threading.Event()):
        now = time.perf_counter()
        if playing_until is not None and now > playing_until:
            stall += now - playing_until
        playing_until = max(now, playing_until or now) + len(chunk) / SAMPLE_RATE
        samples += len(chunk)
    return time.perf_counter() - start, samples / SAMPLE_RATE, stall


def ms(values: list[float]) -> str:
    return (f"{percentile(values, 0.5) * 1000:8.0f} {percentile(values, 0.95) * 1000:8.0f} "
            f"{min(values) * 1000:8.0f}")


HEADER = f"{'speaker / path':<24} {'p50 ms':>8} {'p95 ms':>8} {'min ms':>8}"


def novel_texts(speaker: str) -> list[str]:
    """Two-sentence texts the engine has not read before in this process: consecutive pairs of
    the speaker's held-out sentences (tests/embedded_sentences.py). A runtime that prepares its
    kernels per input shape pays for that on such texts, not on a text it has just read."""
    from tests.embedded_sentences import HELD_OUT
    from tts_core.embedded.speakers import PRESET_SPEAKERS

    language = next(s.language for s in PRESET_SPEAKERS if s.id == speaker)
    sentences = HELD_OUT[language]
    return [f"{a} {b}" if language == "en" else a + b
            for a, b in zip(sentences[:-1], sentences[1:], strict=True)]


def bench_in_process(args: argparse.Namespace, speakers: list[str]) -> None:
    engines = {}
    for runtime in args.runtimes:
        start = time.perf_counter()
        engine = EmbeddedEngine(threads=args.threads, runtime=runtime)
        engines[engine.runtime] = engine
        print(f"{engine.runtime}: engine start-up {time.perf_counter() - start:.2f} s, "
              f"threads={engine.threads}")
    print(f"\nin-process first audio, {args.runs} runs per text; streaming (short first piece) "
          f"and, interleaved with it, sentence mode (whole first sentence); then once each, "
          f"texts not read before (held-out sentence pairs)\n{HEADER} {'1st chunk s':>11}")
    totals: dict[str, list[float]] = {}
    for speaker in speakers:
        text = TWO_SENTENCES[speaker]
        for runtime, engine in engines.items():
            first_chunk(engine, speaker, text)
            first_chunk(engine, speaker, text, stream=False)
            runs, sentence = [], []
            for _ in range(args.runs):  # interleaved, so both see the same load
                runs.append(first_chunk(engine, speaker, text))
                sentence.append(first_chunk(engine, speaker, text, stream=False))
            novel = [first_chunk(engine, speaker, t)[0] for t in novel_texts(speaker)]
            for label, values in (("", [r[0] for r in runs]),
                                  (" sentence", [r[0] for r in sentence]), (" novel", novel)):
                totals.setdefault(runtime + label, []).extend(values)
            print(f"{speaker + ' ' + runtime:<24} {ms([r[0] for r in runs])} {runs[0][1]:11.2f}")
            print(f"{'  sentence mode':<24} {ms([r[0] for r in sentence])} {sentence[0][1]:11.2f}")
            print(f"{'  novel texts':<24} {ms(novel)}")
    for label, values in totals.items():
        print(f"{'all: ' + label:<24} {ms(values)}")
    print(f"\nwhole text streamed, {args.rtf_runs} runs per text (medians)\n{'speaker':<24} "
          f"{'wall s':>8} {'audio s':>8} {'RTF':>6} {'stall s':>8}")
    for runtime, engine in engines.items():
        walls = audios = stalls = 0.0
        for speaker in speakers:
            runs = [whole(engine, speaker, TWO_SENTENCES[speaker]) for _ in range(args.rtf_runs)]
            wall, audio = percentile([r[0] for r in runs], 0.5), runs[0][1]
            stall = percentile([r[2] for r in runs], 0.5)
            walls, audios, stalls = walls + wall, audios + audio, stalls + stall
            print(f"{speaker + ' ' + runtime:<24} {wall:8.2f} {audio:8.2f} {wall / audio:6.3f} "
                  f"{stall:8.2f}")
        print(f"{'all ' + runtime:<24} {walls:8.2f} {audios:8.2f} {walls / audios:6.3f} "
              f"{stalls:8.2f}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process {peak:.0f} MiB (every runtime's model, voices, G2P "
          f"dictionaries, taggers)")


def rest_first_byte(rest_url: str, key: str, speaker: str, text: str) -> float:
    import requests

    started = time.perf_counter()
    with requests.request("GET", f"{rest_url}/inference_sft", stream=True, timeout=300,
                          data={"tts_text": text, "spk_id": speaker},
                          headers={"X-API-TOKEN": key}) as reply:
        reply.raise_for_status()
        next(piece for piece in reply.iter_content(chunk_size=None) if piece)
        return time.perf_counter() - started


def grpc_first_byte(stub, key: str, speaker: str, text: str) -> float:
    from service.gen.cosyvoice.v1 import tts_pb2

    started = time.perf_counter()
    request = tts_pb2.SynthesizeRequest(text=text, sft=tts_pb2.SftMode(speaker_id=speaker),
                                        sample_rate=22050)
    call = stub.Synthesize(request, metadata=(("x-api-token", key),), timeout=300)
    next(reply for reply in call if reply.HasField("audio"))
    elapsed = time.perf_counter() - started
    call.cancel()
    return elapsed


def bench_gateway(args: argparse.Namespace, speakers: list[str]) -> None:
    """First audio byte through the stack, for each runtime (the server reads it from the
    environment); each call is closed after it (the server cancels the rest), then a short
    pause lets the engine go idle before the next call."""
    import signal

    import grpc
    from bench_ttfb import start_stack

    from service.gen.cosyvoice.v1 import tts_pb2_grpc

    for runtime in args.runtimes:
        os.environ[runners.RUNTIME_ENV] = runtime
        with tempfile.TemporaryDirectory() as tmp:
            proc, rest_url, target, key = start_stack(Path(tmp))
            try:
                with grpc.insecure_channel(target) as channel:
                    stub = tts_pb2_grpc.TextToSpeechServiceStub(channel)
                    print(f"\nthrough the stack ({runtime}), first audio byte, {args.runs} runs "
                          f"per text and path\n{HEADER}")
                    paths = (("REST/Envoy", rest_first_byte, rest_url),
                             ("gRPC", grpc_first_byte, stub))
                    for speaker in speakers:
                        for label, call, via in paths:
                            times = timed_calls(args, call, via, key, speaker)
                            print(f"{speaker + ' ' + label:<24} {ms(times)}")
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)


def timed_calls(args: argparse.Namespace, call, via, key: str, speaker: str) -> list[float]:
    text = TWO_SENTENCES[speaker]
    call(via, key, speaker, text)  # untimed warm-up
    times = []
    for _ in range(args.runs):
        time.sleep(args.pause)
        times.append(call(via, key, speaker, text))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--rtf-runs", type=int, default=3, help="whole-text runs per text")
    parser.add_argument("--pause", type=float, default=1.0,
                        help="seconds between gateway calls (the cancelled rest winds down)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("--speakers", default=",".join(TWO_SENTENCES),
                        help="comma-separated preset speakers (in-process)")
    parser.add_argument("--gateway-speakers", default="英文女,中文女",
                        help="comma-separated preset speakers timed through the stack")
    parser.add_argument("--no-gateway", action="store_true", help="in-process figures only")
    parser.add_argument("--no-in-process", action="store_true", help="gateway figures only")
    parser.add_argument("--runtimes", default="onnxruntime",
                        help="comma-separated: onnxruntime, openvino (side by side)")
    args = parser.parse_args()
    args.runtimes = [r for r in args.runtimes.split(",") if r]
    if not set(args.runtimes) <= set(runners.RUNTIMES):
        parser.error(f"--runtimes: choose from {', '.join(runners.RUNTIMES)}")
    speakers = [s for s in args.speakers.split(",") if s]
    unknown = [s for s in speakers if s not in TWO_SENTENCES]
    if unknown:
        parser.error(f"no two-sentence text for {unknown}; choose from {', '.join(TWO_SENTENCES)}")
    with open("/proc/loadavg") as f:
        print(f"load average {' '.join(f.read().split()[:3])}")
    if not args.no_in_process:
        bench_in_process(args, speakers)
    if not args.no_gateway:
        bench_gateway(args, [s for s in args.gateway_speakers.split(",") if s])
    with open("/proc/loadavg") as f:
        print(f"load average {' '.join(f.read().split()[:3])}")


if __name__ == "__main__":
    main()
