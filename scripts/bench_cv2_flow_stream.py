"""Streaming token2wav with and without the flow's stream cache, side by side in one run.

Both sides vocode the same random speech tokens with the same prompt, one token at a time as
the LM would yield them:

* before: every chunk re-runs the flow over the prompt and all tokens so far (the masked,
  whole-sequence formulation the flow had before the cache), and the last chunk runs with full
  attention over everything, as the reference does;
* after: the engine's schedule with the flow's stream cache: each chunk computes only frames
  that are not final yet, the last chunk keeps chunk attention; for a registered speaker the
  prompt's share comes from a cache built once.

Times are CPU seconds of this process (``time.process_time``: compute, robust to other
processes sharing the cores; with more than one thread it adds up the threads, spin-waits
included). Printed: non-streaming token2wav time (one shot, full attention; the yardstick),
streaming token2wav compute (all chunks) and its ratio to non-streaming, first-chunk flow time
(zero-shot and registered speaker), the flow cache's memory, and checks that the cached path is
bit-identical to recomputing. Medians of --repeats runs. Only flow.pt and hift.pt are loaded.

    PYTHONPATH=$PWD .venv/bin/python scripts/bench_cv2_flow_stream.py \\
        --model-dir /work/models/cv2-full --threads 2 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tts_core.cosyvoice2 import hyperyaml
from tts_core.cosyvoice2.checkpoint import load_strict
from tts_core.cosyvoice2.engine import default_schedule
from tts_core.cosyvoice2.flow import CausalFlow, FlowConfig
from tts_core.cosyvoice2.hift import HiFTConfig, HiFTGenerator, normalize_state_dict
from tts_core.cosyvoice2.token2wav import StreamSchedule, Token2Wav

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DIR = REPO.parent / "shared" / "parity" / "cosyvoice2"


def load_flow_and_hift(model_dir: Path) -> tuple[CausalFlow, HiFTGenerator]:
    cfg = hyperyaml.load(model_dir / "cosyvoice2.yaml")
    flow = CausalFlow(FlowConfig.from_yaml(cfg["flow"]))
    load_strict(flow, torch.load(model_dir / "flow.pt", map_location="cpu", weights_only=True),
                "flow.pt")
    hift = HiFTGenerator(HiFTConfig.from_yaml(cfg["hift"]))
    state = normalize_state_dict(torch.load(model_dir / "hift.pt", map_location="cpu",
                                            weights_only=True))
    load_strict(hift, state, "hift.pt")
    hift.fold_weight_norm()
    return flow.eval(), hift.eval()


class _LegacyFlow(CausalFlow):
    """The flow as it was before the cache: streaming calls run the masked whole sequence."""

    @property
    def supports_chunk_streaming(self) -> bool:
        return False


def legacy(flow: CausalFlow) -> CausalFlow:
    old = copy.copy(flow)  # shares every parameter
    old.__class__ = _LegacyFlow
    return old


class TimedFlow:
    """Delegates to a flow and records the duration of each call that makes mel frames."""

    def __init__(self, flow: Any):
        self.flow, self.calls = flow, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.flow, name)

    def _timed(self, method: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        started = time.process_time()
        out = method(*args, **kwargs)
        self.calls.append(time.process_time() - started)
        return out

    def inference(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._timed(self.flow.inference, *args, **kwargs)

    def inference_cached(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._timed(self.flow.inference_cached, *args, **kwargs)


def stream(driver: Token2Wav, tokens: list[int], prompt: tuple[torch.Tensor, ...],
           **options: Any) -> tuple[float, float, list[torch.Tensor], int]:
    """(CPU seconds in all, the first chunk's flow CPU seconds, wav chunks, the most memory
    the stream's flow cache held), tokens pushed one at a time as the LM yields them."""
    flow = driver.flow
    assert isinstance(flow, TimedFlow)
    flow.calls = []
    started = time.process_time()
    state = driver.start_stream(*prompt, **options)
    chunks, held = [], 0
    for t in tokens:
        chunks += state.push([t])
        if state._flow_cache is not None:
            held = max(held, state._flow_cache.nbytes())
    chunks.append(state.finish())
    return time.process_time() - started, flow.calls[0], chunks, held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=87, help="3.5 s of prompt")
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--first-chunk-tokens", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true",
                        help="also recompute the after schedule with the masked flow (slow)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    flow, hift = load_flow_and_hift(args.model_dir)
    gen = torch.Generator().manual_seed(args.seed)
    vocab = flow.config.vocab_size
    prompt_token = torch.randint(0, vocab, (1, args.prompt_tokens), generator=gen,
                                 dtype=torch.int32)
    prompt_feat = torch.randn(1, flow.config.token_mel_ratio * args.prompt_tokens,
                              flow.config.output_size, generator=gen) * 2 - 6
    embedding = torch.randn(1, flow.config.spk_embed_dim, generator=gen)
    prompt = (prompt_token, prompt_feat, embedding)
    tokens = torch.randint(0, vocab, (args.tokens,), generator=gen).tolist()
    token = torch.tensor([tokens], dtype=torch.int32)

    chunk = flow.config.encoder.static_chunk_size
    after_schedule = default_schedule(chunk, args.first_chunk_tokens)
    before_schedule = StreamSchedule(**{**after_schedule.__dict__,
                                        "full_attention_final": True, "hop_align": 0})
    before = Token2Wav(TimedFlow(legacy(flow)), hift, deterministic=True,
                       schedule=before_schedule)
    after = Token2Wav(TimedFlow(flow), hift, deterministic=True, schedule=after_schedule)
    uncached_after = Token2Wav(TimedFlow(legacy(flow)), hift, deterministic=True,
                               schedule=after_schedule) if args.check else None

    started = time.process_time()
    speaker_cache = after.prompt_cache(*prompt)
    build = time.process_time() - started

    audio = args.tokens / 25
    rows: dict[str, list[float]] = {k: [] for k in (
        "nonstream", "before", "after", "after_spk", "first_before", "first_after",
        "first_after_spk")}
    peak_cache = 0
    for _ in range(args.repeats):
        started = time.process_time()
        one_shot = after.synthesize(token, *prompt)
        rows["nonstream"].append(time.process_time() - started)
        total, first, chunks_before, _ = stream(before, tokens, prompt)
        rows["before"].append(total)
        rows["first_before"].append(first)
        total, first, chunks_after, held = stream(after, tokens, prompt)
        rows["after"].append(total)
        rows["first_after"].append(first)
        total, first, chunks_spk, _ = stream(after, tokens, prompt, prompt_cache=speaker_cache)
        rows["after_spk"].append(total)
        rows["first_after_spk"].append(first)
        peak_cache = max(peak_cache, held)

    med = {k: statistics.median(v) for k, v in rows.items()}
    wav_after = torch.cat(chunks_after, dim=1)
    same_spk = all(torch.equal(a, b) for a, b in zip(chunks_after, chunks_spk, strict=True))
    mel_one = flow.inference(token, *prompt)
    mel_stream_after = flow.inference(token, *prompt, streaming=True, finalize=True)

    def rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).abs().mean() / b.abs().mean()).item()

    load = open("/proc/loadavg").read().split()[:3]
    print(f"model {args.model_dir}  threads {args.threads}  prompt {args.prompt_tokens} tokens"
          f"  {args.tokens} tokens ({audio:.1f} s audio)  first chunk "
          f"{args.first_chunk_tokens} tokens  repeats {args.repeats}  load {' '.join(load)}")
    print(f"{'CPU seconds (medians)':44s}{'before':>12s}{'after':>12s}")
    print(f"{'non-streaming token2wav s (one shot)':44s}{med['nonstream']:12.2f}"
          f"{med['nonstream']:12.2f}")
    print(f"{'streaming token2wav s, zero-shot':44s}{med['before']:12.2f}{med['after']:12.2f}")
    print(f"{'  ÷ non-streaming':44s}{med['before'] / med['nonstream']:12.2f}"
          f"{med['after'] / med['nonstream']:12.2f}")
    print(f"{'streaming token2wav s, registered speaker':44s}{med['before']:12.2f}"
          f"{med['after_spk']:12.2f}")
    print(f"{'  ÷ non-streaming':44s}{med['before'] / med['nonstream']:12.2f}"
          f"{med['after_spk'] / med['nonstream']:12.2f}")
    print(f"{'first-chunk flow s, zero-shot':44s}{med['first_before']:12.3f}"
          f"{med['first_after']:12.3f}")
    print(f"{'first-chunk flow s, registered speaker':44s}{med['first_before']:12.3f}"
          f"{med['first_after_spk']:12.3f}")
    print(f"speaker prompt cache: built in {build:.2f} s, {speaker_cache.frames} frames, "
          f"{speaker_cache.nbytes() / 2**20:.0f} MiB; the most a zero-shot stream's cache held: "
          f"{peak_cache / 2**20:.0f} MiB; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")
    print(f"registered-speaker stream == zero-shot stream, bit for bit: {same_spk}")
    if uncached_after is not None:
        # the two formulations round differently (tolerance, not equality)
        _, _, chunks_recomputed, _ = stream(uncached_after, tokens, prompt)
        mask_diff = (wav_after - torch.cat(chunks_recomputed, dim=1)).abs().max().item()
        print(f"cached stream vs the same schedule recomputed by the masked whole-sequence "
              f"flow: max abs wav diff {mask_diff:.2e}")
    print(f"mel, chunk attention everywhere vs one shot (full attention): relative L1 "
          f"{rel_l1(mel_stream_after, mel_one):.3f}")
    def snr(wav: torch.Tensor) -> float:
        noise = (wav - one_shot).pow(2).mean()
        return (10 * torch.log10(one_shot.pow(2).mean() / noise)).item()

    print(f"streamed wav vs one shot, SNR dB: before {snr(torch.cat(chunks_before, dim=1)):.1f}"
          f", after {snr(wav_after):.1f} (random weights: only the relative size means much)")


if __name__ == "__main__":
    main()
