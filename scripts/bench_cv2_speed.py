#!/usr/bin/env python3
"""Speed and accuracy of the CosyVoice engine per precision, side by side in one run.

    scripts/bench_cv2_speed.py --model-dir /path/to/CosyVoice2-0.5B --threads 2 --runs 3
    scripts/bench_cv2_speed.py --generate /tmp/cv2-full          # random full-size directory
    scripts/bench_cv2_speed.py --model-dir DIR --configs float32 auto auto/pipeline

Each configuration (a precision option, optionally ``/pipeline`` to decode in
a thread of its own while chunks are vocoded, ``/tN`` for N torch threads, ``/nonative`` to keep
PyTorch's/oneDNN's kernels instead of the native ones (tts_core/cosyvoice2/int8_matvec.py,
attention_native.py, gemm_native.py), ``/noflow`` for the flow's only)
runs in a subprocess of its own, one after the other, so peak memory is that configuration's and
the two never compete for the cores. Every request is forced to exactly ``--tokens`` speech
tokens (stop ids are refused until then, and the end id is returned at once after), because
random weights would otherwise stop at random points. Prompt: shared/audio/zero_shot_prompt.wav
(3.5 s) with its transcript; text: a 20-character sentence. The first configuration is the
reference for the error figures: it saves its teacher-forcing data and every later
configuration is measured against it on the same tokens and conditioning.

Figures (medians over ``--runs``, after one warm-up):

* prefill ms, decode tokens/s: the LM alone (first step; steps after it), prompt-audio request;
* first audio: wall time from the request to its first chunk, prompt audio in the request
  (encoding the prompt included; a recording new to the engine, and one sent again, which the
  engine keeps by content) and a registered speaker;
* first chunk: seconds of audio in the first chunk;
* RTF: wall time / audio seconds of the whole utterance, streaming and not; stream/whole: the
  ratio of the two wall times;
* stalls: streamed chunks that arrived after the audio before them had finished playing
  (playback starting at the first chunk), with the total waiting time;
* peak RSS of the configuration's process;
* errors against the reference: LM max |log-prob error| over the reference's top-25 candidates
  of every step (the ids the sampler can draw), top-1 agreement and the largest total variation
  distance between the two next-token distributions, under teacher forcing; flow
  mel relative L1, non-streaming and streamed chunk by chunk (same tokens and prompt; the two
  paths run different code); waveform SNR (same excitation seed).

The engine family comes from the model directory (``cosyvoice2.yaml``: CosyVoice 2); a new
family plugs in as another ``Probe`` class.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared"
PROMPT_WAV = SHARED / "audio" / "zero_shot_prompt.wav"
PROMPT_TEXT = "希望你以后能够做的比我还好呦。"
TEXT = "收到好友从远方寄来的生日礼物，真开心。"  # 20 characters
SPEAKER = "bench"
TOP_CANDIDATES = 25  # the sampler's top_k: the ids whose log-probs matter


# --------------------------------------------------------------------------- engine families


def engine_family(model_dir: Path) -> str:
    if (model_dir / "cosyvoice3.yaml").is_file():
        return "cosyvoice3"
    if (model_dir / "cosyvoice2.yaml").is_file() or (model_dir / "cosyvoice.yaml").is_file():
        return "cosyvoice2"
    raise SystemExit(f"{model_dir}: no cosyvoice2.yaml / cosyvoice3.yaml; not a model directory")


class ForcedLength:
    """Sampler wrapper: speech tokens only until ``n`` are decoded, then the end id."""

    def __init__(self, inner: Any, n: int, eos: int) -> None:
        self.inner, self.n, self.eos = inner, n, eos

    def __call__(self, logp: Any, decoded: list[int], ignore_eos: bool) -> int:
        if len(decoded) >= self.n:
            return self.eos
        return self.inner(logp, decoded, True)


class TeacherForced:
    """Sampler replaying ``tokens``, then the end id."""

    def __init__(self, tokens: list[int], eos: int) -> None:
        self.tokens, self.eos = tokens, eos

    def __call__(self, logp: Any, decoded: list[int], ignore_eos: bool) -> int:
        return self.tokens[len(decoded)] if len(decoded) < len(self.tokens) else self.eos


class CosyVoice2Probe:
    """What the benchmark needs from a CosyVoice 2 engine (or one built on it)."""

    @staticmethod
    def engine_class() -> Any:
        from tts_core.cosyvoice2.engine import CosyVoice2Engine

        return CosyVoice2Engine

    def __init__(self, model_dir: Path, precision: str, threads: int, pipeline: bool,
                 tokens: int) -> None:
        import torch

        self.torch = torch
        self.engine = self.engine_class().from_model_dir(
            model_dir, threads=threads, device="cpu", precision=precision, pipeline=pipeline,
            seed=1234)
        self.tokens = tokens
        self.eos = self.engine.models.lm.config.speech_token_size
        make_sampler = self.engine._sampler
        self.engine._sampler = lambda randomness: ForcedLength(  # type: ignore[method-assign]
            make_sampler(randomness), self.tokens, self.eos)
        plan = self.engine.models.precision
        self.description = (f"LM {plan.lm_description}, flow {str(plan.flow_dtype)[6:]}"
                            if plan else "")
        if plan and plan.lm_weight_int8:
            from tts_core.cosyvoice2.int8_matvec import native_kernel

            kernel = "native" if native_kernel() is not None else "PyTorch's"
            self.description += f", {kernel} int8 kernel for decode steps"
        if plan and plan.flow_dtype == torch.bfloat16:
            from tts_core.cosyvoice2.attention_native import native_attention
            from tts_core.cosyvoice2.gemm_native import native_gemm

            kernels = "native" if native_attention() and native_gemm() else "PyTorch's"
            self.description += f", {kernels} attention and products in flow chunks"

    @property
    def sample_rate(self) -> int:
        return self.engine.sample_rate

    def register(self, prompt: Any) -> None:
        self.engine.register_speaker(SPEAKER, prompt, PROMPT_TEXT, replace=True)

    def request(self, prompt: Any, stream: bool, registered: bool) -> Any:
        from tts_core.engine import Mode, SynthesisRequest

        if registered:
            return SynthesisRequest(Mode.ZERO_SHOT, text=TEXT, speaker_id=SPEAKER, stream=stream)
        return SynthesisRequest(Mode.ZERO_SHOT, text=TEXT, prompt=prompt, prompt_text=PROMPT_TEXT,
                                stream=stream)

    def synthesize(self, request: Any, cancel: threading.Event) -> Any:
        return self.engine.synthesize(request, cancel)

    def lm_timing(self, prompt: Any) -> tuple[float, float, list[int]]:
        """(prefill s, median decode step s, tokens) of one LM pass on a prompt-audio request."""
        engine = self.engine
        voice = engine._voice(self.request(prompt, stream=True, registered=False))
        text_ids = engine.tokenizer.encode(engine.text.segments(TEXT)[0])
        sampler = ForcedLength(_plain_sampler(engine), self.tokens, self.eos)
        stamps: list[float] = []
        start = time.perf_counter()
        out = list(engine.models.lm.inference(
            text_ids, voice.lm_prompt_text_ids, voice.lm_prompt_tokens, sampler,
            on_step=lambda _s: stamps.append(time.perf_counter()),
            prefix_cache=engine._uncached_prefix))
        steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
        return stamps[0] - start, statistics.median(steps), out

    def reference_data(self, prompt: Any, tokens: list[int]) -> dict[str, Any]:
        """Teacher-forced log-probs, the flow's mel and the waveform for ``tokens``."""
        torch = self.torch
        engine = self.engine
        voice = engine._voice(self.request(prompt, stream=False, registered=False))
        text_ids = engine.tokenizer.encode(engine.text.segments(TEXT)[0])
        logps: list[Any] = []
        list(engine.models.lm.inference(
            text_ids, voice.lm_prompt_text_ids, voice.lm_prompt_tokens,
            TeacherForced(tokens, self.eos), on_step=lambda s: logps.append(s.logp),
            prefix_cache=engine._uncached_prefix))
        token = torch.tensor([tokens], dtype=torch.int32)
        with torch.inference_mode():
            mel, mel_stream = (
                engine.models.flow.inference(token, voice.flow_prompt_tokens,
                                             voice.flow_prompt_feat, voice.embedding,
                                             streaming=streaming, finalize=True).float()
                for streaming in (False, True))
            wav = engine.token2wav.synthesize(token, voice.flow_prompt_tokens,
                                              voice.flow_prompt_feat, voice.embedding,
                                              generator=torch.Generator().manual_seed(7))
        return {"logp": torch.stack(logps[:len(tokens)]), "mel": mel, "mel_stream": mel_stream,
                "wav": wav.float()}


def _plain_sampler(engine: Any) -> Any:
    from tts_core.cosyvoice2.sampling import RasSampler

    return RasSampler.seeded(engine.models.sampling, engine.models.lm.config.speech_token_size,
                             1234)


class CosyVoice3Probe(CosyVoice2Probe):
    """The CosyVoice 3 engine subclasses the CosyVoice 2 one through hooks (its prompt layout,
    LM and acoustic model), so the same measurements apply; any id >= speech_token_size ends
    its speech, so the forced end id is the same."""

    @staticmethod
    def engine_class() -> Any:
        from tts_core.cosyvoice3.engine import CosyVoice3Engine

        return CosyVoice3Engine


PROBES = {"cosyvoice2": CosyVoice2Probe, "cosyvoice3": CosyVoice3Probe}


# --------------------------------------------------------------------------- one configuration


def first_chunk(probe: Any, request: Any) -> tuple[float, float]:
    """(wall s to the first chunk, its audio s); the request is cancelled after it."""
    cancel = threading.Event()
    start = time.perf_counter()
    chunks = probe.synthesize(request, cancel)
    chunk = next(iter(chunks))
    elapsed = time.perf_counter() - start
    cancel.set()
    chunks.close()
    return elapsed, len(chunk) / probe.sample_rate


def whole(probe: Any, request: Any) -> dict[str, float]:
    """Wall time, audio seconds and stalls of one complete request."""
    cancel = threading.Event()
    start = time.perf_counter()
    arrivals: list[tuple[float, float]] = []
    for chunk in probe.synthesize(request, cancel):
        arrivals.append((time.perf_counter() - start, len(chunk) / probe.sample_rate))
    wall = time.perf_counter() - start
    audio = sum(d for _, d in arrivals)
    stalls, waited = 0, 0.0
    play_end = arrivals[0][0]
    for arrival, duration in arrivals:
        if arrival > play_end + 1e-3:
            stalls += 1
            waited += arrival - play_end
            play_end = arrival
        play_end += duration
    return {"wall": wall, "audio": audio, "stalls": stalls, "waited": waited}


def run_config(args: argparse.Namespace) -> None:
    import soundfile
    import torch

    from tts_core.engine import Audio

    name, *options = args.worker.split("/")
    threads = args.threads
    for option in options:
        if option.startswith("t") and option[1:].isdigit():
            threads = int(option[1:])
        elif option == "nonative":  # both read when the model first uses them
            for switch in ("TTS_NATIVE_INT8", "TTS_NATIVE_ATTENTION", "TTS_NATIVE_GEMM"):
                os.environ[switch] = "0"
        elif option == "noflow":  # the flow's native kernels only
            os.environ["TTS_NATIVE_ATTENTION"] = os.environ["TTS_NATIVE_GEMM"] = "0"
        elif option != "pipeline":
            raise SystemExit(f"unknown configuration option {option!r} in {args.worker!r}")
    family = engine_family(args.model_dir)
    if family not in PROBES:
        raise SystemExit(f"{family} engines are not benchmarked yet: add a probe class")
    probe = PROBES[family](args.model_dir, name, threads, "pipeline" in options,
                           args.tokens)
    samples, rate = soundfile.read(PROMPT_WAV, dtype="float32")
    prompt = Audio(samples, rate)
    probe.register(prompt)
    runs = args.runs

    # Warm-up: every path once, the streamed and the whole utterance included (a first long
    # stream faults in its flow cache's pages and has oneDNN build the vocoder's kernels for
    # each new chunk length: the first 10 s stream after load took 12.4 s, the next ones 9.8)
    first_chunk(probe, probe.request(prompt, True, False))
    first_chunk(probe, probe.request(prompt, True, True))
    whole(probe, probe.request(prompt, True, True))
    whole(probe, probe.request(prompt, False, True))

    def progress(what: str) -> None:
        print(f"  {args.worker}: {what} ({time.strftime('%H:%M:%S')}, load "
              f"{os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)

    progress("warmed up")
    prefill, decode, tokens = [], [], []
    for _ in range(runs):
        p, d, tokens = probe.lm_timing(prompt)
        prefill.append(p)
        decode.append(d)
    ttfa_prompt, ttfa_again, ttfa_spk, chunk_s = [], [], [], []
    for run in range(runs):
        # a recording the engine has not seen (one sample moved by 1e-6: its prompt cache,
        # tts_core/cosyvoice2/prompt_cache.py, keys recordings by content), then the usual one,
        # sent again as clients of the reference service do
        new = Audio(prompt.samples.copy(), prompt.sample_rate)
        new.samples[0] += 1e-6 * (run + 1)
        t, seconds = first_chunk(probe, probe.request(new, True, False))
        ttfa_prompt.append(t)
        chunk_s.append(seconds)
        ttfa_again.append(first_chunk(probe, probe.request(prompt, True, False))[0])
        ttfa_spk.append(first_chunk(probe, probe.request(prompt, True, True))[0])
    progress("LM and first-audio runs done")
    full_runs = args.full_runs or runs
    streamed = [whole(probe, probe.request(prompt, True, True)) for _ in range(full_runs)]
    progress("streaming runs done")
    at_once = [whole(probe, probe.request(prompt, False, True)) for _ in range(full_runs)]
    progress("non-streaming runs done")

    med = statistics.median
    result: dict[str, Any] = {
        "config": args.worker, "plan": probe.description,
        "prefill_ms": 1000 * med(prefill), "decode_tps": 1 / med(decode),
        "ttfa_prompt": med(ttfa_prompt), "ttfa_prompt_again": med(ttfa_again),
        "ttfa_registered": med(ttfa_spk),
        "first_chunk_s": med(chunk_s), "audio_s": med(r["audio"] for r in streamed),
        "rtf_stream": med(r["wall"] / r["audio"] for r in streamed),
        "rtf_whole": med(r["wall"] / r["audio"] for r in at_once),
        "stream_over_whole": med(r["wall"] for r in streamed) / med(r["wall"] for r in at_once),
        "stalls": med(r["stalls"] for r in streamed),
        "stall_s": med(r["waited"] for r in streamed),
    }
    # the serving runs' peak (the error figures below run whole streams uncapped, in float32 too)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    reference_file = args.reference
    if not reference_file.exists():  # the first configuration is the reference
        torch.save({"tokens": tokens, **probe.reference_data(prompt, tokens)}, reference_file)
        result.update(logp_err=0.0, top1=1.0, tv=0.0, mel_l1=0.0, mel_l1_stream=0.0,
                      snr=math.inf)
    else:
        ref = torch.load(reference_file, weights_only=True)
        own = probe.reference_data(prompt, ref["tokens"])
        top = ref["logp"].topk(TOP_CANDIDATES, dim=-1).indices
        err = (own["logp"].gather(1, top) - ref["logp"].gather(1, top)).abs().max()
        agree = (own["logp"].argmax(-1) == ref["logp"].argmax(-1)).float().mean()
        mel_l1 = (own["mel"] - ref["mel"]).abs().sum() / ref["mel"].abs().sum()
        mel_l1_stream = ((own["mel_stream"] - ref["mel_stream"]).abs().sum()
                         / ref["mel_stream"].abs().sum())
        n = min(own["wav"].shape[-1], ref["wav"].shape[-1])
        noise = (own["wav"][..., :n] - ref["wav"][..., :n]).pow(2).sum()
        snr = 10 * math.log10(float(ref["wav"][..., :n].pow(2).sum()) / max(float(noise), 1e-30))
        tv = (own["logp"].exp() - ref["logp"].exp()).abs().sum(-1).max() / 2
        result.update(logp_err=float(err), top1=float(agree), tv=float(tv),
                      mel_l1=float(mel_l1), mel_l1_stream=float(mel_l1_stream), snr=snr)
    args.out.write_text(json.dumps(result))


# --------------------------------------------------------------------------- driver

ROWS = [
    ("precision plan", "plan", "{}"),
    ("LM prefill (ms)", "prefill_ms", "{:.0f}"),
    ("LM decode (tokens/s)", "decode_tps", "{:.1f}"),
    ("first audio, prompt audio new (s)", "ttfa_prompt", "{:.2f}"),
    ("first audio, same prompt audio again (s)", "ttfa_prompt_again", "{:.2f}"),
    ("first audio, registered speaker (s)", "ttfa_registered", "{:.2f}"),
    ("first chunk (audio s)", "first_chunk_s", "{:.2f}"),
    ("utterance (audio s)", "audio_s", "{:.2f}"),
    ("RTF streaming", "rtf_stream", "{:.2f}"),
    ("RTF non-streaming", "rtf_whole", "{:.2f}"),
    ("streaming / non-streaming wall", "stream_over_whole", "{:.2f}"),
    ("stalls (count, waited s)", "stalls", None),
    ("peak RSS (MB)", "peak_rss_mb", "{:.0f}"),
    ("LM max abs log-prob error (top-25)", "logp_err", "{:.4f}"),
    ("LM top-1 agreement", "top1", "{:.3f}"),
    ("LM max total variation distance", "tv", "{:.4f}"),
    ("flow mel relative L1, whole", "mel_l1", "{:.4f}"),
    ("flow mel relative L1, streamed chunks", "mel_l1_stream", "{:.4f}"),
    ("wav SNR (dB)", "snr", "{:.1f}"),
]


def print_table(results: list[dict[str, Any]]) -> None:
    header = ["figure"] + [r["config"] for r in results]
    lines = []
    for label, key, fmt in ROWS:
        cells = []
        for r in results:
            if key == "stalls":
                cells.append(f"{r['stalls']:.0f}, {r['stall_s']:.2f}")
            else:
                cells.append(fmt.format(r[key]) if isinstance(r[key], str | int | float) else "-")
        lines.append([label] + cells)
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for line in lines:
        print("| " + " | ".join(line) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--model-dir", type=Path, help="a model directory to benchmark")
    where.add_argument("--generate", type=Path, help="use (or first write) a random full-size "
                       "CosyVoice 2 directory here")
    ap.add_argument("--configs", nargs="+", default=["float32", "auto"],
                    help="precision options, each optionally with /pipeline (LM/vocoder "
                    "pipeline thread), /tN (N torch threads instead of --threads) and "
                    "/nonative (no native kernels), /noflow (none in the flow); the first is "
                    "the error reference")
    ap.add_argument("--tokens", type=int, default=100, help="speech tokens per utterance")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--full-runs", type=int, default=0,
                    help="whole-utterance runs (streaming and not) per configuration "
                    "(default: --runs)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--reference", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate is not None:
        if not (args.generate / "llm.pt").is_file():
            from tts_core.cosyvoice2.testing.make_model_dir import make_model_dir

            make_model_dir(args.generate, "full", seed=0)
        args.model_dir = args.generate
    if args.worker:
        run_config(args)
        return

    print(f"model {args.model_dir} ({engine_family(args.model_dir)}), {args.tokens} tokens, "
          f"{args.threads} threads, {args.runs} runs; load {os.getloadavg()}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        reference = Path(tmp) / "reference.pt"
        for config in args.configs:
            out = Path(tmp) / "result.json"
            command = [sys.executable, __file__, "--model-dir", str(args.model_dir),
                       "--worker", config, "--out", str(out), "--reference", str(reference),
                       "--tokens", str(args.tokens), "--threads", str(args.threads),
                       "--runs", str(args.runs), "--full-runs", str(args.full_runs)]
            started = time.perf_counter()
            subprocess.run(command, check=True)
            results.append(json.loads(out.read_text()))
            print(json.dumps(results[-1]), flush=True)  # each result as soon as it is known
            print(f"{config}: done in {time.perf_counter() - started:.0f} s; load "
                  f"{os.getloadavg()}", flush=True)
    print_table(results)


if __name__ == "__main__":
    main()
