#!/usr/bin/env python3
"""Where the first streamed chunk of a CosyVoice 2 request spends its time, stage by stage.

    scripts/profile_cv2_first_chunk.py --model-dir /work/models/cv2-full --threads 2 --runs 3

Wraps the engine's stages with timers (wall and process CPU seconds, all threads) and runs
first-chunk requests (forced to speech tokens only, then cancelled) with prompt audio in the
request and with a registered speaker, after one warm-up of each. Prints per-stage medians.

Two settings side by side in one process, run after run (``--modes``): ``before`` computes a
stream's prompt chunks one by one and conditions streams on the whole flow prompt (the engine
before the grouped prompt run and the prompt alignment); ``after`` is the engine's default.
Each setting keeps its own speaker flow caches. On a shared machine set
OMP_WAIT_POLICY=PASSIVE (see the README) and compare CPU seconds and ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_cv2_speed import PROMPT_WAV, CosyVoice2Probe  # noqa: E402


class Timers:
    def __init__(self) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.depth = 0

    def wrap(self, owner: Any, name: str, stage: str) -> None:
        inner = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            w, c = time.perf_counter(), time.process_time()
            try:
                return inner(*args, **kwargs)
            finally:
                self.wall[stage] += time.perf_counter() - w
                self.cpu[stage] += time.process_time() - c
        setattr(owner, name, timed)

    def wrap_generator(self, owner: Any, name: str, first: str, rest: str) -> None:
        inner: Callable[..., Iterator[Any]] = getattr(owner, name)
        timers = self

        def timed(*args: Any, **kwargs: Any) -> Iterator[Any]:
            it = inner(*args, **kwargs)
            stage = first
            while True:
                w, c = time.perf_counter(), time.process_time()
                try:
                    item = next(it)
                except StopIteration:
                    return
                finally:
                    timers.wall[stage] += time.perf_counter() - w
                    timers.cpu[stage] += time.process_time() - c
                stage = rest
                yield item
        setattr(owner, name, timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--precision", default="float32")
    ap.add_argument("--modes", nargs="+", default=["before", "after"],
                    choices=["before", "after"])
    args = ap.parse_args()
    import soundfile

    import tts_core.cosyvoice2.engine as cv2_engine
    from tts_core.engine import Audio

    probe = CosyVoice2Probe(args.model_dir, args.precision, args.threads, False, 1000)
    engine = probe.engine
    models = engine.models
    samples, rate = soundfile.read(PROMPT_WAV, dtype="float32")
    prompt = Audio(samples, rate)
    probe.register(prompt)
    timers = Timers()
    onnx = models.onnx
    timers.wrap(onnx, "speech_tokens", "prompt: speech tokenizer")
    timers.wrap(onnx, "speaker_embedding", "prompt: campplus")
    timers.wrap(engine, "_encode_prompt", "prompt: all (incl. mel, resampling)")
    timers.wrap_generator(models.lm, "inference", "LM prefill (+1st token)", "LM decode steps")
    timers.wrap(engine, "_speaker_flow_cache", "flow: speaker prompt cache lookup/build")
    flow = models.flow
    timers.wrap(flow.encoder, "forward_chunks", "flow: encoder")
    timers.wrap(flow.decoder, "solve_streams", "flow: estimator (Euler steps)")
    # a stream's chunk is begin_cached (encoder, estimator inputs), the solve, end_cached
    timers.wrap(flow, "begin_cached", "flow: begin + end of a chunk (encoder included)")
    timers.wrap(flow, "end_cached", "flow: begin + end of a chunk (encoder included)")
    timers.wrap(models.hift, "inference", "hift")
    caches = {mode: cv2_engine.flow_prompt_cache_store() for mode in args.modes}

    def set_mode(mode: str) -> None:
        after = mode == "after"
        flow.group_prompt_chunks = after
        cv2_engine.STREAM_ALIGN_FLOW_PROMPT = after
        engine.flow_prompt_caches = caches[mode]

    print(f"model {args.model_dir}, {args.precision}, {args.threads} threads, load "
          f"{open('/proc/loadavg').read().split()[:3]}", flush=True)
    for registered in (False, True):
        what = "registered speaker" if registered else "prompt audio"
        rows: dict[str, dict[str, list[tuple[float, float]]]] = {
            mode: defaultdict(list) for mode in args.modes}
        for run in range(args.runs + 1):
            for mode in args.modes:
                set_mode(mode)
                timers.wall.clear()
                timers.cpu.clear()
                cancel = threading.Event()
                w, c = time.perf_counter(), time.process_time()
                # prompt audio: a recording new to the engine every time (one sample moved),
                # since the engine keeps recordings sent again by content (prompt_cache.py)
                sent = prompt
                if not registered:
                    sent = Audio(prompt.samples.copy(), prompt.sample_rate)
                    sent.samples[0] += 1e-6 * (run + 1)
                chunks = engine.synthesize(probe.request(sent, True, registered), cancel)
                next(iter(chunks))
                total = (time.perf_counter() - w, time.process_time() - c)
                cancel.set()
                chunks.close()
                if run == 0:
                    continue  # warm-up (builds this setting's speaker cache)
                for stage in timers.wall:
                    rows[mode][stage].append((timers.wall[stage], timers.cpu[stage]))
                rows[mode]["TOTAL first audio"].append(total)
        print(f"\n{what}: stage, then wall s / CPU s per setting (median of {args.runs}); "
              f"load {open('/proc/loadavg').read().split()[:3]}")
        print(f"  {'stage':45s}" + "".join(f"{m:>18s}" for m in args.modes))
        for stage in rows[args.modes[0]]:
            cells = []
            for mode in args.modes:
                values = rows[mode].get(stage, [(0.0, 0.0)])
                cells.append(f"{statistics.median(v[0] for v in values):8.2f} /"
                             f"{statistics.median(v[1] for v in values):7.2f}")
            print(f"  {stage:45s}" + "".join(f"{c:>18s}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
