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

A last table measures the engine's flow prompt alignment (STREAM_ALIGN_FLOW_PROMPT): the
engine's schedule streamed with the whole and with the aligned prompt, against one-shot output
on the whole prompt (``--align-prompt-tokens``, default 87, as a 3.5 s prompt).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from tts_core.cosyvoice2.engine import align_stream_prompt, default_schedule
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


def run_alignment(driver: Token2Wav, case: dict[str, torch.Tensor], prompt_tokens: int,
                  mel_config: MelConfig) -> None:
    """The engine's STREAM_ALIGN_FLOW_PROMPT: its schedule streamed on the whole flow prompt and
    on the aligned one (start dropped so only the look-ahead lies outside finished chunks),
    against the one-shot output on the whole prompt (what a non-streamed request gives).

    The recorded prompt is too short to align, so a longer one is made: ``prompt_tokens``
    seeded random tokens, whose features are the flow's own one-shot mel for them."""
    flow = driver.flow
    config = flow.config
    generator = torch.Generator().manual_seed(4321)
    tokens = torch.randint(0, config.vocab_size, (1, prompt_tokens), generator=generator,
                           dtype=torch.int32)
    feat = flow.inference(tokens, case["prompt_token"], case["prompt_feat"], case["embedding"],
                          streaming=False, finalize=True).transpose(1, 2).contiguous()
    whole_case = dict(case, prompt_token=tokens, prompt_feat=feat)
    aligned_token, aligned_feat = align_stream_prompt(
        tokens, feat, config.encoder.static_chunk_size, config.pre_lookahead_len,
        config.token_mel_ratio)
    aligned_case = dict(case, prompt_token=aligned_token, prompt_feat=aligned_feat)
    schedule = default_schedule(config.encoder.static_chunk_size)

    def one_shot(c: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        mel = flow.inference(c["token"], c["prompt_token"], c["prompt_feat"], c["embedding"],
                             streaming=False, finalize=True)
        return mel, driver.hift.inference(mel, deterministic=True)[0]

    whole_mel, whole_wav = one_shot(whole_case)
    aligned_mel, aligned_wav = one_shot(aligned_case)
    # The start noise is a fixed tensor indexed by frame position, so dropping the prompt's
    # start also gives the new frames other noise (another draw, as a different prompt length
    # would). Control: the whole prompt with the noise shifted so its new frames get the
    # aligned run's noise; aligned vs that isolates the dropped conditioning.
    shift = feat.shape[1] - aligned_feat.shape[1]
    noise = flow.decoder.noise
    flow.decoder.noise = torch.roll(noise, shift, dims=-1)
    try:
        shifted_mel, shifted_wav = one_shot(whole_case)
    finally:
        flow.decoder.noise = noise
    print(f"\nflow prompt alignment (engine schedule, {case['token'].shape[1]} new tokens): "
          f"prompt {prompt_tokens} tokens, aligned {aligned_token.shape[1]}; reference = one-shot "
          "on the whole prompt")
    print(f"  {'output':44s} {'mel L1':>6s} {'mel rel':>7s} {'SNR dB':>6s} {'lmel L1':>7s}")
    scale = whole_mel.abs().mean().item()

    def row(label: str, mel: torch.Tensor, wav: torch.Tensor) -> None:
        l1 = (mel - whole_mel).abs().mean().item()
        print(f"  {label:44s} {l1:6.3f} {l1 / scale:7.4f} {snr_db(wav, whole_wav):6.1f} "
              f"{logmel_l1(wav, whole_wav, mel_config):7.4f}")

    row("one-shot, whole prompt, noise shifted", shifted_mel, shifted_wav)
    row("one-shot, aligned prompt", aligned_mel, aligned_wav)
    streams = {}
    for label, c in (("streamed, whole prompt", whole_case),
                     ("streamed, aligned prompt (engine default)", aligned_case)):
        streams[label] = stream_once(driver, c, schedule)
        row(label, streams[label]["mel"], streams[label]["wav"])
    a, b = streams.values()
    l1 = (aligned_mel - shifted_mel).abs().mean().item()
    print(f"  same noise, one-shot aligned vs whole prompt (the dropped conditioning alone): mel "
          f"L1 {l1:.3f} (rel {l1 / scale:.4f}), SNR {snr_db(aligned_wav, shifted_wav):.1f} dB, "
          f"lmel L1 {logmel_l1(aligned_wav, shifted_wav, mel_config):.4f}")
    print(f"  aligned vs whole-prompt stream: mel L1 {(a['mel'] - b['mel']).abs().mean():.3f}, "
          f"SNR {snr_db(b['wav'], a['wav']):.1f} dB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_DIR,
                        help="directory with cosyvoice2.yaml, flow.pt, hift.pt and vectors/")
    parser.add_argument("--tokens", type=int, default=300,
                        help="length of the extra seeded random-token case (0: skip)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--align-prompt-tokens", type=int, default=87,
                        help="prompt length of the flow prompt alignment case (0: skip)")
    parser.add_argument("--only-align", action="store_true",
                        help="only the alignment case, on the recorded tokens (for full size)")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)

    flow, hift, mel_config = load_models(options.model_dir)
    driver = Token2Wav(flow, hift, deterministic=True)
    # a directory without recorded vectors (e.g. a generated full-size one) takes the parity
    # set's inputs: tokens, prompt features and speaker embedding have the same shapes
    vectors = options.model_dir / "vectors"
    if not vectors.is_dir():
        vectors = DEFAULT_DIR / "vectors"
    recorded = load_file(vectors / "token2wav_stream.safetensors")
    case = {k: recorded[k] for k in ("prompt_token", "prompt_feat", "embedding", "token")}
    with torch.inference_mode():
        if not options.only_align:
            run_case(driver, "recorded tokens (token2wav_stream)", case, mel_config)
        if options.tokens > 0 and not options.only_align:
            vocab = flow.config.vocab_size
            generator = torch.Generator().manual_seed(1234)
            case["token"] = torch.randint(0, vocab, (1, options.tokens), generator=generator,
                                          dtype=torch.int32)
            run_case(driver, f"seeded random tokens ({options.tokens})", case, mel_config)
        if options.align_prompt_tokens > 0:
            run_alignment(driver, case, options.align_prompt_tokens, mel_config)


if __name__ == "__main__":
    main()
