#!/usr/bin/env python3
"""Peak memory of token2wav for one utterance: non-streaming, streaming with the flow's stream
cache, and streaming under a cache memory budget, each in a process of its own.

    PYTHONPATH=$PWD .venv/bin/python scripts/bench_cv2_flow_memory.py \\
        --model-dir /work/models/cv2-full --tokens 250 --budget-mb 2048

Only flow.pt and hift.pt are loaded (the LM's memory is the same on every side). Printed per
side: peak RSS of the process (ru_maxrss), RSS after loading the models, their difference (what
the synthesis itself took), the most the stream's flow cache held, CPU seconds, and whether the
audio equals the unlimited-cache stream's bit for bit.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def worker(args: argparse.Namespace) -> None:
    from bench_cv2_flow_stream import load_flow_and_hift

    from tts_core.cosyvoice2.engine import default_schedule
    from tts_core.cosyvoice2.token2wav import Token2Wav

    torch.set_num_threads(args.threads)
    flow, hift = load_flow_and_hift(args.model_dir)
    gen = torch.Generator().manual_seed(0)
    vocab, ratio = flow.config.vocab_size, flow.config.token_mel_ratio
    prompt = (torch.randint(0, vocab, (1, args.prompt_tokens), generator=gen, dtype=torch.int32),
              torch.randn(1, ratio * args.prompt_tokens, flow.config.output_size,
                          generator=gen) * 2 - 6,
              torch.randn(1, flow.config.spk_embed_dim, generator=gen))
    tokens = torch.randint(0, vocab, (args.tokens,), generator=gen).tolist()
    budget = None if args.side != "budget" else args.budget_mb << 20
    driver = Token2Wav(flow, hift, deterministic=True,
                       schedule=default_schedule(flow.config.encoder.static_chunk_size),
                       flow_cache_bytes=budget)
    loaded = rss_mb()
    started = time.process_time()
    held = 0
    if args.side == "whole":
        wav = driver.synthesize(torch.tensor([tokens], dtype=torch.int32), *prompt)
    else:
        state = driver.start_stream(*prompt)
        chunks = []
        for t in tokens:
            chunks += state.push([t])
            if state._flow_cache is not None:
                held = max(held, state._flow_cache.nbytes())
        chunks.append(state.finish())
        wav = torch.cat(chunks, dim=1)
    cpu = time.process_time() - started
    torch.save(wav, args.out.with_suffix(".pt"))
    args.out.write_text(json.dumps({
        "side": args.side, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "loaded_mb": loaded, "cache_mb": held / 2**20, "cpu_s": cpu}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=250, help="speech tokens (25 a second)")
    ap.add_argument("--prompt-tokens", type=int, default=78)
    ap.add_argument("--budget-mb", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sides", nargs="+", default=["whole", "stream", "budget"],
                    choices=["whole", "stream", "budget"])
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        worker(args)
        return
    load = open("/proc/loadavg").read().split()[:3]
    print(f"{args.model_dir}: {args.tokens} tokens ({args.tokens / 25:.1f} s) after a "
          f"{args.prompt_tokens}-token prompt, {args.threads} threads, budget "
          f"{args.budget_mb} MiB, load {' '.join(load)}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for side in args.sides:
            out = Path(tmp) / f"{side}.json"
            subprocess.run([sys.executable, __file__, "--model-dir", str(args.model_dir),
                            "--tokens", str(args.tokens), "--prompt-tokens",
                            str(args.prompt_tokens), "--budget-mb", str(args.budget_mb),
                            "--threads", str(args.threads), "--side", side, "--out", str(out)],
                           check=True)
            result = json.loads(out.read_text())
            wav = torch.load(out.with_suffix(".pt"))
            result["wav"] = wav
            results.append(result)
            print(f"  {side}: done ({time.strftime('%H:%M:%S')})", flush=True)
    streamed = next((r["wav"] for r in results if r["side"] == "stream"), None)
    print(f"{'side':8s}{'peak RSS MB':>13s}{'loaded MB':>11s}{'synthesis MB':>14s}"
          f"{'cache MB':>10s}{'CPU s':>8s}  same as stream")
    for r in results:
        same = "-" if streamed is None or r["side"] == "whole" else \
            str(torch.equal(r["wav"], streamed))
        print(f"{r['side']:8s}{r['peak_mb']:13.0f}{r['loaded_mb']:11.0f}"
              f"{r['peak_mb'] - r['loaded_mb']:14.0f}{r['cache_mb']:10.0f}{r['cpu_s']:8.1f}  "
              f"{same}")


if __name__ == "__main__":
    main()
