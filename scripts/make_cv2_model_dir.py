#!/usr/bin/env python3
"""Write a random CosyVoice 2 model directory in the official layout (for tests and benchmarks).

    scripts/make_cv2_model_dir.py OUT_DIR [--preset tiny|full] [--seed N] [--spk2info]

The result loads with ``--engine cosyvoice2 --model-dir OUT_DIR``; it speaks noise (random
weights) but runs every stage at the chosen size. ``full`` writes about 3 GB (the official sizes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tts_core.cosyvoice2.testing.make_model_dir import PRESETS, make_model_dir  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory to write (created if needed)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spk2info", action="store_true",
                        help="also write spk2info.pt with two preset speakers")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    out = make_model_dir(args.out, args.preset, seed=args.seed, spk2info=args.spk2info)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({args.preset}, {size / 1e6:.1f} MB) in "
          f"{time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
