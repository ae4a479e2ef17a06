#!/usr/bin/env python3
"""The compute floor of CosyVoice 2 streaming on this CPU, against what the engine takes.

    scripts/bench_cv2_floor.py --model-dir /work/models/cv2-full --threads 2

Counts the work from the loaded modules (weights and shapes, nothing hard-coded): the LM stack's
bytes of weights read per decode token (float32, and int8 + per-channel scales for ``int8w``)
and FLOPs per prefill row; the flow estimator's FLOPs per mel frame and Euler step (its Linear
and Conv1d layers per frame, plus attention over the cached prefix, whose length is a
parameter), times the CFG pair and the Euler steps; HiFT's FLOPs per second of audio (counted by
``torch.utils.flop_counter`` on one second of mel). Then measures what this CPU achieves at those
shapes: float32 and bfloat16 GEMM GFLOP/s at the estimator's and the LM prefill's matrix shapes,
memory bandwidth (sum, float32 matvec and copy over 512 MB) and the int8 weight-only
matrix-vector kernel the engine decodes with (tts_core/cosyvoice2/int8_matvec.py where it runs,
else ``aten._weight_int8pack_mm``) over the LM stack's layer shapes. Floors:
decode = weight bytes ÷ the better read bandwidth (float32) or the measured int8 matvec time
(int8w); the flow estimator = FLOPs ÷ the GEMM rate at its own shapes in the precision it runs
in (bfloat16 on packed weights, as the engine runs it, where ``--precision auto`` gives it a
bfloat16 flow; float32 otherwise); HiFT = FLOPs ÷ the float32 rate (optimistic for its
convolutions and for attention).

Measured figures: by default one registered-speaker first chunk (after a warm-up) and one
streamed request of ``--tokens`` forced speech tokens (per second of its audio; its attention
history is ``--history-s``, by default half the stream), stage by stage (the timers of
scripts/profile_cv2_first_chunk.py); or give them with ``--measured KEY=SECONDS ...`` (keys:
first.prefill, first.decode, first.flow, first.hift, first.total, sec.decode, sec.flow,
sec.hift, sec.total) to skip the engine.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from tts_core.cosyvoice2.flow_decoder import (  # noqa: E402
    CausalConditionalDecoder,
    SelfAttention,
    TransformerBlock,
)
from tts_core.cosyvoice2.int8_matvec import native_kernel  # noqa: E402
from tts_core.cosyvoice2.packed_linear import linear, packs_bfloat16, prepare  # noqa: E402
from tts_core.cosyvoice2.weight_quant import WeightOnlyLinear  # noqa: E402

# --------------------------------------------------------------------------- counting


def linear_weights(module: nn.Module) -> list[tuple[int, int]]:
    """(in, out) of every Linear in ``module`` (float, or int8w's weight-only ones)."""
    return [(m.in_features, m.out_features) for m in module.modules()
            if isinstance(m, nn.Linear | WeightOnlyLinear)]


def lm_counts(lm: Any) -> dict[str, Any]:
    """Weight bytes per decode token and FLOPs per prefill row of the LM (Qwen2 stack + speech
    head; the text head is never run and the embeddings are one row per token)."""
    cfg = lm.config.qwen
    stack = lm.llm.model.model.layers
    shapes = linear_weights(stack)
    head = (lm.llm_decoder.in_features, lm.llm_decoder.out_features)
    weights = sum(i * o for i, o in shapes)
    head_weights = head[0] * head[1]
    outs = sum(o for _, o in shapes)
    return {
        "shapes": shapes, "head": head, "layers": cfg.num_hidden_layers,
        "bytes_f32": 4 * (weights + head_weights),
        # int8w: int8 weights + one bfloat16 scale per output channel; the head stays float32
        "bytes_int8w": weights + 2 * outs + 4 * head_weights,
        "flops_row": 2 * (weights + head_weights),
        # attention of one row over ``n`` positions: QK and AV, every query head
        "attn_flops_per_key": 4 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim,
    }


def estimator_counts(estimator: CausalConditionalDecoder) -> dict[str, Any]:
    """FLOPs of one estimator pass (one CFG row, one Euler step): per frame (Linear layers of
    the transformer blocks, every Conv1d), per (query frame, key frame) pair of attention, and
    per call (time embedding and the resnet blocks' time projections)."""
    if len(estimator.config.channels) != 1:
        raise SystemExit("the count assumes one resolution (channels of length 1, as CV2)")
    per_frame, shapes = 0, []
    for block in estimator.modules():
        if isinstance(block, TransformerBlock):
            for i, o in linear_weights(block):
                per_frame += 2 * i * o
                shapes.append((i, o))
    for conv in estimator.modules():
        if isinstance(conv, nn.Conv1d):
            k = conv.kernel_size[0]
            per_frame += 2 * conv.weight.numel()
            shapes.append((conv.in_channels // conv.groups * k, conv.out_channels))
    attn = [m for m in estimator.modules() if isinstance(m, SelfAttention)]
    per_pair = sum(4 * m.to_q.out_features for m in attn)
    in_blocks = {id(m) for b in estimator.modules() if isinstance(b, TransformerBlock)
                 for m in b.modules()}
    per_call = sum(2 * i * o for m in estimator.modules()
                   if isinstance(m, nn.Linear) and id(m) not in in_blocks
                   for i, o in [(m.in_features, m.out_features)])
    return {"per_frame": per_frame, "per_pair": per_pair, "per_call": per_call,
            "shapes": shapes, "attn_layers": len(attn)}


def flow_flops(est: dict[str, Any], frames: int, prefix: int, chunk: int, steps: int,
               rows: int) -> float:
    """FLOPs of the estimator computing ``frames`` new frames after ``prefix`` cached ones
    (chunk attention: a query sees everything before its chunk and its chunk up to the last
    frame computed), for ``steps`` Euler steps × ``rows`` CFG rows."""
    keys = 0
    for f in range(prefix, prefix + frames):
        keys += min((f // chunk + 1) * chunk, prefix + frames)
    one = est["per_frame"] * frames + est["per_pair"] * keys + est["per_call"]
    return float(one * steps * rows)


def hift_flops(hift: Any, frames: int) -> tuple[float, float]:
    """(FLOPs, audio seconds) of the vocoder on ``frames`` mel frames (counted by torch)."""
    from torch.utils.flop_counter import FlopCounterMode

    mel = torch.zeros(1, 80, frames)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        wav, _ = hift.inference(mel, deterministic=True)
    return float(counter.get_total_flops()), wav.shape[-1] / 24000


# --------------------------------------------------------------------------- measuring


def timed(fn: Callable[[], Any], reps: int) -> float:
    """Fastest of ``reps`` runs of ``fn`` after one warm-up, in seconds (a floor takes the best
    the CPU reached)."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def gemm_rate(shapes: list[tuple[int, int]], rows: int, dtype: torch.dtype, reps: int) -> float:
    """GFLOP/s of running every (in, out) of ``shapes`` once on ``rows`` rows (distinct shapes
    timed once and weighted by how often they occur). bfloat16 runs on weights packed as the
    engine packs them where oneDNN has bfloat16 kernels (packed_linear)."""
    counts: dict[tuple[int, int], int] = {}
    for s in shapes:
        counts[s] = counts.get(s, 0) + 1
    flops = seconds = 0.0
    with torch.inference_mode():
        for (i, o), n in counts.items():
            x, w = torch.randn(rows, i, dtype=dtype), prepare(torch.randn(o, i, dtype=dtype))
            seconds += n * timed(lambda x=x, w=w: linear(x, w, None), reps)
            flops += n * 2.0 * rows * i * o
    return flops / seconds / 1e9


def bandwidth(megabytes: int, reps: int) -> tuple[float, float, float]:
    """GB/s on a buffer of ``megabytes``: (read by a sum, read by a float32 matrix-vector
    product as decoding does, copy counting read + write)."""
    n = megabytes * (1 << 20) // 4
    a, b, x = torch.ones(n), torch.empty(n), torch.ones(4096)
    size = a.numel() * 4 / 1e9
    read = timed(lambda: a.sum(), reps)
    matvec = timed(lambda: torch.mv(a.view(-1, 4096), x), reps)
    copy = timed(lambda: b.copy_(a), reps)
    return size / read, size / matvec, 2 * size / copy


def int8_matvec(shapes: list[tuple[int, int]], reps: int) -> tuple[float, float]:
    """(seconds, weight GB/s) of one row through every (in, out) of ``shapes`` with the int8
    weight-only kernel int8w decodes with (the native one where it runs, else PyTorch's).
    Every matrix has its own memory, as the stack's do, so a pass reads them from DRAM as a
    decode step does: one matrix per shape read again and again stays in the CPU's cache (on
    this project's machine that showed 38.6 GB/s, against 12 GB/s for the stack's 24 layers of
    distinct matrices)."""
    kernel = native_kernel()
    with torch.inference_mode():
        layers = [(torch.randn(1, i), torch.randint(-127, 128, (o, i), dtype=torch.int8),
                   torch.rand(o)) for i, o in shapes]

        def step() -> None:
            for x, w, s in layers:
                if kernel is not None and kernel.takes(w):
                    kernel.matmul(x, w, s, None)
                else:
                    torch._weight_int8pack_mm(x.bfloat16(), w, s.bfloat16())

        seconds = timed(step, reps)
    return seconds, sum(i * o for i, o in shapes) / seconds / 1e9


# --------------------------------------------------------------------------- the engine


def engine_probe(args: argparse.Namespace) -> tuple[Any, Callable[[], dict[str, float]]]:
    """The engine's models, and a function measuring the stage seconds of a registered-speaker
    first chunk and, per second of audio, of one streamed request of ``args.tokens`` forced
    tokens."""
    import soundfile
    from bench_cv2_speed import PROMPT_WAV, CosyVoice2Probe
    from profile_cv2_first_chunk import Timers

    from tts_core.engine import Audio

    probe = CosyVoice2Probe(args.model_dir, args.precision, args.threads, False, 1000)
    engine, models = probe.engine, probe.engine.models
    samples, rate = soundfile.read(PROMPT_WAV, dtype="float32")
    prompt = Audio(samples, rate)
    probe.register(prompt)
    timers = Timers()
    timers.wrap_generator(models.lm, "inference", "prefill", "decode")
    timers.wrap(models.flow.decoder, "solve_streams", "flow")
    timers.wrap(models.hift, "inference", "hift")
    return models, lambda: measure(engine, probe, prompt, timers, args.tokens)


def measure(engine: Any, probe: Any, prompt: Any, timers: Any, tokens: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for _run in range(2):  # warm-up (builds the speaker's flow cache), then the measured run
        timers.wall.clear()
        cancel = threading.Event()
        start = time.perf_counter()
        chunks = engine.synthesize(probe.request(prompt, True, True), cancel)
        next(iter(chunks))
        total = time.perf_counter() - start
        cancel.set()
        chunks.close()
    for stage in ("prefill", "decode", "flow", "hift"):
        out[f"first.{stage}"] = timers.wall[stage]
    out["first.total"] = total
    probe.tokens = tokens
    timers.wall.clear()
    start = time.perf_counter()
    audio = sum(len(c) for c in engine.synthesize(probe.request(prompt, True, True),
                                                  threading.Event())) / probe.sample_rate
    total = time.perf_counter() - start
    for stage in ("decode", "flow", "hift"):
        out[f"sec.{stage}"] = timers.wall[stage] / audio
    out["sec.total"] = total / audio
    return out


def cpu_rates(est: dict[str, Any], lmc: dict[str, Any], first_rows: int, chunk_rows: int,
              prefill_rows: int, reps: int) -> dict[str, float]:
    """What this CPU reaches at the model's shapes (GFLOP/s, GB/s, int8 seconds per token)."""
    sum_bw, mv_bw, copy_bw = bandwidth(512, reps)
    return {
        "g_first": gemm_rate(est["shapes"], first_rows, torch.float32, reps),
        "g_chunk": gemm_rate(est["shapes"], chunk_rows, torch.float32, reps),
        "g_bf16": gemm_rate(est["shapes"], chunk_rows, torch.bfloat16, reps),
        "g_first_bf16": gemm_rate(est["shapes"], first_rows, torch.bfloat16, reps),
        "g_best": gemm_rate(est["shapes"], 1024, torch.float32, 3),
        "g_lm": gemm_rate(lmc["shapes"] + [lmc["head"]], prefill_rows, torch.float32, 3),
        "g_lm_bf16": gemm_rate(lmc["shapes"], prefill_rows, torch.bfloat16, 3),
        "sum_bw": sum_bw, "mv_bw": mv_bw, "copy_bw": copy_bw,
        "int8_s": int8_matvec(lmc["shapes"], reps)[0],
    }


# --------------------------------------------------------------------------- report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=Path("/work/models/cv2-full"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="auto", choices=["float32", "int8w", "auto"],
                    help="the engine's precision for the measured run and the floors (auto: "
                         "int8w LM, and the flow in bfloat16 where oneDNN has bfloat16 kernels "
                         "(AMX), else float32; int8w: int8w LM, float32 flow)")
    ap.add_argument("--first-tokens", type=int, default=10, help="tokens of the first chunk")
    ap.add_argument("--prompt-tokens", type=int, default=87, help="the speaker's prompt tokens")
    ap.add_argument("--prefill-rows", type=int, default=117,
                    help="LM prompt rows of the first chunk's request (not in the prefix cache)")
    ap.add_argument("--history-s", type=float, default=None,
                    help="speech before the average chunk, for its attention (default: half of "
                         "the measured stream; a 10 s utterance: 5)")
    ap.add_argument("--tokens", type=int, default=50, help="forced tokens of the measured stream")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--measured", nargs="*", default=None, metavar="KEY=SECONDS",
                    help="measured figures instead of running the engine")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load = open("/proc/loadavg").read().split()[:3]

    run_engine = None
    if args.measured is None:
        models, run_engine = engine_probe(args)
    else:
        from tts_core.cosyvoice2.model_dir import load_model_dir

        models = load_model_dir(args.model_dir, require_frontend=False,
                                precision=args.precision)
        measured = {k: float(v) for k, v in (item.split("=", 1) for item in args.measured)}
    lm, flow, hift = models.lm, models.flow, models.hift
    fcfg = flow.config
    ratio, lookahead = fcfg.token_mel_ratio, fcfg.pre_lookahead_len
    chunk_tokens = fcfg.encoder.static_chunk_size
    estimator = flow.decoder.estimator
    flow_dtype = next(estimator.parameters()).dtype
    flow_bf16 = flow_dtype == torch.bfloat16 and packs_bfloat16(torch.device("cpu"))
    int8_lm = args.precision in ("int8w", "auto")
    chunk = estimator.config.static_chunk_size
    steps, rows = flow.decoder.config.n_timesteps, 2  # Euler steps × the CFG pair
    rate = models.token_frame_rate

    lmc, est = lm_counts(lm), estimator_counts(estimator)
    # First chunk, registered speaker: the flow prompt is aligned (all but the look-ahead in
    # finished chunks), the new frames are look-ahead + first tokens; the LM makes
    # first + look-ahead tokens (one from the prefill).
    aligned = args.prompt_tokens - (args.prompt_tokens - lookahead) % chunk_tokens
    prefix = (aligned - lookahead) * ratio
    first_frames = (lookahead + args.first_tokens) * ratio
    first_decode = args.first_tokens + lookahead - 1
    first_flow = flow_flops(est, first_frames, prefix, chunk, steps, rows)
    history_s = args.tokens / rate / 2 if args.history_s is None else args.history_s
    sec_prefix = prefix + int(history_s * rate * ratio)
    sec_flow = flow_flops(est, rate * ratio, sec_prefix, chunk, steps, rows)
    hift_sec, hift_audio = hift_flops(hift, rate * ratio)
    hift_sec /= hift_audio
    first_audio = args.first_tokens / rate
    prefill = (args.prefill_rows * lmc["flops_row"]
               + lmc["attn_flops_per_key"] * args.prefill_rows * (args.prefill_rows + 1) / 2)

    print(f"model {args.model_dir}, {args.threads} threads, torch {torch.__version__}, "
          f"load {load}")
    print(f"LM: {lmc['layers']} layers; weights read per decode token {lmc['bytes_f32']/1e9:.3f}"
          f" GB float32, {lmc['bytes_int8w']/1e9:.3f} GB int8w; {lmc['flops_row']/1e9:.2f} "
          f"GFLOP per prefill row (+ attention)")
    print(f"flow estimator: {est['per_frame']/1e6:.1f} MFLOP per mel frame and step (+ "
          f"{est['per_pair']/1e3:.1f} kFLOP per attended key, {est['attn_layers']} attention "
          f"layers) × {steps} steps × CFG {rows}: {est['per_frame'] * steps * rows / 1e9:.2f} "
          f"GFLOP per frame + attention; first chunk {first_frames} frames after {prefix}: "
          f"{first_flow/1e9:.1f} GFLOP; per second of audio after {sec_prefix} frames: "
          f"{sec_flow/1e9:.1f} GFLOP")
    print(f"HiFT: {hift_sec/1e9:.1f} GFLOP per second of audio (torch flop counter)")

    est_rows_first, est_rows_chunk = rows * first_frames, rows * chunk

    def rates() -> dict[str, float]:
        return cpu_rates(est, lmc, est_rows_first, est_rows_chunk, args.prefill_rows, args.reps)

    # On a shared machine the CPU's speed drifts: measure it before and after the engine and
    # keep the best of each figure, so the floor stays below what the engine could have had.
    best = rates()
    if run_engine is not None:
        measured = run_engine()
        after = rates()
        best = {k: (min if k == "int8_s" else max)(v, after[k]) for k, v in best.items()}
    g_first, g_chunk, g_bf16, g_best, g_lm = (best[k] for k in (
        "g_first", "g_chunk", "g_bf16", "g_best", "g_lm"))
    # the flow's floors at the rate of the precision it runs in; int8w prompts run on the
    # layers' packed bfloat16 copies where oneDNN has bfloat16 kernels (weight_quant)
    if int8_lm and packs_bfloat16(torch.device("cpu")):
        g_lm = best["g_lm_bf16"]
    flow_first, flow_chunk = (best["g_first_bf16"], g_bf16) if flow_bf16 else (g_first, g_chunk)
    sum_bw, mv_bw, copy_bw, int8_s = (best[k] for k in ("sum_bw", "mv_bw", "copy_bw", "int8_s"))
    read_bw = max(sum_bw, mv_bw)
    int8_bw = sum(i * o for i, o in lmc["shapes"]) / int8_s / 1e9
    head_s = 4 * lmc["head"][0] * lmc["head"][1] / (read_bw * 1e9)
    print(f"measured (best before/after the engine): float32 GEMM {g_first:.1f} GFLOP/s at "
          f"the estimator's shapes × {est_rows_first} rows, {g_chunk:.1f} at {est_rows_chunk} "
          f"rows; bfloat16 (packed) {best['g_first_bf16']:.1f} at {est_rows_first} rows, "
          f"{g_bf16:.1f} at {est_rows_chunk} rows; LM prefill shapes × {args.prefill_rows} rows "
          f"{g_lm:.1f} (float32 {best['g_lm']:.1f}); memory read {sum_bw:.1f} GB/s (sum), "
          f"{mv_bw:.1f} GB/s (float32 matvec), copy {copy_bw:.1f} GB/s; int8 "
          f"weight-only matvec ({'native' if native_kernel() else 'PyTorch'} kernel) "
          f"{int8_bw:.1f} GB/s of weights ({int8_s*1e3:.1f} ms per token)")

    f32_step = lmc["bytes_f32"] / (read_bw * 1e9)
    int8_step = int8_s + head_s
    floors = {
        "first.prefill": prefill / (g_lm * 1e9),
        "first.decode": first_decode * (int8_step if int8_lm else f32_step),
        "first.flow": first_flow / (flow_first * 1e9),
        "first.hift": hift_sec * first_audio / (g_chunk * 1e9),
        "sec.decode": rate * (int8_step if int8_lm else f32_step),
        "sec.flow": sec_flow / (flow_chunk * 1e9),
        "sec.hift": hift_sec / (g_chunk * 1e9),
    }
    floors["first.total"] = sum(v for k, v in floors.items() if k.startswith("first."))
    # the measured RTF is the whole stream's wall ÷ its audio, so its prefill counts too
    floors["sec.total"] = (sum(v for k, v in floors.items() if k.startswith("sec."))
                           + floors["first.prefill"] * rate / args.tokens)
    labels = {
        "first.prefill": f"LM prefill ({args.prefill_rows} rows)",
        "first.decode": f"LM decode ({first_decode} steps, {'int8w' if int8_lm else 'float32'})",
        "first.flow": f"flow estimator ({first_frames} frames, {str(flow_dtype)[6:]})",
        "first.hift": f"HiFT ({first_audio:.2f} s audio)",
        "first.total": "first audio (sum; encoder etc. not in the floor)",
        "sec.decode": f"LM decode ({rate} steps, {'int8w' if int8_lm else 'float32'})",
        "sec.flow": f"flow estimator ({rate * ratio} frames, {str(flow_dtype)[6:]})",
        "sec.hift": "HiFT",
        "sec.total": f"real-time factor ({args.tokens}-token stream, incl. prefill)",
    }
    print(f"\n| first chunk (registered, {args.first_tokens} tokens, prompt {args.prompt_tokens}) "
          "/ per second of audio | floor s | measured s | measured ÷ floor |")
    print("|---|---|---|---|")
    for key, label in labels.items():
        part = "first chunk" if key.startswith("first") else "per s audio"
        m = measured.get(key)
        cells = ("–", "–") if m is None else (f"{m:.2f}", f"{m / floors[key]:.1f}")
        print(f"| {part}: {label} | {floors[key]:.3f} | {cells[0]} | {cells[1]} |")
    print(f"\nAt the best float32 GEMM rate seen ({g_best:.1f} GFLOP/s, estimator shapes × 1024 "
          f"rows) the estimator alone needs {first_flow / g_best / 1e9:.2f} s for the first chunk "
          f"and {sec_flow / g_best / 1e9:.2f} s per second of audio; at bfloat16's "
          f"{g_bf16:.1f}: {first_flow / g_bf16 / 1e9:.2f} s and {sec_flow / g_bf16 / 1e9:.2f} s.")
    print(f"f32 decode floor {1 / f32_step:.1f} tok/s, int8w decode floor {1 / int8_step:.1f} "
          f"tok/s; load at the end {open('/proc/loadavg').read().split()[:3]}")


if __name__ == "__main__":
    main()
