"""Streaming vs one-shot token2wav on a CosyVoice 2 model directory: latency proxy and quality cost.

For each chunk schedule, the same tokens are vocoded once in one shot (full attention) and once
streamed token by token; the script prints the audio duration of the first chunk and how many
tokens the LLM must have produced before it can be cut (the latency proxy), the number of
chunks, and how far the streamed waveform is from the one-shot one: SNR, max abs difference and
mean abs log-mel distance (80-bin, the flow's feature extractor). The vocoder's random draws are
zeroed so the schedule is the only difference.

Default model: the parity directory (seeded random weights, so the "speech" is not speech; the
figures measure the streaming machinery, not perceptual quality).

    .venv/bin/python scripts/bench_cv2_stream_quality.py [--model-dir DIR] [--tokens N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from tts_core.cosyvoice2.features import MelConfig, mel_spectrogram_24k
from tts_core.cosyvoice2.flow import CausalFlow
from tts_core.cosyvoice2.hift import HiFTGenerator
from tts_core.cosyvoice2.model_dir import load_model_dir
from tts_core.cosyvoice2.token2wav import ChunkTrace, StreamSchedule, Token2Wav

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DIR = REPO.parent / "shared" / "parity" / "cosyvoice2"

SCHEDULES = {
    "reference 25(+pad)/x2/100": StreamSchedule(),
    "first 15/x2/100": StreamSchedule(first_hop=15),
    "first 10/x2/100": StreamSchedule(first_hop=10),
    "first 10/x2.5/100": StreamSchedule(first_hop=10, growth=2.5),
    "first 5/x2/100": StreamSchedule(first_hop=5),
    "first 10, pad to 25/x2/100": StreamSchedule(first_hop=10, prompt_align=25),
    "first 10, no pad/x2/100": StreamSchedule(first_hop=10, prompt_align=0),
}


def load_models(model_dir: Path) -> tuple[CausalFlow, HiFTGenerator, MelConfig]:
    """The flow, the (weight-norm folded) vocoder and the mel settings, as the engine loads them."""
    models = load_model_dir(model_dir, require_frontend=False)
    return models.flow, models.hift, models.mel_config


def snr_db(signal: torch.Tensor, reference: torch.Tensor) -> float:
    noise = (signal - reference).double().pow(2).sum()
    if noise == 0:
        return float("inf")
    return (10 * torch.log10(reference.double().pow(2).sum() / noise)).item()


def logmel_l1(a: torch.Tensor, b: torch.Tensor, mel_config: MelConfig) -> float:
    diff = mel_spectrogram_24k(a, mel_config) - mel_spectrogram_24k(b, mel_config)
    return diff.abs().mean().item()


def stream_once(driver: Token2Wav, case: dict[str, torch.Tensor], schedule: StreamSchedule
                ) -> dict:
    """Stream token by token; return the wav, the flow mel it vocoded and timing figures."""
    traces: list[ChunkTrace] = []
    stream = driver.start_stream(case["prompt_token"], case["prompt_feat"], case["embedding"],
                                 schedule=schedule, on_chunk=traces.append)
    chunks: list[torch.Tensor] = []
    first_compute, tokens_needed = None, case["token"].shape[1]
    started = time.perf_counter()
    for token in case["token"][0].tolist():
        tick = time.perf_counter()
        ready = stream.push([token])
        if ready and first_compute is None:
            first_compute, tokens_needed = time.perf_counter() - tick, stream.num_tokens
        chunks += ready
    chunks.append(stream.finish())
    total = time.perf_counter() - started
    # the new flow frames of every chunk, without the cached frames the vocoder re-reads
    cached = driver.mel_cache_len
    mel = torch.cat([t.hift_in_mel[:, :, (cached if i else 0):] for i, t in enumerate(traces)],
                    dim=2)
    return {"wav": torch.cat(chunks, dim=1), "mel": mel, "chunks": len(chunks),
            "first_s": chunks[0].shape[1] / driver.sample_rate, "tokens_needed": tokens_needed,
            "first_compute": total if first_compute is None else first_compute,
            "total": total}


def run_case(driver: Token2Wav, name: str, case: dict[str, torch.Tensor],
             mel_config: MelConfig) -> None:
    args = (case["token"], case["prompt_token"], case["prompt_feat"], case["embedding"])
    started = time.perf_counter()
    whole_mel = driver.flow.inference(*args, streaming=False, finalize=True)
    whole, _ = driver.hift.inference(whole_mel, deterministic=True)
    one_shot_s = time.perf_counter() - started
    print(f"\n{name}: prompt {case['prompt_token'].shape[1]} tokens, {case['token'].shape[1]} "
          f"new tokens = {whole.shape[1] / driver.sample_rate:.2f} s audio; one-shot compute "
          f"{one_shot_s:.2f} s")
    print("  vs one-shot: mel L1 = mean |flow mel difference|; SNR and log-mel L1 of the wav."
          "  vs ref-stream: the same against the reference schedule's streamed wav.")
    header = (f"  {'schedule':28s} {'tok@1st':>7s} {'1st s':>6s} {'chunks':>6s} "
              f"{'1st cpu s':>9s} {'all cpu s':>9s} | {'mel L1':>6s} {'SNR dB':>6s} "
              f"{'lmel L1':>7s} | {'SNR dB':>6s} {'lmel L1':>7s}")
    print(header)
    reference = None
    for label, schedule in SCHEDULES.items():
        r = stream_once(driver, case, schedule)
        assert r["wav"].shape == whole.shape and r["mel"].shape == whole_mel.shape
        if reference is None:
            reference = r
        mel_l1 = (r["mel"] - whole_mel).abs().mean().item()
        print(f"  {label:28s} {r['tokens_needed']:7d} {r['first_s']:6.3f} {r['chunks']:6d} "
              f"{r['first_compute']:9.3f} {r['total']:9.2f} | {mel_l1:6.3f} "
              f"{snr_db(r['wav'], whole):6.1f} {logmel_l1(r['wav'], whole, mel_config):7.4f} | "
              f"{snr_db(r['wav'], reference['wav']):6.1f} "
              f"{logmel_l1(r['wav'], reference['wav'], mel_config):7.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_DIR,
                        help="directory with cosyvoice2.yaml, flow.pt, hift.pt and vectors/")
    parser.add_argument("--tokens", type=int, default=300,
                        help="length of the extra seeded random-token case (0: skip)")
    parser.add_argument("--threads", type=int, default=1)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)

    flow, hift, mel_config = load_models(options.model_dir)
    driver = Token2Wav(flow, hift, deterministic=True)
    recorded = load_file(options.model_dir / "vectors" / "token2wav_stream.safetensors")
    case = {k: recorded[k] for k in ("prompt_token", "prompt_feat", "embedding", "token")}
    with torch.inference_mode():
        run_case(driver, "recorded tokens (token2wav_stream)", case, mel_config)
        if options.tokens > 0:
            vocab = flow.config.vocab_size
            generator = torch.Generator().manual_seed(1234)
            case["token"] = torch.randint(0, vocab, (1, options.tokens), generator=generator,
                                          dtype=torch.int32)
            run_case(driver, f"seeded random tokens ({options.tokens})", case, mel_config)


if __name__ == "__main__":
    main()
