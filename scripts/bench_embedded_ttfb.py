#!/usr/bin/env python
"""First audio of the embedded engine for a two-sentence text: p50/p95, in-process and through
the gateway, plus the real-time factor and the memory the process holds.

    .venv/bin/python scripts/bench_embedded_ttfb.py [--runs 10] [--threads N] [--no-gateway]
        [--speakers 英文女,中文女]

In-process: ``EmbeddedEngine.synthesize`` until its first chunk (the rest is drained, so the
next run starts on an idle engine). Gateway: the stack of scripts/bench_ttfb.py (Envoy + gRPC
server, embedded engine, loopback ports), REST ``/inference_sft`` through Envoy and direct gRPC
``Synthesize``, time to the first audio byte. Every figure is over ``--runs`` runs after one
untimed warm-up run per text; p95 is the nearest-rank value. Run it on a quiet machine and
print ``uptime`` with the figures.
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS.parent))
sys.path.insert(0, str(SCRIPTS))

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


def in_process(engine: EmbeddedEngine, speaker: str, text: str) -> tuple[float, float, float]:
    """(time to first chunk, total wall time, audio seconds)."""
    request = SynthesisRequest(Mode.SFT, text=text, speaker_id=speaker)
    start = time.perf_counter()
    first, samples = None, 0
    for chunk in engine.synthesize(request, threading.Event()):
        if first is None:
            first = time.perf_counter() - start
        samples += len(chunk)
    return first or math.nan, time.perf_counter() - start, samples / SAMPLE_RATE


def row(label: str, firsts: list[float], walls: list[float], audio: list[float]) -> str:
    rtf = sum(walls) / sum(audio)
    p50, p95 = percentile(firsts, 0.5) * 1000, percentile(firsts, 0.95) * 1000
    return f"{label:<24} {p50:8.0f} {p95:8.0f} {min(firsts) * 1000:8.0f} {rtf:6.3f}"


HEADER = f"{'speaker / path':<24} {'p50 ms':>8} {'p95 ms':>8} {'min ms':>8} {'RTF':>6}"


def bench_in_process(args: argparse.Namespace, speakers: list[str]) -> None:
    start = time.perf_counter()
    engine = EmbeddedEngine(threads=args.threads)
    print(f"engine start-up {time.perf_counter() - start:.2f} s, threads={engine.threads}, "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print(f"\nin-process, {args.runs} runs per text\n{HEADER}")
    all_first = []
    for speaker in speakers:
        text = TWO_SENTENCES[speaker]
        in_process(engine, speaker, text)
        runs = [in_process(engine, speaker, text) for _ in range(args.runs)]
        firsts = [r[0] for r in runs]
        all_first += firsts
        print(row(speaker, firsts, [r[1] for r in runs], [r[2] for r in runs]))
    print(f"{'all speakers':<24} {percentile(all_first, 0.5) * 1000:8.0f} "
          f"{percentile(all_first, 0.95) * 1000:8.0f} {min(all_first) * 1000:8.0f}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process {peak:.0f} MiB (engine + G2P dictionaries)")


def bench_gateway(args: argparse.Namespace, speakers: list[str]) -> None:
    import signal

    import grpc
    from bench_ttfb import grpc_run, rest_run, start_stack

    from service.gen.cosyvoice.v1 import tts_pb2_grpc

    with tempfile.TemporaryDirectory() as tmp:
        proc, rest_url, target, key = start_stack(Path(tmp))
        try:
            with grpc.insecure_channel(target) as channel:
                stub = tts_pb2_grpc.TextToSpeechServiceStub(channel)
                print(f"\nthrough the stack, {args.runs} runs per text and path\n{HEADER}")
                for speaker in speakers:
                    text = TWO_SENTENCES[speaker]
                    rest_run(rest_url, key, speaker, text)
                    grpc_run(stub, key, speaker, text)
                    rest = [rest_run(rest_url, key, speaker, text) for _ in range(args.runs)]
                    direct = [grpc_run(stub, key, speaker, text) for _ in range(args.runs)]
                    print(row(f"{speaker} REST/Envoy", [r[0] for r in rest], [r[1] for r in rest],
                              [r[2] for r in rest]))
                    print(row(f"{speaker} gRPC", [r[0] for r in direct],
                              [r[1] for r in direct], [r[2] for r in direct]))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("--speakers", default=",".join(TWO_SENTENCES),
                        help="comma-separated preset speakers (in-process)")
    parser.add_argument("--gateway-speakers", default="英文女,中文女",
                        help="comma-separated preset speakers timed through the stack")
    parser.add_argument("--no-gateway", action="store_true", help="in-process figures only")
    args = parser.parse_args()
    speakers = [s for s in args.speakers.split(",") if s]
    unknown = [s for s in speakers if s not in TWO_SENTENCES]
    if unknown:
        parser.error(f"no two-sentence text for {unknown}; choose from {', '.join(TWO_SENTENCES)}")
    with open("/proc/loadavg") as f:
        print(f"load average {' '.join(f.read().split()[:3])}")
    bench_in_process(args, speakers)
    if not args.no_gateway:
        bench_gateway(args, [s for s in args.gateway_speakers.split(",") if s])
    with open("/proc/loadavg") as f:
        print(f"load average {' '.join(f.read().split()[:3])}")


if __name__ == "__main__":
    main()
