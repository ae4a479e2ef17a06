#!/usr/bin/env python3
"""The flow's share of a stream's first chunk, formulations and precisions side by side.

    PYTHONPATH=$PWD .venv/bin/python scripts/bench_cv2_flow_first_chunk.py \\
        --model-dir /work/models/cv2-full --threads 1 --repeats 3

Only flow.pt and hift.pt are loaded; random tokens and prompt (87 tokens, 3.5 s). Figures are
CPU seconds of this process (robust to other processes sharing the cores), medians of
--repeats, each side run in turn within a repeat:

* zero-shot first chunk (13 tokens after the prompt, streaming): the masked whole-sequence flow
  it replaced ("masked"), the prompt chunk by chunk ("chunked"), the prompt chunks in one run
  (the default, "grouped");
* a registered speaker's first chunk from its prompt cache (grouped and chunked cache), for
  the whole prompt and for the prompt the engine's streams use (aligned, 78 tokens);
* float32 against bfloat16: one non-streaming call on --tokens new tokens and a registered
  speaker's first chunk, with the bfloat16 mel's relative L1 against float32.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_cv2_flow_stream import legacy, load_flow_and_hift  # noqa: E402


def cpu(fn: Callable[[], object]) -> float:
    started = time.process_time()
    fn()
    return time.process_time() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=50, help="new tokens of the whole call")
    ap.add_argument("--skip-bf16", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    flow, _ = load_flow_and_hift(args.model_dir)
    gen = torch.Generator().manual_seed(0)
    vocab, ratio = flow.config.vocab_size, flow.config.token_mel_ratio
    full = 87
    prompt_token = torch.randint(0, vocab, (1, full), generator=gen, dtype=torch.int32)
    prompt_feat = torch.randn(1, ratio * full, flow.config.output_size, generator=gen) * 2 - 6
    embedding = torch.randn(1, flow.config.spk_embed_dim, generator=gen)
    prompt = (prompt_token, prompt_feat, embedding)
    aligned = (prompt_token[:, 9:], prompt_feat[:, ratio * 9:], embedding)
    tokens = torch.randint(0, vocab, (1, args.tokens), generator=gen, dtype=torch.int32)
    first = tokens[:, :13]
    chunked = copy.copy(flow)
    chunked.group_prompt_chunks = False
    masked = legacy(flow)
    low = None if args.skip_bf16 else copy.deepcopy(flow).to(torch.bfloat16)

    sides: dict[str, Callable[[], object]] = {
        "zero-shot first chunk: masked": lambda: masked.inference(
            first, *prompt, streaming=True, finalize=False),
        "zero-shot first chunk: chunked": lambda: chunked.inference(
            first, *prompt, streaming=True, finalize=False),
        "zero-shot first chunk: grouped": lambda: flow.inference(
            first, *prompt, streaming=True, finalize=False),
    }
    caches = {"grouped": flow.prompt_cache(*prompt), "chunked": chunked.prompt_cache(*prompt),
              "aligned": flow.prompt_cache(*aligned)}
    sides["registered first chunk: chunked cache, 87-token prompt"] = \
        lambda: chunked.inference_cached(first, *prompt, caches["chunked"].clone())
    sides["registered first chunk: grouped cache, 87-token prompt"] = \
        lambda: flow.inference_cached(first, *prompt, caches["grouped"].clone())
    sides["registered first chunk: aligned 78-token prompt"] = \
        lambda: flow.inference_cached(first, *aligned, caches["aligned"].clone())
    sides[f"float32 non-streaming, {args.tokens} tokens"] = \
        lambda: flow.inference(tokens, *prompt)
    if low is not None:
        low_cache = low.prompt_cache(*prompt)
        sides[f"bfloat16 non-streaming, {args.tokens} tokens"] = \
            lambda: low.inference(tokens, *prompt)
        sides["float32 registered first chunk (87-token prompt)"] = sides[
            "registered first chunk: grouped cache, 87-token prompt"]
        sides["bfloat16 registered first chunk (87-token prompt)"] = \
            lambda: low.inference_cached(first, *prompt, low_cache.clone())
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.repeats):
        for name, fn in sides.items():
            times[name].append(cpu(fn))
    load = open("/proc/loadavg").read().split()[:3]
    print(f"{args.model_dir}, {args.threads} threads, {args.repeats} repeats, load "
          f"{' '.join(load)}; CPU s (medians)")
    for name, values in times.items():
        print(f"  {name:55s} {statistics.median(values):7.2f}")
    if low is not None:
        ref = flow.inference(tokens, *prompt)
        mel = low.inference(tokens, *prompt)
        print(f"  bfloat16 mel relative L1 vs float32: "
              f"{((mel - ref).abs().sum() / ref.abs().sum()).item():.4f} (tolerance 0.02)")


if __name__ == "__main__":
    main()
