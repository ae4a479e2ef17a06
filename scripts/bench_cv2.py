#!/usr/bin/env python3
"""Time to first chunk and real-time factor of the CosyVoice 2 engine.

    scripts/bench_cv2.py [--model-dir DIR | --preset tiny|full] [--threads N] [--device auto]
                         [--runs N] [--text TEXT]

Without --model-dir a random model directory of the preset's size is generated in a temporary
folder (``full`` = the official sizes, so the figures are those of the real model's compute; the
weights are random, so the LM's stopping point, hence the audio length, is not the real model's —
RTF is per second of audio produced). Prompt: shared/audio/zero_shot_prompt.wav when present,
else a synthetic voice. Prints one line per mode and streaming setting.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tts_core.cosyvoice2.engine import CosyVoice2Engine  # noqa: E402
from tts_core.cosyvoice2.testing.make_model_dir import make_model_dir, synthetic_voice  # noqa: E402
from tts_core.engine import Audio, Mode, SynthesisRequest  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PROMPT_TEXT = "希望你以后能够做的比我还好呦。"
TEXT = "收到好友从远方寄来的生日礼物，那份意外的惊喜与深深的祝福让我心中充满了甜蜜的快乐。"


def load_prompt() -> Audio:
    path = SHARED / "audio" / "zero_shot_prompt.wav"
    if path.is_file():
        import soundfile

        samples, rate = soundfile.read(path, dtype="float32")
        return Audio(samples, rate)
    return Audio(synthetic_voice(3.5, 180.0, 24000, seed=1), 24000)


def run(engine: CosyVoice2Engine, request: SynthesisRequest) -> tuple[float, float, float, int]:
    """(time to first chunk, wall time, audio seconds, chunks)."""
    started = time.perf_counter()
    first = None
    samples = 0
    chunks = 0
    for chunk in engine.synthesize(request, threading.Event()):
        if first is None:
            first = time.perf_counter() - started
        samples += len(chunk)
        chunks += 1
    wall = time.perf_counter() - started
    return first or wall, wall, samples / engine.sample_rate, chunks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--preset", default="tiny", choices=("tiny", "full"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--text", default=TEXT)
    parser.add_argument("--modes", default="zero_shot,cross_lingual",
                        help="comma-separated modes among zero_shot, cross_lingual, instruct, "
                             "voice_conversion")
    args = parser.parse_args()

    tmp = None
    model_dir = args.model_dir
    if model_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix=f"cv2-{args.preset}-")
        started = time.perf_counter()
        torch.set_num_threads(args.threads)
        model_dir = make_model_dir(Path(tmp.name), args.preset, seed=0)
        print(f"generated a random {args.preset} model directory in "
              f"{time.perf_counter() - started:.1f} s")
    started = time.perf_counter()
    engine = CosyVoice2Engine.from_model_dir(model_dir, threads=args.threads, device=args.device,
                                             seed=0)
    print(f"loaded in {time.perf_counter() - started:.1f} s on {engine.models.device} "
          f"({engine.models.dtype}), {args.threads} threads")
    prompt = load_prompt()
    requests = {
        "zero_shot": dict(mode=Mode.ZERO_SHOT, prompt=prompt, prompt_text=PROMPT_TEXT),
        "cross_lingual": dict(mode=Mode.CROSS_LINGUAL, prompt=prompt),
        "instruct": dict(mode=Mode.INSTRUCT, prompt=prompt, instruct_text="用开心的语气说"),
        "voice_conversion": dict(mode=Mode.VOICE_CONVERSION, prompt=prompt, source=prompt),
    }
    for name in args.modes.split(","):
        for stream in (True, False):
            request = SynthesisRequest(text=args.text, stream=stream, **requests[name])
            run(engine, request)  # warm-up (allocations, first-call costs)
            results = [run(engine, request) for _ in range(args.runs)]
            ttfc = statistics.median(r[0] for r in results)
            wall = statistics.median(r[1] for r in results)
            audio = statistics.median(r[2] for r in results)
            chunks = results[0][3]
            print(f"{name:16s} stream={str(stream):5s} first chunk {ttfc * 1000:7.0f} ms  "
                  f"total {wall:6.2f} s  audio {audio:5.2f} s  RTF {wall / max(audio, 1e-9):5.2f}"
                  f"  chunks {chunks}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
