#!/usr/bin/env python3
"""First audio of the first requests after an engine loads, with and without the warm-up.

    scripts/bench_cv2_cold_start.py --model-dir DIR [--requests 3] [--threads 2] [--runs 1]

Each setting runs in a fresh process (what is measured is a process's first time): load the
engine, run ``CosyVoice2Engine.warm_up`` (the service's ``--warm-up on``) or not, register a
speaker from shared/audio/zero_shot_prompt.wav, then stream ``--requests`` requests one after
the other and print each one's first-audio time and total time, and the warm-up's seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PROMPT_TEXT = "希望你以后能够做的比我还好呦。"
TEXTS = ["收到好友从远方寄来的生日礼物，那份意外的惊喜让我心中充满了快乐。",
         "今天天气很好，我们去公园散步吧。"]


def one_process(model_dir: Path, warm: bool, requests: int, threads: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import soundfile

    from tts_core.cosyvoice2.engine import CosyVoice2Engine
    from tts_core.engine import Audio, Mode, SynthesisRequest
    from tts_core.registry import detect_engine
    from tts_core.short_thread import on_short_thread

    if detect_engine(model_dir) == "cosyvoice3":
        from tts_core.cosyvoice3.engine import CosyVoice3Engine as engine_class
    else:
        engine_class = CosyVoice2Engine
    engine = engine_class.from_model_dir(model_dir, threads=threads, device="cpu", seed=1)
    warm_seconds = on_short_thread(engine.warm_up) if warm else 0.0
    samples, rate = soundfile.read(SHARED / "audio" / "zero_shot_prompt.wav", dtype="float32")
    engine.register_speaker("bench", Audio(samples, rate), prompt_text=PROMPT_TEXT)
    firsts, totals = [], []
    for i in range(requests):
        request = SynthesisRequest(Mode.ZERO_SHOT, text=TEXTS[i % len(TEXTS)], speaker_id="bench")
        started, first = time.perf_counter(), None
        for _ in engine.synthesize(request, threading.Event()):
            if first is None:
                first = time.perf_counter() - started
        firsts.append(first)
        totals.append(time.perf_counter() - started)
    return {"warm_up_seconds": warm_seconds, "first": firsts, "total": totals}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=1, help="fresh processes per setting")
    parser.add_argument("--child", choices=("warm", "cold"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = one_process(args.model_dir, args.child == "warm", args.requests, args.threads)
        print(json.dumps(result))
        return 0
    print("setting  run  warm-up s  first audio per request (s)   total per request (s)")
    for setting in ("cold", "warm"):
        for run in range(args.runs):
            out = subprocess.run([sys.executable, __file__, "--model-dir", str(args.model_dir),
                                  "--requests", str(args.requests), "--threads",
                                  str(args.threads), "--child", setting],
                                 capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            firsts = " ".join(f"{x:.2f}" for x in result["first"])
            totals = " ".join(f"{x:.2f}" for x in result["total"])
            print(f"{setting:7s}  {run:3d}  {result['warm_up_seconds']:9.1f}  {firsts:28s}  "
                  f"{totals}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
