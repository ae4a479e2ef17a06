#!/usr/bin/env python3
"""Write a random CosyVoice 2 or 3 model directory in the official layout (tests, benchmarks).

    scripts/make_cv2_model_dir.py OUT_DIR [--model cosyvoice2|cosyvoice3] [--preset tiny|full]
                                          [--seed N] [--spk2info]

The result loads with ``--engine cosyvoice2`` (or ``cosyvoice3``, or ``auto``) ``--model-dir
OUT_DIR``; it speaks noise (random weights) but runs every stage at the chosen size. ``full``
writes the official sizes (about 3 GB for CosyVoice 2, 4 GB for CosyVoice 3).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tts_core.cosyvoice2.testing import make_model_dir as cv2_generator  # noqa: E402
from tts_core.cosyvoice3.testing import make_model_dir as cv3_generator  # noqa: E402

GENERATORS = {"cosyvoice2": cv2_generator, "cosyvoice3": cv3_generator}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory to write (created if needed)")
    parser.add_argument("--model", choices=sorted(GENERATORS), default="cosyvoice2")
    parser.add_argument("--preset", choices=sorted(cv2_generator.PRESETS), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spk2info", action="store_true",
                        help="also write spk2info.pt with two preset speakers")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    generator = GENERATORS[args.model]
    out = generator.make_model_dir(args.out, args.preset, seed=args.seed, spk2info=args.spk2info)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({args.model} {args.preset}, {size / 1e6:.1f} MB) in "
          f"{time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
