#!/usr/bin/env python3
"""The flow's native bfloat16 kernels against PyTorch's, side by side in one run.

    PYTHONPATH=$PWD .venv/bin/python scripts/bench_flow_kernels.py --threads 2
    PYTHONPATH=$PWD .venv/bin/python scripts/bench_flow_kernels.py --threads 2 \\
        --model-dir /work/models/cv2-full --rounds 2

1. Attention (tts_core/cosyvoice2/attention_native.py) against ``scaled_dot_product_attention``
   on the chunk runs' shapes: 2 rows (the CFG pair) x 8 heads x 64 channels, queries from a
   fused q/k/v product and keys/values from a cache, as the flow passes them; chunk masks where
   a run spans several chunks. Each of 56 layers has its own buffers (as in the estimator), so
   the caches do not flatter either side. Per call: median microseconds, and the largest error
   of each against float64 on the same bfloat16 inputs.
2. Products (gemm_native.py) against oneDNN's packed kernel (what the flow used before) on the
   estimator's linear shapes at 26, 52, 208 and 300 rows (one stream's first chunk, the CFG
   pair of it, four streams, a prompt), 40 distinct weights per shape.
3. With ``--model-dir``: the flow alone (bfloat16, 2 threads by default) in a subprocess per
   configuration, PyTorch's kernels then the native ones, ``--rounds`` times alternating:
   the prompt's cache (3.5 s prompt), a registered speaker's first chunk for 1 and for 4
   streams at once. Medians of 5 calls each after 2 warm-ups.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HEADS, HEAD_DIM = 8, 64
WIDTH = HEADS * HEAD_DIM
ATTENTION_SHAPES = [  # (queries, keys, chunk for the mask or None)
    (3, 160, None), (26, 176, None), (50, 250, None), (100, 300, 50), (150, 150, 50),
    (300, 300, 50)]
PRODUCT_SHAPES = [  # (in, out, GELU): q/k/v, out proj, feed-forward in/out, conv k=3, final
    (256, 1536, False), (512, 256, False), (256, 1024, True), (1024, 256, False),
    (768, 256, False), (256, 80, False)]
PRODUCT_ROWS = [26, 52, 208, 300]


def median_us(fn: Callable[[], object], calls: int, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / calls * 1e6


def attention_row(kernel: object, rows: int, keys: int, chunk: int | None) -> str:
    layers = 56
    g = torch.Generator().manual_seed(rows + keys)
    fused = [(torch.randn(2, rows, 3 * WIDTH, generator=g) * 2).bfloat16()
             for _ in range(layers)]
    caches = [(torch.randn(2, 2, keys + 100, WIDTH, generator=g) * 2).bfloat16()
              for _ in range(layers)]
    start = keys - rows
    offsets = torch.arange(rows) // chunk * chunk if chunk else torch.zeros(rows, dtype=torch.long)
    end = torch.clamp(start + offsets + (chunk or keys), max=keys).int()
    begin = torch.zeros(rows, dtype=torch.int32)
    visible = torch.arange(keys)[None, :] < end[:, None].long()
    mask = None if chunk is None else visible
    outs = [torch.empty(2, rows, WIDTH, dtype=torch.bfloat16) for _ in range(layers)]

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (HEADS, HEAD_DIM)).transpose(1, 2)

    def pytorch(i: int) -> torch.Tensor:
        q, k, v = fused[i][..., :WIDTH], caches[i][0, :, :keys], caches[i][1, :, :keys]
        out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
        return out.transpose(1, 2).reshape(2, rows, WIDTH)

    def native(i: int) -> torch.Tensor:
        kernel.attend(fused[i][..., :WIDTH], caches[i][0, :, :keys],  # type: ignore[attr-defined]
                      caches[i][1, :, :keys], outs[i], begin, end, HEADS)
        return outs[i]

    q, k, v = (t.double() for t in (fused[0][..., :WIDTH], caches[0][0, :, :keys],
                                    caches[0][1, :, :keys]))
    exact = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=visible)
    exact = exact.transpose(1, 2).reshape(2, rows, WIDTH)
    errors = [(f(0).double() - exact).abs().max().item() for f in (pytorch, native)]
    times = [median_us(lambda f=f: [f(i) for i in range(layers)], layers)
             for f in (pytorch, native)]
    return (f"| {rows} x {keys} | {'chunks of ' + str(chunk) if chunk else 'none'} | "
            f"{times[0]:.0f} | {times[1]:.0f} | {times[0] / times[1]:.2f} | "
            f"{errors[0]:.4f} | {errors[1]:.4f} |")


def bench_attention() -> None:
    from tts_core.cosyvoice2.attention_native import native_attention

    kernel = native_attention()
    if kernel is None:
        print("native attention does not run here (see the log); skipped")
        return
    print("attention, per call (2 x 8 heads x 64): median us; max |error| against float64")
    print("| queries x keys | mask | PyTorch us | native us | x | PyTorch error | native error |")
    print("|---|---|---|---|---|---|---|")
    for rows, keys, chunk in ATTENTION_SHAPES:
        print(attention_row(kernel, rows, keys, chunk))


def product_row(kernel: object, rows: int, k: int, n: int, gelu: bool) -> str:
    count = 40  # distinct weights per shape
    g = torch.Generator().manual_seed(rows * k + n)
    weights = [(torch.randn(n, k, generator=g) / k ** 0.5).bfloat16() for _ in range(count)]
    biases = [torch.randn(n, generator=g).bfloat16() for _ in range(count)]
    x = torch.randn(rows, k, generator=g).bfloat16()
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in weights]
    native = [kernel.pack(w) for w in weights]  # type: ignore[attr-defined]
    post, algorithm = ("gelu", "none") if gelu else ("none", "")

    def theirs(i: int) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, onednn[i], biases[i], post, [], algorithm)

    def mine(i: int) -> torch.Tensor:
        return kernel.linear(x, native[i], biases[i],  # type: ignore[attr-defined]
                             gelu="none" if gelu else None)

    exact = F.linear(x.double(), weights[0].double(), biases[0].double())
    exact = F.gelu(exact) if gelu else exact
    errors = [(f(0).double() - exact).abs().max().item() for f in (theirs, mine)]
    times = [median_us(lambda f=f: [f(i) for i in range(count)], count) for f in (theirs, mine)]
    label = f"{k} -> {n}{' + GELU' if gelu else ''}"
    return (f"| {rows} | {label} | {times[0]:.1f} | {times[1]:.1f} | "
            f"{times[0] / times[1]:.2f} | {errors[0]:.4f} | {errors[1]:.4f} |")


def bench_products() -> None:
    from tts_core.cosyvoice2.gemm_native import native_gemm

    kernel = native_gemm()
    if kernel is None:
        print("native products do not run here (see the log); skipped")
        return
    print("\nproducts, per call: median us; max |error| against float64")
    print("| rows | in -> out | oneDNN us | native us | x | oneDNN error | native error |")
    print("|---|---|---|---|---|---|---|")
    for rows in PRODUCT_ROWS:
        for k, n, gelu in PRODUCT_SHAPES:
            print(product_row(kernel, rows, k, n, gelu))


def flow_worker(model_dir: Path, prompt_tokens: int) -> None:
    """One configuration's flow timings (its kernels chosen by the environment), as JSON."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_cv2_flow_stream import load_flow_and_hift

    from tts_core.allocator import tune_allocator

    tune_allocator()
    flow, _ = load_flow_and_hift(model_dir)
    flow = flow.to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    vocab, ratio = flow.config.vocab_size, flow.config.token_mel_ratio
    prompt = (torch.randint(0, vocab, (1, prompt_tokens), generator=g, dtype=torch.int32),
              torch.randn(1, ratio * prompt_tokens, flow.config.output_size, generator=g) - 5,
              torch.randn(1, flow.config.spk_embed_dim, generator=g))
    firsts = [torch.randint(0, vocab, (1, 13), generator=g, dtype=torch.int32)
              for _ in range(4)]
    with torch.inference_mode():
        cache = flow.prompt_cache(*prompt)

        def streams(count: int) -> None:
            calls = [flow.begin_cached(f, *prompt, flow.new_stream_cache(1 << 30, cache))
                     for f in firsts[:count]]
            flow.decoder.solve_streams([c.solve for c in calls])
            for c in calls:
                flow.end_cached(c)

        cases = {"prompt cache": lambda: flow.prompt_cache(*prompt),
                 "first chunk, 1 stream": lambda: streams(1),
                 "first chunk, 4 streams": lambda: streams(4)}
        result = {}
        for name, fn in cases.items():
            for _ in range(2):
                fn()
            result[name] = median_us(fn, 1, repeats=5) / 1e6
    print(json.dumps(result))


def bench_flow(model_dir: Path, threads: int, rounds: int, prompt_tokens: int) -> None:
    configs = {"PyTorch/oneDNN": {"TTS_NATIVE_ATTENTION": "0", "TTS_NATIVE_GEMM": "0"},
               "native": {}}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in configs}
    for _ in range(rounds):
        for name, switches in configs.items():
            env = {**os.environ, **switches, "PYTHONPATH": str(ROOT)}
            out = subprocess.run(
                [sys.executable, __file__, "--flow-worker", str(model_dir), "--threads",
                 str(threads), "--prompt-tokens", str(prompt_tokens)],
                env=env, capture_output=True, text=True, check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"\nflow alone, bfloat16, {threads} threads, seconds (medians of 5; one column per "
          f"round)")
    names = list(configs)
    print("| figure | " + " | ".join(names) + " | x |")
    print("|---|" + "---|" * (len(names) + 1))
    for figure in runs[names[0]][0]:
        cells = [" / ".join(f"{r[figure]:.3f}" for r in runs[name]) for name in names]
        ratio = (statistics.median(r[figure] for r in runs[names[0]])
                 / statistics.median(r[figure] for r in runs[names[1]]))
        print(f"| {figure} | " + " | ".join(cells) + f" | {ratio:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model-dir", type=Path, help="also time the flow of this directory")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=78, help="78: 3.1 s of prompt")
    parser.add_argument("--flow-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.flow_worker:
        flow_worker(args.flow_worker, args.prompt_tokens)
        return
    print(f"{args.threads} threads; load {os.getloadavg()}")
    bench_attention()
    bench_products()
    if args.model_dir:
        bench_flow(args.model_dir, args.threads, args.rounds, args.prompt_tokens)


if __name__ == "__main__":
    main()
