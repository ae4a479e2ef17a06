"""Time the embedded engine: start-up, time to first chunk and real-time factor per text.

    .venv/bin/python scripts/bench_embedded.py [--threads N] [--repeat N]

RTF = synthesis wall time / audio duration (below 1 is faster than real time). Each text is run
once untimed first so that one-off costs (G2P dictionaries, allocator growth) do not count.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tts_core.embedded.engine import SAMPLE_RATE, EmbeddedEngine  # noqa: E402
from tts_core.engine import Mode, SynthesisRequest  # noqa: E402

TEXTS = [
    ("英文女", "Hello! This is the embedded engine speaking."),
    ("英文男", "Streaming speech should start quickly, even when the text is long. The engine "
              "cuts the text into sentences and clauses, and sends each as soon as it is ready."),
    ("中文女", "今天天气很好，我们一起去公园散步吧。人工智能语音合成技术近年来发展迅速。"),
    ("中文男", "我们用Python写了一个语音合成服务，它支持流式输出。"),
    ("日语男", "こんにちは、今日はいい天気ですね。東京へ行きましょう。"),
    ("粤语女", "我今日好開心，我哋去飲茶。"),
    ("韩语女", "안녕하세요. 오늘 날씨가 좋네요."),
]


def run_once(engine: EmbeddedEngine, speaker: str, text: str) -> tuple[float, float, float, int]:
    """(time to first chunk, total wall time, audio seconds, chunks)."""
    request = SynthesisRequest(Mode.SFT, text=text, speaker_id=speaker)
    start = time.perf_counter()
    first = None
    samples = chunks = 0
    for chunk in engine.synthesize(request, threading.Event()):
        if first is None:
            first = time.perf_counter() - start
        samples += len(chunk)
        chunks += 1
    return first or 0.0, time.perf_counter() - start, samples / SAMPLE_RATE, chunks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per text (median)")
    args = parser.parse_args()

    start = time.perf_counter()
    engine = EmbeddedEngine(threads=args.threads)
    print(f"engine start-up: {time.perf_counter() - start:.2f} s (threads={engine.threads})")
    print(f"{'speaker':<6} {'chars':>5} {'chunks':>6} {'first chunk':>11} {'audio':>7} "
          f"{'wall':>6} {'RTF':>5}")
    rtfs = []
    for speaker, text in TEXTS:
        run_once(engine, speaker, text)
        runs = [run_once(engine, speaker, text) for _ in range(args.repeat)]
        first = statistics.median(r[0] for r in runs)
        wall = statistics.median(r[1] for r in runs)
        audio, chunks = runs[0][2], runs[0][3]
        rtfs.append(wall / audio)
        print(f"{speaker:<6} {len(text):>5} {chunks:>6} {first:>9.2f} s {audio:>5.2f} s "
              f"{wall:>4.2f} s {wall / audio:>5.2f}")
    print(f"median RTF {statistics.median(rtfs):.2f}")


if __name__ == "__main__":
    main()
