"""Cost of the streaming audio encoders (service/encoding.py) on real speech.

    .venv/bin/python scripts/bench_encoders.py [--rates 22050 24000] [--repeat 5] [--chunk 0.5]

Per format and sample rate: CPU milliseconds per second of audio (median of --repeat runs, the
formats taking turns so that load changes hit all alike), the cost of opening an encoder, the
output size in bytes (and kbit/s) per second of audio, and how much audio must be fed, 10 ms at
a time, before the first bytes come out. Input: the 13.75 s English prompt in shared/audio,
resampled, fed in chunks of --chunk seconds as an engine would.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import soundfile
import soxr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.encoding import AudioFormat, open_encoder  # noqa: E402

SPEECH = Path(__file__).resolve().parents[2] / "shared" / "audio" / "cross_lingual_prompt.wav"


def encode_all(fmt: AudioFormat, rate: int, samples: np.ndarray, chunk: int) -> tuple[float, int]:
    """(CPU seconds, output bytes) for one stream."""
    start = time.process_time()
    encoder = open_encoder(fmt, rate)
    size = 0
    for pos in range(0, len(samples), chunk):
        size += len(encoder.encode(samples[pos:pos + chunk]))
    size += len(encoder.finish())
    return time.process_time() - start, size


def open_cost(fmt: AudioFormat, rate: int, n: int = 20) -> float:
    start = time.process_time()
    for _ in range(n):
        open_encoder(fmt, rate).finish()
    return (time.process_time() - start) / n


def audio_before_first_bytes(fmt: AudioFormat, rate: int, samples: np.ndarray) -> float:
    encoder = open_encoder(fmt, rate)
    step = rate // 100
    for pos in range(0, len(samples), step):
        if encoder.encode(samples[pos:pos + step]):
            return min(pos + step, len(samples)) / rate
    return len(samples) / rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=int, nargs="+", default=[22050, 24000])
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per format (median)")
    parser.add_argument("--chunk", type=float, default=0.5, help="seconds of audio per encode()")
    args = parser.parse_args()

    speech, native = soundfile.read(SPEECH, dtype="float32")
    print(f"input: {SPEECH.name}, {len(speech) / native:.2f} s; chunks of {args.chunk:g} s; "
          f"median of {args.repeat} runs (CPU time of this process)")
    print(f"{'format':<6} {'rate':>6} {'coded':>6} {'CPU ms/s':>9} {'open ms':>8} "
          f"{'bytes/s':>8} {'kbit/s':>7} {'1st bytes after':>16}")
    for rate in args.rates:
        samples = speech if rate == native else soxr.resample(speech, native, rate, quality="HQ")
        seconds = len(samples) / rate
        chunk = max(1, int(args.chunk * rate))
        for fmt in AudioFormat:  # warm-up: libraries, allocator
            encode_all(fmt, rate, samples[: rate], chunk)
        cpu: dict[AudioFormat, list[float]] = {fmt: [] for fmt in AudioFormat}
        sizes: dict[AudioFormat, int] = {}
        for _ in range(args.repeat):
            for fmt in AudioFormat:
                spent, sizes[fmt] = encode_all(fmt, rate, samples, chunk)
                cpu[fmt].append(spent)
        for fmt in AudioFormat:
            per_second = statistics.median(cpu[fmt]) / seconds * 1000
            rate_out = sizes[fmt] / seconds
            first = audio_before_first_bytes(fmt, rate, samples)
            print(f"{fmt.value:<6} {rate:>6} {open_encoder(fmt, rate).sample_rate:>6} "
                  f"{per_second:>9.2f} {open_cost(fmt, rate) * 1000:>8.2f} {rate_out:>8.0f} "
                  f"{rate_out * 8 / 1000:>7.1f} {first * 1000:>13.0f} ms")


if __name__ == "__main__":
    main()
