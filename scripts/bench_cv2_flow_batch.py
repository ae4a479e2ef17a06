#!/usr/bin/env python3
"""The flow's cost per audio second for several streams at once, with and without malloc tuning.

    PYTHONPATH=$PWD .venv/bin/python scripts/bench_cv2_flow_batch.py \\
        --model-dir /work/models/cv2-full --streams 1,4 --threads 2

Only flow.pt is loaded (in --dtype); random tokens and a 78-token prompt (a registered
speaker's prompt cache). Each of N streams has decoded its first chunk (--first tokens); then
every stream's next call (up to --upto tokens) is solved either one stream at a time or packed
into one estimator run per Euler step (what the batch scheduler does), in turn, --repeats times.
Every call starts from a copy of the streams' caches, so each pays what a stream pays when its
key/value buffers grow.

Each setting of glibc's allocator (tts_core/allocator.py: on, and off with
TTS_MALLOC_TUNING=0) runs in its own process, since the tuning is per process. Printed: wall
seconds per second of audio produced (medians), and minor page faults of the process.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def measure(args: argparse.Namespace, streams: int) -> None:
    """One process, one allocator setting: print one line per mode."""
    import torch
    from bench_cv2_flow_stream import load_flow_and_hift

    from tts_core.allocator import tune_allocator

    tuned = tune_allocator()
    torch.set_num_threads(args.threads)
    flow, _ = load_flow_and_hift(args.model_dir)
    flow = flow.to(getattr(torch, args.dtype))
    gen = torch.Generator().manual_seed(0)
    vocab, ratio = flow.config.vocab_size, flow.config.token_mel_ratio
    prompt_tokens = torch.randint(0, vocab, (1, 78), generator=gen, dtype=torch.int32)
    prompt_feat = torch.randn(1, ratio * 78, flow.config.output_size, generator=gen) * 2 - 6
    embedding = torch.randn(1, flow.config.spk_embed_dim, generator=gen)
    prompt = (prompt_tokens, prompt_feat, embedding)
    tokens = torch.randint(0, vocab, (1, args.upto), generator=gen, dtype=torch.int32)
    with torch.inference_mode():
        speaker = flow.prompt_cache(*prompt)
        started = []
        for _ in range(streams):
            cache = speaker.clone()
            flow.inference_cached(tokens[:, :args.first], *prompt, cache)
            started.append(cache)

        def run(packed: bool) -> int:
            calls = [flow.begin_cached(tokens, *prompt, cache.clone()) for cache in started]
            if packed:
                flow.decoder.solve_streams([call.solve for call in calls])
            else:
                for call in calls:
                    flow.decoder.solve_streams([call.solve])
            return sum(flow.end_cached(call).shape[-1] for call in calls)  # from frame 0

        times: dict[bool, list[float]] = {False: [], True: []}
        frames = 0
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for repeat in range(args.repeats + 1):
            for packed in (False, True):
                begin = time.perf_counter()
                frames = run(packed)
                if repeat:  # the first round warms up
                    times[packed].append(time.perf_counter() - begin)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    # the calls return every frame of their streams; only those after --first are new
    new_frames = frames - streams * ratio * (args.first - flow.config.pre_lookahead_len)
    audio = new_frames / 50  # mel frames per second (24 kHz audio, 480-sample hop)
    for packed in (False, True):
        wall = statistics.median(times[packed])
        mode = "packed" if packed else "one at a time"
        print(f"{streams:7d}  {'on' if tuned else 'off':>6s}  {mode:13s}  {audio:7.2f}  "
              f"{wall:7.2f}  {wall / audio:9.3f}  {faults:>12,d}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--streams", default="1,4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--first", type=int, default=13, help="tokens of each stream's first call")
    ap.add_argument("--upto", type=int, default=38, help="tokens after the measured call")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        measure(args, args.child)
        return
    load = open("/proc/loadavg").read().split()[:3]
    print(f"{args.model_dir}, flow {args.dtype}, {args.threads} threads, tokens "
          f"{args.first} -> {args.upto} per stream, {args.repeats} repeats; load {load}")
    print("streams  malloc  mode           audio s   wall s  s/audio s  minor faults")
    for streams in (int(s) for s in args.streams.split(",")):
        for tuning in ("1", "0"):
            env = {**os.environ, "TTS_MALLOC_TUNING": tuning}
            subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", str(streams)],
                           env=env, check=True)
    print(f"load at the end {open('/proc/loadavg').read().split()[:3]}")


if __name__ == "__main__":
    main()
