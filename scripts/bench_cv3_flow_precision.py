#!/usr/bin/env python3
"""CosyVoice 3's flow in float32 against ``auto`` (bfloat16 DiT on a CPU): time and mel error.

    PYTHONPATH=. .venv/bin/python scripts/bench_cv3_flow_precision.py --model-dir DIR
        [--tokens 150] [--prompt-tokens 75] [--threads 2]

Loads the directory twice (``--precision float32`` and ``auto``), then runs the flow alone on
the same random speech tokens after a random prompt, streamed (chunk-masked) and whole, and
prints per mode the wall time of each precision (``auto`` twice, and whether its two runs gave
the same bits) and the mel's relative L1 error and largest error of ``auto`` against float32.
Random weights (``make_cv2_model_dir.py --model cosyvoice3 --preset full``) are for timing and
for comparing code versions side by side; they say nothing of audible quality.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tts_core.cosyvoice3.engine import CosyVoice3Engine  # noqa: E402
from tts_core.short_thread import on_short_thread  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=150)
    parser.add_argument("--prompt-tokens", type=int, default=75)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    exact = on_short_thread(CosyVoice3Engine.load_models, args.model_dir, precision="float32")
    fast = on_short_thread(CosyVoice3Engine.load_models, args.model_dir, precision="auto")
    g = torch.Generator().manual_seed(0)
    vocab = exact.flow.config.vocab_size
    token = torch.randint(0, vocab, (1, args.tokens), generator=g)
    prompt_token = torch.randint(0, vocab, (1, args.prompt_tokens), generator=g)
    ratio = exact.flow.config.token_mel_ratio
    prompt_feat = torch.randn(1, ratio * args.prompt_tokens, exact.flow.config.output_size,
                              generator=g) * 0.5
    embedding = torch.randn(1, exact.flow.config.spk_embed_dim, generator=g)

    def mel(models, streaming: bool) -> tuple[torch.Tensor, float]:  # noqa: ANN001
        started = time.perf_counter()
        with torch.inference_mode():
            out = models.flow.inference(token, prompt_token, prompt_feat, embedding,
                                        streaming=streaming)
        return out.float(), time.perf_counter() - started

    for streaming in (True, False):
        reference, t_exact = mel(exact, streaming)
        first, t_first = mel(fast, streaming)
        second, t_second = mel(fast, streaming)
        error = (first - reference).abs()
        print(f"{'streamed' if streaming else 'whole'}: float32 {t_exact:.2f} s, auto "
              f"{t_first:.2f} / {t_second:.2f} s (same bits: {torch.equal(first, second)}); "
              f"mel relative L1 {(error.mean() / reference.abs().mean()).item():.5f}, "
              f"max {error.max().item():.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
