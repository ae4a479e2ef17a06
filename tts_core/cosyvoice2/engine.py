"""The CosyVoice 2 engine: every mode of the model behind ``tts_core.engine.Engine``.

Per request: text → normalised segments (:mod:`text_frontend`) → Qwen2 ids → the LM yields speech
tokens → the token-to-waveform driver (:mod:`token2wav`: flow + HiFT) turns them into 24 kHz audio.
With ``stream=True`` the LM's tokens are fed to a streaming driver as they come and each chunk
the driver emits is yielded at once; with ``stream=False`` each text segment is synthesised whole
and yielded as one chunk.

How each mode conditions the two models (as the reference CosyVoice 2 front end does):

==================  ==========================================  ===============================
mode                LM prompt                                   flow prompt
==================  ==========================================  ===============================
zero_shot           prompt transcript + prompt speech tokens    prompt tokens, mel, embedding
cross_lingual       none (text gets a ``<|lang|>`` tag)          prompt tokens, mel, embedding
instruct            instruction + ``<|endofprompt|>``            prompt tokens, mel, embedding
sft                 a stored speaker, used as zero_shot when it has a transcript, otherwise
                    as cross_lingual (embedding-only presets: embedding, no prompt)
voice_conversion    (no LM: the source speech's tokens)          prompt tokens, mel, embedding
==================  ==========================================  ===============================

Prompts come from request audio or from a stored speaker (``speaker_id``): presets of the model
directory's ``spk2info.pt`` and speakers registered with :meth:`CosyVoice2Engine.register_speaker`,
which persist under ``state_dir``.

Concurrency: requests may run in parallel threads. The modules are shared read-only; each request
owns its KV cache, its streaming driver state and its random generator. With ``max_batch`` > 1
:meth:`synthesize` hands each request to one batch scheduler (:mod:`tts_core.batching`) that steps
all of them together; the caller's thread only waits for its chunks. With ``pipeline`` (off by
default: on 2 cores the two threads slowed first audio about 2x) a streaming request uses two
threads: the LM decodes in one of its own (``_pipelined``) while the request's thread runs the
flow and the vocoder. The caches that outlive a request (LM prefix KV, flow prompt caches of
stored speakers) hand out copies.

Numerics follow the ``precision`` option (:mod:`precision`): float32 is exact, "auto" picks the
fastest plan within the README's tolerances (on CPU without AMX "int8w": weight-only int8 LM),
"int8" (dynamic int8 LM, CPU) is faster still but outside them on the full-size directory.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch

from .. import cancellation, limits
from ..allocator import tune_allocator
from ..engine import (
    Audio,
    Capabilities,
    InvalidRequest,
    Mode,
    Speaker,
    SpeakerExists,
    SynthesisRequest,
    UnknownSpeaker,
    UnsupportedMode,
)
from ..lru import LruCache
from ..memory import DEFAULT_FLOW_CACHE_SHARE, available_memory, format_gib
from ..short_thread import on_short_thread
from .flow import CausalFlow
from .llm import PrefixCache
from .model_dir import CosyVoice2Models, load_model_dir
from .onnx_frontend import (
    PromptAudioError,
    PromptEncoder,
    PromptFeatures,
    check_audio,
)
from .precision import PRECISIONS, resolve_precision
from .prompt_cache import PromptAudioCache, PromptEntry, prompt_key
from .sampling import RasSampler, Sampler
from .speakers import (
    SpeakerError,
    SpeakerProfile,
    SpeakerRegistry,
    preset_from_spk2info,
)
from .text_frontend import TextFrontend, detect_language
from .token2wav import StreamSchedule, Token2Wav
from .tokenizer import ENDOFPROMPT

log = logging.getLogger(__name__)

NO_PRESETS = ("this model directory ships no preset speakers (CosyVoice2-0.5B has none): "
              "register one with RegisterSpeaker or use zero_shot")


@dataclass(frozen=True)
class _Randomness:
    """Per-request random generators (CPU): LM sampling and vocoder excitation."""

    sampler: torch.Generator
    vocoder: torch.Generator


@dataclass(frozen=True)
class _Voice:
    """Resolved conditioning of one request (tensors on the model device)."""

    lm_prompt_text_ids: list[int]
    lm_prompt_tokens: list[int]
    flow_prompt_tokens: torch.Tensor  # [1, P] int32
    flow_prompt_feat: torch.Tensor  # [1, ratio·P, 80]
    embedding: torch.Tensor  # [1, 192]
    tag_language: bool  # cross-lingual: prefix the text with its <|lang|> tag
    stored: bool = False  # a preset or registered speaker: its LM prefix KV may be cached
    speaker: SpeakerProfile | None = None  # the stored speaker the flow prompt comes from
    prompt: PromptEntry | None = None  # or the request's prompt audio, as the engine keeps it


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda[:N]")
    return device


def _precision_name(precision: str, dtype: str | None) -> str:
    """The precision option; ``dtype`` (float32 / float16 / bfloat16) is the older spelling."""
    if dtype is None:
        return precision
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
    if precision not in ("auto", dtype):
        raise ValueError(f"dtype {dtype!r} contradicts precision {precision!r}; give only "
                         "precision")
    return dtype


# The reference starts streaming after chunk_size (25) tokens plus padding of the prompt to a
# multiple of 25, about 0.84 s of audio before the first byte. Ten tokens (0.4 s of speech) cut
# that latency by more than half; scripts/bench_cv2_stream_quality.py measured no extra
# difference from one-shot output on the parity model compared with the reference schedule.
DEFAULT_FIRST_CHUNK_TOKENS = 10

# Flow prompt caches kept in memory: the prompt's share of the flow (its attention keys/values for
# every Euler step and CFG row, about 2.3 MB per prompt mel frame at the official size in
# float32: 0.47 GB for a 3.5 s prompt, half that in bfloat16) of stored speakers, and of prompt
# recordings sent more than once. Kept by content, so a stored speaker and requests sending the
# recording it was made from share one. At most this many and this many bytes, least recently
# used dropped first; a prompt whose cache alone is larger is not kept (its streams compute
# their prompt share themselves, with the same audio).
FLOW_PROMPT_CACHES = 4
FLOW_PROMPT_CACHE_BYTES = 2 << 30

# Prompt recordings sent with requests whose features are kept by content (prompt_cache.py); one
# sent a second time also gets a flow prompt cache (FLOW_PROMPT_CACHES).
PROMPT_AUDIO_CACHES = 2

# Streaming: drop the start of the flow's prompt (at most chunk_size - 1 tokens, under 1 s) so
# that it ends just past an attention chunk (its look-ahead). A prompt's unfinished last chunk
# is computed again by every stream's first chunk, so this shrinks the first chunk's flow work:
# for a registered speaker with a 3.5 s prompt (87 tokens), 26 mel frames instead of 44. The
# LM keeps the whole prompt; the flow is conditioned on the prompt's last seconds.
STREAM_ALIGN_FLOW_PROMPT = True

# Memory budget of one stream's flow cache (same size: 2.3 MB per mel frame in float32). 3.5 GiB
# holds about 32 s of prompt and speech in float32; a longer segment goes on without the cache,
# one Euler step at a time (bit-identical, recomputing the segment on every chunk) rather than
# growing it.
FLOW_STREAM_CACHE_BYTES = 7 << 29

# Speech tokens of the stream the service runs once before serving (CosyVoice2Engine.warm_up):
# 10 s of audio, so a stream meets the first chunks' lengths and a few full ones.
WARM_UP_TOKENS = 250

# Streamed text is normalised (and tokenised) up to its last word or clause boundary; text
# without one (CJK without punctuation) is flushed once it is this long.
_STREAM_BOUNDARY = re.compile(r".*[\s，。！？；：、,.!?;:…]", re.S)
_STREAM_FLUSH_CHARS = 16


def align_stream_prompt(tokens: torch.Tensor, feat: torch.Tensor, chunk: int, lookahead: int,
                        ratio: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The flow prompt (tokens [1, P], feat [1, ratio·P, 80]) with its first
    (P - lookahead) % chunk tokens (and their frames) dropped, so that all of it but the
    look-ahead lies in finished chunks; unchanged when shorter than one chunk plus look-ahead
    or when feat is not ratio·P frames."""
    length = tokens.shape[1]
    drop = (length - lookahead) % chunk
    if not drop or length - drop < chunk + lookahead or feat.shape[1] != ratio * length:
        return tokens, feat
    return tokens[:, drop:].contiguous(), feat[:, ratio * drop:].contiguous()


def default_schedule(chunk_size: int,
                     first_chunk_tokens: int = DEFAULT_FIRST_CHUNK_TOKENS) -> StreamSchedule:
    """Our streaming schedule: a small first chunk, then the reference's doubling up to 4x.

    The reference pads the first chunk so that prompt + chunk ends on a boundary of the flow's
    attention chunks (``chunk_size``); later hops then end on boundaries too. That only holds
    for first chunks of whole attention chunks; for others the padding would just add latency.
    """
    aligned = first_chunk_tokens % chunk_size == 0
    # With the flow's stream cache nothing of the past is computed again, provided the last
    # call keeps chunk attention (the reference switches to full attention there, recomputing
    # the whole utterance) and chunks after the first end on attention chunks (an unfinished
    # one is computed again by the next chunk); the first chunk stays short for latency.
    return StreamSchedule(first_hop=first_chunk_tokens, growth=2.0,
                          max_hop=max(4 * chunk_size, first_chunk_tokens),
                          prompt_align=chunk_size if aligned else 0,
                          full_attention_final=False, hop_align=chunk_size)


def flow_prompt_cache_store(max_bytes: int = FLOW_PROMPT_CACHE_BYTES) -> LruCache[str, Any]:
    """An engine's flow prompt caches by :func:`flow_prompt_key` (FLOW_PROMPT_CACHES)."""
    return LruCache(FLOW_PROMPT_CACHES, max_bytes, size=lambda cache: cache.nbytes())


def flow_prompt_key(voice: _Voice) -> str:
    """sha256 of what the flow's prompt share is computed from (the prompt's speech tokens and
    mel, the speaker embedding): the same content, the same flow prompt cache."""
    digest = hashlib.sha256()
    for t in (voice.flow_prompt_tokens, voice.flow_prompt_feat, voice.embedding):
        t = t.detach().cpu().contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class CosyVoice2Engine:
    """CosyVoice 2 synthesis engine (see the module docstring for the modes).

    The CosyVoice 3 engine extends this class; what differs between the two is confined to the
    class attributes below and the small ``_lm_*`` / ``_make_token2wav`` hooks.
    """

    name = "cosyvoice2"
    display_name = "CosyVoice 2"
    speaker_features = "cosyvoice2"  # tag of registered speakers' features (speakers.py)
    uses_language_tags = True  # cross-lingual text gets a <|lang|> tag
    load_models = staticmethod(load_model_dir)

    def __init__(self, models: CosyVoice2Models, state_dir: Path | None = None,
                 seed: int | None = None, schedule: StreamSchedule | None = None,
                 max_batch: int = 1, pipeline: bool = False,
                 prefix_cache_size: int = 32, flow_cache_memory: int | None = None,
                 concurrent_streams: int | None = None,
                 flow_cache_share: float = DEFAULT_FLOW_CACHE_SHARE) -> None:
        if models.tokenizer is None or models.onnx is None:
            raise ValueError("the engine needs the tokenizer and the ONNX front end "
                             "(load the model directory with require_frontend=True)")
        self.models = models
        self.tokenizer = models.tokenizer
        self.seed = seed  # None: every request draws a fresh random seed
        self.text = TextFrontend(lambda s: len(self.tokenizer.encode(s)),
                                 markers=self.tokenizer.SPECIAL_TOKENS)
        self.prompts = PromptEncoder(models.onnx, models.mel_config, models.token_mel_ratio)
        # Requests streaming at once: the batch, or the caller's admission (the server's
        # --max-concurrent without a scheduler); each holds one flow stream cache.
        streams = max(1, max_batch, concurrent_streams or 1)
        self.flow_cache_bytes = self._flow_cache_budget(flow_cache_memory, streams,
                                                        flow_cache_share)
        self.token2wav = self._make_token2wav(schedule or default_schedule(models.chunk_size),
                                              self.flow_cache_bytes)
        presets = {}
        for name, entry in models.spk2info.items():
            try:
                presets[name] = _preset(name, entry, models.flow.config.output_size)
            except SpeakerError as error:
                log.warning("ignoring preset speaker: %s", error)
        self.registry = SpeakerRegistry(state_dir, presets, features=self.speaker_features)
        # max_batch > 1: one scheduler thread steps all requests together (tts_core.batching);
        # 1: each request runs on its caller's thread, as before.
        self.max_batch = max_batch
        self.scheduler = None
        if max_batch > 1:
            from ..batching.cosyvoice2_job import make_scheduler

            # A GPU step costs its calls' launches more than their width: batch wide there.
            self.scheduler = make_scheduler(models.lm, max_batch,
                                            wide=models.device.type == "cuda")
        # Streaming: the LM decodes in a thread of its own while the request's thread runs the
        # flow and the vocoder on the tokens it has (see _pipelined).
        self.pipeline = pipeline
        # KV of sos + prompt text of stored speakers, reused across their requests. Every
        # request computes its prefix as a step of its own (a prompt in the request through a
        # cache that keeps nothing), so a stored speaker gives exactly the audio of its prompt
        # whether the prefix came from the cache or not, in every precision (dynamic int8
        # scales activations per call, so how rows are grouped into calls matters there).
        self.prefix_cache = PrefixCache(prefix_cache_size)
        self._uncached_prefix = PrefixCache(0)
        # flow prompt content (flow_prompt_key) -> its flow prompt cache; see FLOW_PROMPT_CACHES
        self.flow_prompt_caches = flow_prompt_cache_store()
        self._flow_prompt_build = threading.Lock()
        self.prompt_audio = PromptAudioCache(PROMPT_AUDIO_CACHES)

    def _make_token2wav(self, schedule: StreamSchedule, flow_cache_bytes: int) -> Token2Wav:
        return Token2Wav(self.models.flow, self.models.hift,
                         token_mel_ratio=self.models.token_mel_ratio, schedule=schedule,
                         flow_cache_bytes=flow_cache_bytes)

    # Memory a stream's flow cache holds per byte of its budget: its keys/values live in a
    # block with room for exactly its budget (kv_arena), of which it touches only the rows it
    # writes, so N budgets of total / N hold at most total. (Grown buffer by buffer, they took
    # up to half as much again: with 8 streams on 24 GB each stream then had room for under
    # 7 s of prompt and speech, and a longer one went on recomputing.)
    _flow_cache_slack = 1.0

    def _flow_cache_frame_bytes(self) -> int | None:
        """Bytes of a stream's flow cache per mel frame (None: the flow keeps none)."""
        flow = self.models.flow
        if not getattr(flow, "supports_chunk_streaming", False):
            return None
        return int(flow.stream_cache_bytes_per_frame(self.models.dtype))

    def _flow_cache_limit(self, frame_bytes: int) -> int:
        """The most one stream's flow cache may count, bytes (whatever the total)."""
        return FLOW_STREAM_CACHE_BYTES

    def _flow_cache_budget(self, total: int | None, streams: int,
                           share: float = DEFAULT_FLOW_CACHE_SHARE) -> int:
        """One stream's flow cache budget (bytes its frames may count) such that ``streams``
        streams at once hold at most ``total`` bytes (None: ``share`` of the memory free now,
        or the per-stream limit when that cannot be read); logged once."""
        if total is not None and total < 0:
            raise ValueError(f"flow_cache_memory must be >= 0 bytes, got {total}")
        if not 0 < share <= 1:
            raise ValueError(f"flow_cache_share must be in (0, 1], got {share}")
        frame_bytes = self._flow_cache_frame_bytes()
        if frame_bytes is None:  # nothing to share
            return FLOW_STREAM_CACHE_BYTES
        limit = self._flow_cache_limit(frame_bytes)
        ceiling = int(limit * self._flow_cache_slack) * streams  # every stream at its limit
        source = "--flow-cache-memory"
        if total is None:
            free = available_memory(str(self.models.device))
            total = ceiling if free is None else int(free * share)
            source = ("free memory unknown: the per-stream limit" if free is None else
                      f"default: {share:.0%} of the {format_gib(free)} free "
                      f"on {self.models.device} at start")
        budget = min(limit, int(total // streams / self._flow_cache_slack))
        mel = self.models.mel_config
        seconds = budget // frame_bytes * mel.hop_size / mel.sampling_rate
        log.info("flow stream caches: %s for %d concurrent streams (%s): %s per stream, %.1f s "
                 "of prompt + speech each; a longer segment goes on recomputing (same audio, "
                 "slower)", format_gib(min(total, ceiling)), streams, source, format_gib(budget),
                 seconds)
        return budget

    @classmethod
    def from_model_dir(cls, path: Path, threads: int | None = None, device: str = "auto",
                       state_dir: Path | None = None, dtype: str | None = None,
                       seed: int | None = None, first_chunk_tokens: int | None = None,
                       precision: str = "auto", max_batch: int = 1, pipeline: bool = False,
                       prefix_cache_size: int = 32, flow_cache_memory: int | None = None,
                       concurrent_streams: int | None = None,
                       flow_cache_share: float = DEFAULT_FLOW_CACHE_SHARE) -> Self:
        """Load ``path`` (an official CosyVoice2-0.5B directory or one in the same layout).

        threads: torch intra-op threads (None: torch's default); device: "auto" (CUDA when
        available), "cpu" or "cuda[:N]"; state_dir: where registered speakers persist (None:
        they live in memory only); precision: one of ``PRECISIONS`` (see :mod:`precision`;
        "float32" is the exact path, "auto" the fastest within the README's tolerances); dtype:
        the older spelling of precision (float32 / float16 / bfloat16); first_chunk_tokens:
        speech tokens in the first streamed chunk (None: the default below); max_batch: requests
        decoded together by the batch scheduler (1: no scheduler); pipeline: decode in a thread
        of its own while streamed chunks are vocoded; prefix_cache_size: stored speakers whose
        LM prefix KV is kept (0: none); flow_cache_memory: bytes the flow stream caches of all
        concurrent streams may hold together (None: ``flow_cache_share`` of the memory free
        after loading, default DEFAULT_FLOW_CACHE_SHARE); concurrent_streams: requests the
        caller lets run at once (None: max_batch), which share it.
        """
        device = _resolve_device(device)
        name = _precision_name(precision, dtype)
        if name not in PRECISIONS:
            raise ValueError(f"unknown precision {name!r}; use one of {', '.join(PRECISIONS)}")
        plan = resolve_precision(name, device)
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)
        tune_allocator()  # freed memory is reused, not faulted in again (see allocator.py)
        started = time.perf_counter()
        models = on_short_thread(cls.load_models, Path(path), device=device, precision=plan,
                                 onnx_threads=min(threads or 1, 4))
        log.info("loaded %s model directory %s on %s (precision %s: LM %s, flow %s) in %.1f s",
                 cls.display_name, path, device, plan.name, plan.lm_description, plan.flow_dtype,
                 time.perf_counter() - started)
        schedule = None
        if first_chunk_tokens is not None:
            schedule = default_schedule(models.chunk_size, first_chunk_tokens)
        return cls(models, state_dir=state_dir, seed=seed, schedule=schedule,
                   max_batch=max_batch, pipeline=pipeline, prefix_cache_size=prefix_cache_size,
                   flow_cache_memory=flow_cache_memory, concurrent_streams=concurrent_streams,
                   flow_cache_share=flow_cache_share)

    # ------------------------------------------------------------------ Engine protocol

    @property
    def sample_rate(self) -> int:
        return self.models.sample_rate

    def capabilities(self) -> Capabilities:
        modes = set(Mode)
        reasons: dict[Mode, str] = {}
        if len(self.registry) == 0:
            modes.discard(Mode.SFT)
            reasons[Mode.SFT] = NO_PRESETS
        return Capabilities(engine=self.name, sample_rate=self.sample_rate,
                            modes=frozenset(modes), unsupported_reasons=reasons,
                            supports_speaker_registration=True,
                            supports_text_streaming=True)

    def speakers(self) -> list[Speaker]:
        return [profile.to_speaker() for profile in self.registry.all()]

    def validate(self, request: SynthesisRequest) -> None:
        """Raise an EngineError if the request cannot be served (cheap: no model runs)."""
        self._validate(request, streamed_text=False)

    def validate_text_stream(self, request: SynthesisRequest) -> None:
        """``validate`` for :meth:`synthesize_text_stream` (the text arrives later)."""
        if request.mode is Mode.VOICE_CONVERSION:
            raise UnsupportedMode("voice_conversion takes source audio, not streamed text")
        self._validate(request, streamed_text=True)

    def synthesize(self, request: SynthesisRequest, cancel: threading.Event
                   ) -> Iterator[np.ndarray]:
        """Yield float32 mono chunks at :attr:`sample_rate`."""
        self.validate(request)
        randomness = self._randomness()
        if request.mode is Mode.VOICE_CONVERSION:
            yield from self._voice_conversion(request, cancel, randomness)
            return
        segments = self.text.segments(request.text)
        if not segments:
            raise InvalidRequest("the text has nothing to speak (only punctuation or spaces)")
        voice = self._voice(request)
        if voice.tag_language:
            segments = [self.text.tag_language(s) for s in segments]
        if self.scheduler is not None:
            yield from self._batched(request, cancel, randomness, voice,
                                     [self.tokenizer.encode(s) for s in segments])
            return
        for segment in segments:
            if cancel.is_set():
                return
            text_ids = self.tokenizer.encode(segment)
            tokens = self._lm_tokens(self.models.lm.inference(
                text_ids, voice.lm_prompt_text_ids, voice.lm_prompt_tokens,
                self._sampler(randomness), cancel=cancel,
                prefix_cache=self.prefix_cache if voice.stored else self._uncached_prefix))
            yield from self._vocode(tokens, voice, request, cancel, randomness)

    # ------------------------------------------------------------------ extras

    def synthesize_text_stream(self, request: SynthesisRequest, text_pieces: Iterable[str],
                               cancel: threading.Event) -> Iterator[np.ndarray]:
        """Bidirectional streaming: speak text while it is still arriving.

        ``request`` gives the mode and voice as for :meth:`synthesize` (its ``text`` is
        ignored); ``text_pieces`` yields the text bit by bit (e.g. from an LLM). The LM interleaves
        5 text tokens with 15 speech tokens, so audio starts after the first few words. Pieces
        are normalised at word boundaries (a number split across pieces is read whole).
        """
        self.validate_text_stream(request)
        randomness = self._randomness()
        voice = self._voice(request)
        chunks = self._text_id_chunks(text_pieces, voice, cancel)
        tokens = self._lm_tokens(self.models.lm.inference_bistream(
            chunks, voice.lm_prompt_text_ids, voice.lm_prompt_tokens,
            self._sampler(randomness), cancel=cancel))
        yield from self._vocode(tokens, voice, request, cancel, randomness)

    def register_speaker(self, speaker_id: str, prompt: Audio, prompt_text: str = "",
                         language: str | None = None, description: str = "",
                         replace: bool = False) -> Speaker:
        """Compute a prompt's features once and store them under ``speaker_id``.

        With ``prompt_text`` (the transcript of the prompt) the speaker serves zero_shot and sft
        like a prompt would; without it, it serves cross_lingual, instruct and voice
        conversion (and sft, as cross_lingual). Persists under ``state_dir`` when one was given.
        """
        limits.check_registration(speaker_id, prompt_text, language, description)
        if self.registry.is_preset(speaker_id):
            raise SpeakerExists(f"speaker id {speaker_id!r} is already taken by a preset "
                                "speaker of the model; choose another id")
        if self.registry.get(speaker_id) is not None and not replace:
            raise SpeakerExists(f"speaker id {speaker_id!r} is already taken (already "
                                "registered); choose another id, or set replace to overwrite it")
        other = self.registry.foreign_features(speaker_id)
        if other is not None and not replace:
            raise SpeakerExists(f"speaker id {speaker_id!r} is taken by a voice registered with "
                                f"{other} features, which the {self.name} engine cannot use; "
                                "set replace to register it again, or choose another id")
        features = self._encode_prompt(prompt)
        text = self._normalize_prompt_text(prompt_text) if prompt_text.strip() else ""
        profile = SpeakerProfile(
            id=speaker_id, embedding=features.embedding, speech_tokens=features.speech_tokens,
            speech_feat=features.speech_feat, prompt_text=text,
            language=language or (detect_language(text) if text else "und"),
            description=description, registered=True, created=time.time())
        try:
            self.registry.add(profile, replace=replace)
        except SpeakerError as error:
            raise InvalidRequest(str(error)) from error
        if profile.has_prompt_audio:  # the prompt's share of the flow, once for all requests
            self._speaker_flow_cache(self._profile_stream_voice(profile))
        return profile.to_speaker()

    def _profile_stream_voice(self, profile: SpeakerProfile) -> _Voice:
        """A stored speaker's voice as its streams condition the flow on it."""
        device = self.models.device
        return self._stream_voice(_Voice(
            lm_prompt_text_ids=[], lm_prompt_tokens=[],
            flow_prompt_tokens=profile.speech_tokens.to(device),
            flow_prompt_feat=profile.speech_feat.to(device),
            embedding=profile.embedding.to(device), tag_language=False, speaker=profile))

    def flow_prompt_cache_of(self, speaker_id: str) -> Any:
        """The kept flow prompt cache of a stored speaker, or None (tests, diagnostics)."""
        profile = self.registry.get(speaker_id)
        if profile is None or not profile.has_prompt_audio:
            return None
        return self.flow_prompt_caches.peek(flow_prompt_key(self._profile_stream_voice(profile)))

    def delete_speaker(self, speaker_id: str) -> None:
        """Forget a registered speaker (and its files, and its flow prompt cache). Presets
        cannot be deleted."""
        profile = self.registry.get(speaker_id)
        if profile is not None and profile.has_prompt_audio:
            self.flow_prompt_caches.pop(flow_prompt_key(self._profile_stream_voice(profile)))
        try:
            self.registry.delete(speaker_id)
        except KeyError:
            raise UnknownSpeaker(f"no registered speaker {speaker_id!r}") from None
        except SpeakerError as error:
            raise InvalidRequest(str(error)) from error

    # ------------------------------------------------------------------ validation

    def _validate(self, request: SynthesisRequest, streamed_text: bool) -> None:
        limits.check_request(request, streamed_text=streamed_text)
        mode = request.mode
        if mode is Mode.SFT and len(self.registry) == 0:
            raise UnsupportedMode(NO_PRESETS)
        profile = None
        if request.speaker_id:
            profile = self.registry.get(request.speaker_id)
            features = self.registry.foreign_features(request.speaker_id)
            if profile is None and features is not None:
                raise UnknownSpeaker(
                    f"speaker {request.speaker_id!r} was registered with {features} features "
                    f"(speech tokens and mel of another model), which the {self.name} engine "
                    "cannot use: register the voice again (same id with replace=true)")
            if profile is None:
                known = ", ".join(p.id for p in self.registry.all()[:10]) or "none"
                raise UnknownSpeaker(f"unknown speaker {request.speaker_id!r} (known: {known})")
        if request.prompt is not None:
            self._check_audio(request.prompt, "prompt", limits.MIN_PROMPT_SECONDS)
        if mode is Mode.SFT:
            if profile is None:
                raise InvalidRequest("sft needs speaker_id: one of the preset or registered "
                                     "speakers (see ListSpeakers)")
            return
        has_voice = request.prompt is not None or (profile is not None
                                                   and profile.has_prompt_audio)
        if profile is not None and not profile.has_prompt_audio and request.prompt is None:
            raise InvalidRequest(f"speaker {profile.id!r} has no prompt audio; {mode.value} "
                                 "needs prompt audio or a registered speaker")
        if not has_voice:
            raise InvalidRequest(f"{mode.value} needs prompt audio (or the speaker_id of a "
                                 "registered speaker)")
        if mode is Mode.ZERO_SHOT:
            if request.prompt is None and profile is not None and not profile.has_transcript:
                raise InvalidRequest(f"speaker {profile.id!r} was registered without a "
                                     "transcript; use cross_lingual or instruct with it")
        elif mode is Mode.VOICE_CONVERSION:
            if request.source is None:
                raise InvalidRequest("voice_conversion needs source audio (the speech to "
                                     "re-voice)")
            self._check_audio(request.source, "source", limits.MIN_SOURCE_SECONDS)

    @staticmethod
    def _check_audio(audio: Audio, what: str, min_seconds: float) -> None:
        try:
            check_audio(audio.samples, audio.sample_rate, what, min_seconds=min_seconds,
                        max_seconds=limits.MAX_PROMPT_SECONDS)
        except PromptAudioError as error:
            raise InvalidRequest(str(error)) from error

    # ------------------------------------------------------------------ conditioning

    def _randomness(self) -> _Randomness:
        seed = self.seed if self.seed is not None else secrets.randbits(62)
        # Separate streams, so the vocoder's draws never shift the LM's: a seed gives the same
        # speech tokens whether the request streams or not.
        return _Randomness(torch.Generator().manual_seed(seed),
                           torch.Generator().manual_seed(seed + 1))

    def _sampler(self, randomness: _Randomness) -> Sampler:
        return RasSampler(self.models.sampling, self.models.lm.config.speech_token_size,
                          randomness.sampler)

    def _encode_prompt(self, audio: Audio) -> PromptFeatures:
        try:
            return on_short_thread(self.prompts.encode, audio.samples, audio.sample_rate)
        except PromptAudioError as error:
            raise InvalidRequest(str(error)) from error

    def _prompt_entry(self, audio: Audio) -> PromptEntry:
        """The request's prompt recording, encoded, from the prompt cache or now."""
        key = prompt_key(audio.samples, audio.sample_rate)
        entry = self.prompt_audio.get(key)
        if entry is None:
            entry = self.prompt_audio.add(key, self._encode_prompt(audio))
        return entry

    def _normalize_prompt_text(self, text: str) -> str:
        return self.text.normalize(text)

    def _voice(self, request: SynthesisRequest) -> _Voice:
        mode = request.mode
        profile = self.registry.get(request.speaker_id) if request.speaker_id else None
        device = self.models.device
        prompt = None
        if request.prompt is not None:
            prompt = self._prompt_entry(request.prompt)
            features = prompt.features
            embedding, tokens, feat = (features.embedding, features.speech_tokens,
                                       features.speech_feat)
            transcript_ids = (self.tokenizer.encode(self._normalize_prompt_text(
                request.prompt_text)) if request.prompt_text.strip() else [])
        else:
            assert profile is not None  # validate() guarantees a voice
            embedding, tokens, feat = profile.embedding, profile.speech_tokens, profile.speech_feat
            if profile.prompt_text_ids:
                transcript_ids = list(profile.prompt_text_ids)
            else:
                transcript_ids = (self.tokenizer.encode(profile.prompt_text)
                                  if profile.prompt_text else [])

        use_transcript = mode is Mode.ZERO_SHOT or (mode is Mode.SFT and bool(transcript_ids))
        if mode is Mode.INSTRUCT:
            lm_text = self.tokenizer.encode(self._lm_instruction(request.instruct_text))
            lm_tokens: list[int] = []
        elif use_transcript and tokens.shape[1] > 0:
            lm_text, lm_tokens = self._lm_transcript_ids(transcript_ids), tokens.flatten().tolist()
        else:
            lm_text, lm_tokens = self._lm_no_prompt_ids(), []
        tag = self.uses_language_tags and (
            mode is Mode.CROSS_LINGUAL or (mode is Mode.SFT and not lm_text))
        return _Voice(speaker=profile if request.prompt is None else None, prompt=prompt,
                      lm_prompt_text_ids=lm_text, lm_prompt_tokens=lm_tokens,
                      flow_prompt_tokens=tokens.to(device), flow_prompt_feat=feat.to(device),
                      embedding=embedding.to(device), tag_language=tag,
                      stored=request.prompt is None and mode is not Mode.INSTRUCT)

    # Hooks where the CosyVoice 3 engine differs: the LM prompt layout and the LM's tokens.

    def _lm_instruction(self, instruct_text: str) -> str:
        """The LM prompt text of instruct mode."""
        instruction = self.text.normalize(instruct_text)
        return instruction if instruction.endswith(ENDOFPROMPT) else instruction + ENDOFPROMPT

    def _lm_transcript_ids(self, transcript_ids: list[int]) -> list[int]:
        """The LM prompt text ids when the prompt's transcript is used (zero-shot)."""
        return transcript_ids

    def _lm_no_prompt_ids(self) -> list[int]:
        """The LM prompt text ids without a transcript (cross-lingual)."""
        return []

    def _lm_tokens(self, tokens: Iterator[int]) -> Iterable[int]:
        """The LM's speech tokens as they go on to the vocoder."""
        return tokens

    # The same choice one token at a time, for the batch scheduler: None keeps every token,
    # else a factory of one predicate per segment (see CosyVoice2Job).
    _vocoder_token_filter: Callable[[], Callable[[int], bool]] | None = None

    def _text_id_chunks(self, pieces: Iterable[str], voice: _Voice, cancel: threading.Event
                        ) -> Iterator[list[int]]:
        """Normalised token ids of streamed text, emitted up to the last word boundary.

        The whitespace after a boundary stays in the buffer and goes with the next word: Qwen2's
        BPE spells a word with its leading space (" world"), so cutting after the space would
        give a lone space token and a word the model never saw that way in whole texts.
        """
        buffer = ""
        first = True
        for piece in pieces:
            if cancel.is_set():
                return
            if not isinstance(piece, str):
                raise InvalidRequest("streamed text pieces must be strings")
            buffer += piece
            match = _STREAM_BOUNDARY.match(buffer)
            # CJK text has no spaces: flush at punctuation, or once it gets long
            if match is None and len(buffer) < _STREAM_FLUSH_CHARS:
                continue
            ready = buffer[:match.end() if match else len(buffer)].rstrip()
            buffer = buffer[len(ready):]
            ids = self._piece_ids(ready, voice, first, complete=False)
            if ids:
                first = False
                yield ids
        if buffer.strip():
            ids = self._piece_ids(buffer.rstrip(), voice, first, complete=True)
            if ids:
                yield ids

    def _piece_ids(self, text: str, voice: _Voice, first: bool, complete: bool) -> list[int]:
        spoken = self.text.normalize(text, complete=complete)
        if not spoken:
            return []
        if first and voice.tag_language:
            spoken = self.text.tag_language(spoken)
        lead = " " if text[:1].isspace() and not first else ""
        return self.tokenizer.encode(lead + spoken)

    # ------------------------------------------------------------------ waveform

    def _vocode(self, tokens: Iterable[int], voice: _Voice, request: SynthesisRequest,
                cancel: threading.Event, randomness: _Randomness) -> Iterator[np.ndarray]:
        if request.stream and request.speed == 1.0:
            voice = self._stream_voice(voice)
            stream = self.token2wav.start_stream(
                voice.flow_prompt_tokens, voice.flow_prompt_feat, voice.embedding,
                generator=randomness.vocoder, cancel=cancel,
                prompt_cache=self._speaker_flow_cache(voice))
            batches = _pipelined(tokens, cancel) if self.pipeline else ([t] for t in tokens)
            for batch in batches:
                for chunk in stream.push(batch):
                    if chunk.shape[-1]:
                        yield _to_numpy(chunk)
                if stream.cancelled:
                    return
            if cancel.is_set():
                return
            last = stream.finish()
            if last.shape[-1]:
                yield _to_numpy(last)
            return
        # Whole segment at once (also when the speed changes: the mel is stretched in one go).
        collected = list(tokens)
        if cancel.is_set() or not collected:
            return
        token = torch.tensor([collected], dtype=torch.int32, device=self.models.device)
        try:
            with cancellation.watching(cancel):  # the model's loops stop within one step
                wav = self.token2wav.synthesize(
                    token, voice.flow_prompt_tokens, voice.flow_prompt_feat, voice.embedding,
                    speed=request.speed, generator=randomness.vocoder)
        except cancellation.Cancelled:
            return
        if wav.shape[-1]:
            yield _to_numpy(wav)

    def _stream_voice(self, voice: _Voice) -> _Voice:
        """The voice as streams condition the flow on it (STREAM_ALIGN_FLOW_PROMPT)."""
        flow = self.models.flow
        if not STREAM_ALIGN_FLOW_PROMPT or not self.token2wav.caches_streams \
                or not isinstance(flow, CausalFlow):
            return voice
        config = flow.config
        tokens, feat = align_stream_prompt(
            voice.flow_prompt_tokens, voice.flow_prompt_feat, config.encoder.static_chunk_size,
            config.pre_lookahead_len, config.token_mel_ratio)
        if tokens is voice.flow_prompt_tokens:
            return voice
        return replace(voice, flow_prompt_tokens=tokens, flow_prompt_feat=feat)

    def _speaker_flow_cache(self, voice: _Voice) -> Any:
        """The flow prompt cache of the voice's prompt: a stored speaker's (built on first
        use), or a request's prompt recording's from its second time on (None the first time:
        the stream then computes the prompt's share itself, as it would without the cache).
        Kept by content (FLOW_PROMPT_CACHES): a replaced speaker's new recording is a new
        entry, and its old one is never used again."""
        if not self.token2wav.caches_streams or FLOW_PROMPT_CACHES < 1:
            return None
        if voice.prompt is not None:
            if not voice.prompt.repeated:
                return None
        elif voice.speaker is None:
            return None
        key = flow_prompt_key(voice)
        cache = self.flow_prompt_caches.get(key)
        if cache is None:
            with self._flow_prompt_build:  # a second request of the same prompt waits
                cache = self.flow_prompt_caches.get(key)
                if cache is None:
                    cache = on_short_thread(self.token2wav.prompt_cache, voice.flow_prompt_tokens,
                                            voice.flow_prompt_feat, voice.embedding)
                    self.flow_prompt_caches.put(key, cache)
        return cache

    def _voice_conversion(self, request: SynthesisRequest, cancel: threading.Event,
                          randomness: _Randomness) -> Iterator[np.ndarray]:
        assert request.source is not None
        voice = self._voice(request)
        try:
            source = self.prompts.source_tokens(request.source.samples,
                                                request.source.sample_rate)
        except PromptAudioError as error:
            raise InvalidRequest(str(error)) from error
        if cancel.is_set():
            return
        if self.scheduler is not None:
            yield from self._batched(request, cancel, randomness, voice, [],
                                     tokens=[source.flatten().tolist()])
            return
        yield from self._vocode(source.flatten().tolist(), voice, request, cancel, randomness)

    def _batched(self, request: SynthesisRequest, cancel: threading.Event,
                 randomness: _Randomness, voice: _Voice, segments: list[list[int]],
                 tokens: list[list[int]] | None = None) -> Iterator[np.ndarray]:
        """Run the request as a job of the batch scheduler and yield its chunks."""
        from ..batching.cosyvoice2_job import CosyVoice2Job

        assert self.scheduler is not None
        prompt_cache = None
        if request.stream and request.speed == 1.0:
            voice = self._stream_voice(voice)
            prompt_cache = self._speaker_flow_cache(voice)
        job = CosyVoice2Job(self.models.lm, self.token2wav, voice, segments,
                            lambda: self._sampler(randomness), randomness.vocoder, cancel,
                            stream=request.stream, speed=request.speed, forced_tokens=tokens,
                            token_filter=self._vocoder_token_filter, prompt_cache=prompt_cache,
                            new_cache=self.scheduler.lm.new_cache)
        self.scheduler.submit(job)
        yield from job.chunks()

    def warm_up(self, tokens: int = WARM_UP_TOKENS) -> float:
        """Stream ``tokens`` random speech tokens through the flow and the vocoder once, with
        no prompt, and drop the audio; returns the seconds it took.

        A process's first stream pays for what later ones find ready: the vocoder's convolution
        kernels, built by oneDNN per new chunk length, and the pages of a flow cache block
        (kv_arena). On the 2-core machine, full-size directory: the first request after loading
        had its first audio after 1.32 s against 0.72 s for the next ones; after this warm-up
        (6.6 s for 250 tokens) it was 0.83 s. Its own random generator: requests' randomness
        and outputs are untouched (the pooled block a later stream reuses holds no state)."""
        started = time.perf_counter()
        device = self.models.device
        flow_config = self.models.flow.config
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, flow_config.vocab_size, (tokens,), generator=generator).tolist()
        stream = self.token2wav.start_stream(
            torch.zeros(1, 0, dtype=torch.int32, device=device),
            torch.zeros(1, 0, flow_config.output_size, device=device),
            torch.zeros(1, flow_config.spk_embed_dim, device=device), generator=generator)
        for token in ids:  # one at a time, as the LM hands them over: the chunks of a stream
            stream.push([token])
        stream.finish()
        seconds = time.perf_counter() - started
        log.info("warmed up the flow and the vocoder on %d tokens in %.1f s", tokens, seconds)
        return seconds

    def batch_occupancy(self) -> tuple[int, int]:
        """(requests in the batch now, max_batch); (0, 1) without a scheduler."""
        if self.scheduler is None:
            return 0, 1
        return self.scheduler.occupancy(), self.max_batch


_DONE = object()


def _pipelined(tokens: Iterable[int], cancel: threading.Event) -> Iterator[list[int]]:
    """Run the token iterator (the LM) in a thread of its own; yield the tokens it has made so
    far, as lists, while the caller vocodes.

    The vocoder then no longer waits for the LM's next tokens nor the LM for the vocoder: each
    keeps one core busy. Tokens and their order are those of the iterator, so the audio is the
    same as in sequence (the stream driver cuts chunks by token count, not by batch). Leaving
    the loop early (cancel, an error, the consumer closing) stops the producer at its next
    token.
    """
    handoff: queue.SimpleQueue[object] = queue.SimpleQueue()
    stop = threading.Event()

    def produce() -> None:
        iterator = iter(tokens)
        try:
            for token in iterator:
                handoff.put(token)
                if stop.is_set() or cancel.is_set():
                    break
        except BaseException as error:  # handed to the consumer, raised there
            handoff.put(error)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
            handoff.put(_DONE)

    producer = threading.Thread(target=produce, name="cosyvoice2-lm", daemon=True)
    producer.start()
    try:
        finished = False
        while not finished:
            batch: list[int] = []
            item = handoff.get()  # wait for at least one token
            while True:
                if item is _DONE:
                    finished = True
                    break
                if isinstance(item, BaseException):
                    raise item
                batch.append(item)  # type: ignore[arg-type]
                try:
                    item = handoff.get_nowait()
                except queue.Empty:
                    break
            if batch:
                yield batch
    finally:
        # Not joined: the producer may be waiting for streamed text; it ends after its
        # current step.
        stop.set()


def _to_numpy(wav: torch.Tensor) -> np.ndarray:
    return wav.detach().float().cpu().numpy().reshape(-1).astype(np.float32, copy=False)


_PRESET_LANGUAGES = {"中文": "zh", "英文": "en", "日语": "ja", "粤语": "yue", "韩语": "ko"}


def _preset(name: str, entry: dict[str, torch.Tensor], n_mels: int) -> SpeakerProfile:
    """A ``spk2info.pt`` speaker; its language is read from the official names (中文女 ...)."""
    language = next((code for word, code in _PRESET_LANGUAGES.items() if word in name), "und")
    return replace(preset_from_spk2info(name, entry, n_mels), language=language)
