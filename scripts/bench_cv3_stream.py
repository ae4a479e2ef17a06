#!/usr/bin/env python3
"""CosyVoice 3 streaming token2wav: the per-stream DiT cache against recomputing every chunk.

Streams the same random tokens through ``tts_core.cosyvoice3.token2wav.Token2Wav`` with
``dit_cache=True`` and ``False``, side by side (alternating, ``--repeats`` each), with the
reference schedule (25, 50, 100, 100, ... tokens per chunk) and tokens pushed 5 at a time. Prints,
per variant, the median wall time of the whole stream and of each chunk, the DiT frames computed,
and checks that both variants emit identical samples. CPU time (all threads of this process) is
printed too: on a shared, loaded machine it reflects the work better than wall time. Weights are
random (timing only): ``--size parity`` uses the shared parity directory's reduced model,
``small`` a mid-size DiT, ``full`` the released sizes (use a GPU).

    PYTHONPATH=. .venv/bin/python scripts/bench_cv3_stream.py --size small --tokens 300
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from tts_core.cosyvoice2 import hyperyaml
from tts_core.cosyvoice2.flow_matching import CFMConfig
from tts_core.cosyvoice3.dit import DiTConfig
from tts_core.cosyvoice3.flow import CausalFlowDiT, FlowConfig, build_flow
from tts_core.cosyvoice3.hift import CausalHiFTConfig, CausalHiFTGenerator, build_hift
from tts_core.cosyvoice3.token2wav import Token2Wav

PARITY_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "parity" / "cosyvoice3"


def build(size: str) -> tuple[CausalFlowDiT, CausalHiFTGenerator]:
    if size == "parity":
        data = hyperyaml.load(Path(os.environ.get("COSYVOICE3_PARITY_DIR", PARITY_DIR))
                              / "cosyvoice3.yaml")
        return build_flow(data["flow"]), build_hift(data["hift"])
    if size == "full":
        return CausalFlowDiT(FlowConfig()).eval(), CausalHiFTGenerator(CausalHiFTConfig()).eval()
    dit = DiTConfig(dim=512, depth=8, heads=8, dim_head=64, ff_mult=2)
    flow = CausalFlowDiT(FlowConfig(lookahead_channels=256, estimator=dit, cfm=CFMConfig()))
    hift = CausalHiFTGenerator(CausalHiFTConfig(base_channels=128, f0_cond_channels=128))
    return flow.eval(), hift.eval()


def run(driver: Token2Wav, tokens: torch.Tensor, prompt: torch.Tensor, prompt_feat: torch.Tensor,
        embedding: torch.Tensor, sync
        ) -> tuple[float, list[float], list[torch.Tensor], int, float]:
    dit_rows: list[int] = []
    handle = driver.flow.decoder.estimator.transformer_blocks[0].register_forward_hook(
        lambda m, args, out: dit_rows.append(args[0].shape[1]))
    chunks: list[torch.Tensor] = []
    times: list[float] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        stream = driver.start_stream(prompt, prompt_feat, embedding)
        ids = tokens[0].tolist()
        for i in range(0, len(ids), 5):
            t0 = time.perf_counter()
            ready = stream.push(ids[i:i + 5])
            if ready:
                sync()
                times.append(time.perf_counter() - t0)
                chunks += ready
        t0 = time.perf_counter()
        chunks.append(stream.finish())
        sync()
        times.append(time.perf_counter() - t0)
    finally:
        handle.remove()
    return (time.perf_counter() - start, times, [c.cpu() for c in chunks], sum(dit_rows),
            time.process_time() - cpu_start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["parity", "small", "full"], default="small")
    parser.add_argument("--tokens", type=int, default=300, help="speech tokens to stream")
    parser.add_argument("--prompt-tokens", type=int, default=75, help="prompt tokens (3 s)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    flow, hift = build(args.size)
    flow, hift = flow.to(device), hift.to(device)
    g = torch.Generator().manual_seed(0)
    vocab, ratio = flow.config.vocab_size, flow.config.token_mel_ratio
    tokens = torch.randint(0, vocab, (1, args.tokens), generator=g).to(device)
    prompt = torch.randint(0, vocab, (1, args.prompt_tokens), generator=g).to(device)
    prompt_feat = (torch.randn(1, args.prompt_tokens * ratio, flow.config.output_size,
                               generator=g) - 5).to(device)
    embedding = torch.randn(1, flow.config.spk_embed_dim, generator=g).to(device)

    results: dict[bool, list] = {True: [], False: []}
    run(Token2Wav(flow, hift), tokens[:, :40], prompt, prompt_feat, embedding, sync)  # warm-up
    for _ in range(args.repeats):
        for cached in (True, False):
            driver = Token2Wav(flow, hift, dit_cache=cached)
            results[cached].append(run(driver, tokens, prompt, prompt_feat, embedding, sync))
            wall, *_, cpu = results[cached][-1]
            print(f"  dit_cache={cached}: {wall:.2f} s wall, {cpu:.2f} s CPU", flush=True)

    reference = results[False][0][2]
    identical = all(len(r[2]) == len(reference)
                    and all(torch.equal(a, b) for a, b in zip(r[2], reference, strict=True))
                    for runs in results.values() for r in runs)
    params = sum(p.numel() for p in flow.parameters())
    print(f"size {args.size} (flow {params / 1e6:.1f} M parameters), device {device}, "
          f"threads {args.threads}, prompt {args.prompt_tokens} + {args.tokens} tokens, "
          f"{args.repeats} repeats; load average {os.getloadavg()[0]:.2f}")
    print(f"identical output with and without the cache: {identical}")
    medians = {}
    for cached in (True, False):
        runs = results[cached]
        total = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[4] for r in runs)
        per_chunk = [statistics.median(r[1][i] for r in runs) for i in range(len(runs[0][1]))]
        medians[cached] = (total, cpu)
        print(f"dit_cache={cached!s:5}: stream {total:7.2f} s wall, {cpu:7.2f} s CPU, "
              f"DiT frames {runs[0][3]:6d}, "
              "per chunk (s): " + " ".join(f"{t:.2f}" for t in per_chunk))
    print(f"speed-up of the whole stream: {medians[False][0] / medians[True][0]:.2f}x wall, "
          f"{medians[False][1] / medians[True][1]:.2f}x CPU")


if __name__ == "__main__":
    main()
