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
owns its KV cache, its streaming driver state and its random generator.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..engine import (
    Audio,
    Capabilities,
    InvalidRequest,
    Mode,
    Speaker,
    SynthesisRequest,
    UnknownSpeaker,
    UnsupportedMode,
)
from .model_dir import CosyVoice2Models, load_model_dir
from .onnx_frontend import (
    MAX_PROMPT_SECONDS,
    MIN_PROMPT_SECONDS,
    PromptAudioError,
    PromptEncoder,
    PromptFeatures,
    check_audio,
)
from .sampling import RasSampler
from .speakers import (
    SpeakerError,
    SpeakerProfile,
    SpeakerRegistry,
    preset_from_spk2info,
    validate_speaker_id,
)
from .text_frontend import END_OF_PROMPT, TextFrontend, detect_language
from .token2wav import StreamSchedule, Token2Wav
from .tokenizer import COSYVOICE2_SPECIAL_TOKENS

log = logging.getLogger(__name__)

MAX_TEXT_CHARS = 10_000
MIN_SPEED, MAX_SPEED = 0.5, 2.0
MIN_SOURCE_SECONDS = 0.2
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
    speaker: SpeakerProfile | None = None  # the stored speaker the flow prompt comes from


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda[:N]")
    return device


def _resolve_dtype(device: str, dtype: str | None) -> torch.dtype:
    """float32 on CPU; on CUDA bfloat16 where supported (its range avoids the float16 overflows
    Qwen2 activations are known for), else float16. ``COSYVOICE2_DTYPE`` overrides."""
    name = dtype or os.environ.get("COSYVOICE2_DTYPE")
    if name:
        table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
        if name not in table:
            raise ValueError(f"unknown dtype {name!r}; use float32, float16 or bfloat16")
        if table[name] != torch.float32 and not device.startswith("cuda"):
            raise ValueError(f"dtype {name} is only supported on CUDA")
        return table[name]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


# The reference starts streaming after chunk_size (25) tokens plus padding of the prompt to a
# multiple of 25, about 0.84 s of audio before the first byte. Ten tokens (0.4 s of speech) cut
# that latency by more than half; scripts/bench_cv2_stream_quality.py measured no extra
# difference from one-shot output on the parity model compared with the reference schedule.
DEFAULT_FIRST_CHUNK_TOKENS = 10

# Flow stream caches of stored speakers' prompts kept in memory (least recently used dropped):
# each holds the prompt's attention keys/values for every Euler step and CFG row, about
# 4.6 MB per prompt mel frame (0.7 GB for a 3 s prompt) at the official size in float32.
SPEAKER_FLOW_CACHES = 2

# Streamed text is normalised (and tokenised) up to its last word or clause boundary; text
# without one (CJK without punctuation) is flushed once it is this long.
_STREAM_BOUNDARY = re.compile(r".*[\s，。！？；：、,.!?;:…]", re.S)
_STREAM_FLUSH_CHARS = 16


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


class CosyVoice2Engine:
    """CosyVoice 2 synthesis engine (see the module docstring for the modes)."""

    name = "cosyvoice2"

    def __init__(self, models: CosyVoice2Models, state_dir: Path | None = None,
                 seed: int | None = None, schedule: StreamSchedule | None = None) -> None:
        if models.tokenizer is None or models.onnx is None:
            raise ValueError("the engine needs the tokenizer and the ONNX front end "
                             "(load the model directory with require_frontend=True)")
        self.models = models
        self.tokenizer = models.tokenizer
        self.seed = seed  # None: every request draws a fresh random seed
        self.text = TextFrontend(lambda s: len(self.tokenizer.encode(s)),
                                 markers=COSYVOICE2_SPECIAL_TOKENS)
        self.prompts = PromptEncoder(models.onnx, models.mel_config, models.token_mel_ratio)
        self.token2wav = Token2Wav(
            models.flow, models.hift, token_mel_ratio=models.token_mel_ratio,
            schedule=schedule or default_schedule(models.chunk_size))
        presets = {}
        for name, entry in models.spk2info.items():
            try:
                presets[name] = _preset(name, entry, models.flow.config.output_size)
            except SpeakerError as error:
                log.warning("ignoring preset speaker: %s", error)
        self.registry = SpeakerRegistry(state_dir, presets)
        # speaker id -> (profile it was built from, flow prompt cache); see SPEAKER_FLOW_CACHES
        self._flow_caches: OrderedDict[str, tuple[SpeakerProfile, Any]] = OrderedDict()
        self._flow_caches_lock = threading.Lock()

    @classmethod
    def from_model_dir(cls, path: Path, threads: int | None = None, device: str = "auto",
                       state_dir: Path | None = None, dtype: str | None = None,
                       seed: int | None = None,
                       first_chunk_tokens: int | None = None) -> CosyVoice2Engine:
        """Load ``path`` (an official CosyVoice2-0.5B directory or one in the same layout).

        threads: torch intra-op threads (None: torch's default); device: "auto" (CUDA when
        available), "cpu" or "cuda[:N]"; state_dir: where registered speakers persist (None:
        they live in memory only); dtype: LM/flow precision override (see ``_resolve_dtype``);
        first_chunk_tokens: speech tokens in the first streamed chunk (None: the default below).
        """
        device = _resolve_device(device)
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)
        started = time.perf_counter()
        models = load_model_dir(Path(path), device=device, dtype=_resolve_dtype(device, dtype),
                                onnx_threads=min(threads or 1, 4))
        log.info("loaded CosyVoice 2 model directory %s on %s (%s) in %.1f s", path, device,
                 models.dtype, time.perf_counter() - started)
        schedule = None
        if first_chunk_tokens is not None:
            schedule = default_schedule(models.chunk_size, first_chunk_tokens)
        return cls(models, state_dir=state_dir, seed=seed, schedule=schedule)

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
        self._validate(request, needs_text=request.mode is not Mode.VOICE_CONVERSION)

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
        for segment in segments:
            if cancel.is_set():
                return
            text_ids = self.tokenizer.encode(segment)
            tokens = self.models.lm.inference(
                text_ids, voice.lm_prompt_text_ids, voice.lm_prompt_tokens,
                self._sampler(randomness), cancel=cancel)
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
        if request.mode is Mode.VOICE_CONVERSION:
            raise UnsupportedMode("voice_conversion takes source audio, not streamed text")
        self._validate(request, needs_text=False)
        randomness = self._randomness()
        voice = self._voice(request)
        chunks = self._text_id_chunks(text_pieces, voice, cancel)
        tokens = self.models.lm.inference_bistream(
            chunks, voice.lm_prompt_text_ids, voice.lm_prompt_tokens,
            self._sampler(randomness), cancel=cancel)
        yield from self._vocode(tokens, voice, request, cancel, randomness)

    def register_speaker(self, speaker_id: str, prompt: Audio, prompt_text: str = "",
                         language: str | None = None, description: str = "",
                         replace: bool = False) -> Speaker:
        """Compute a prompt's features once and store them under ``speaker_id``.

        With ``prompt_text`` (the transcript of the prompt) the speaker serves zero_shot and sft
        like a prompt would; without it, it serves cross_lingual, instruct and voice
        conversion (and sft, as cross_lingual). Persists under ``state_dir`` when one was given.
        """
        try:
            validate_speaker_id(speaker_id)
        except SpeakerError as error:
            raise InvalidRequest(str(error)) from error
        if language is not None and not re.fullmatch(r"[A-Za-z]{2,8}(-[A-Za-z0-9]{1,8})*",
                                                     language):
            raise InvalidRequest(f"language {language!r} is not a language tag like 'zh' or "
                                 "'en-US'")
        if len(description) > 500 or len(prompt_text) > 1000:
            raise InvalidRequest("description (500) or prompt_text (1000 characters) too long")
        if self.registry.is_preset(speaker_id) or (self.registry.get(speaker_id) is not None
                                                   and not replace):
            raise InvalidRequest(f"speaker id {speaker_id!r} is already taken")
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
        with self._flow_caches_lock:  # a replaced voice's cache goes at once
            self._flow_caches.pop(speaker_id, None)
        if profile.has_prompt_audio:  # the prompt's share of the flow, once for all requests
            device = self.models.device
            self._speaker_flow_cache(_Voice(
                lm_prompt_text_ids=[], lm_prompt_tokens=[],
                flow_prompt_tokens=profile.speech_tokens.to(device),
                flow_prompt_feat=profile.speech_feat.to(device),
                embedding=profile.embedding.to(device), tag_language=False, speaker=profile))
        return profile.to_speaker()

    def delete_speaker(self, speaker_id: str) -> None:
        """Forget a registered speaker (and its files). Presets cannot be deleted."""
        with self._flow_caches_lock:
            self._flow_caches.pop(speaker_id, None)
        try:
            self.registry.delete(speaker_id)
        except KeyError:
            raise UnknownSpeaker(f"no registered speaker {speaker_id!r}") from None
        except SpeakerError as error:
            raise InvalidRequest(str(error)) from error

    # ------------------------------------------------------------------ validation

    def _validate(self, request: SynthesisRequest, needs_text: bool) -> None:
        mode = request.mode
        if not isinstance(mode, Mode):
            raise InvalidRequest(f"unknown mode {mode!r}")
        if needs_text:
            if not request.text or not request.text.strip():
                raise InvalidRequest("text is empty: give the text to speak")
            if len(request.text) > MAX_TEXT_CHARS:
                raise InvalidRequest(f"text has {len(request.text)} characters; at most "
                                     f"{MAX_TEXT_CHARS} per request")
        if not MIN_SPEED <= request.speed <= MAX_SPEED:
            raise InvalidRequest(f"speed {request.speed} is out of range "
                                 f"[{MIN_SPEED}, {MAX_SPEED}]")
        if mode is Mode.SFT and len(self.registry) == 0:
            raise UnsupportedMode(NO_PRESETS)
        profile = None
        if request.speaker_id:
            profile = self.registry.get(request.speaker_id)
            if profile is None:
                known = ", ".join(p.id for p in self.registry.all()[:10]) or "none"
                raise UnknownSpeaker(f"unknown speaker {request.speaker_id!r} (known: {known})")
        if request.prompt is not None:
            self._check_audio(request.prompt, "prompt", MIN_PROMPT_SECONDS)
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
            if request.prompt is not None and not request.prompt_text.strip():
                raise InvalidRequest("zero_shot needs prompt_text, the transcript of the prompt "
                                     "audio (without one, use cross_lingual)")
            if request.prompt is None and profile is not None and not profile.has_transcript:
                raise InvalidRequest(f"speaker {profile.id!r} was registered without a "
                                     "transcript; use cross_lingual or instruct with it")
        elif mode is Mode.INSTRUCT:
            if not request.instruct_text.strip():
                raise InvalidRequest("instruct needs instruct_text, e.g. "
                                     f"'用四川话说这句话{END_OF_PROMPT}'")
            if len(request.instruct_text) > 1000:
                raise InvalidRequest("instruct_text is longer than 1000 characters")
        elif mode is Mode.VOICE_CONVERSION:
            if request.source is None:
                raise InvalidRequest("voice_conversion needs source audio (the speech to "
                                     "re-voice)")
            self._check_audio(request.source, "source", MIN_SOURCE_SECONDS)

    @staticmethod
    def _check_audio(audio: Audio, what: str, min_seconds: float) -> None:
        try:
            check_audio(audio.samples, audio.sample_rate, what, min_seconds=min_seconds,
                        max_seconds=MAX_PROMPT_SECONDS)
        except PromptAudioError as error:
            raise InvalidRequest(str(error)) from error

    # ------------------------------------------------------------------ conditioning

    def _randomness(self) -> _Randomness:
        seed = self.seed if self.seed is not None else secrets.randbits(62)
        # Separate streams, so the vocoder's draws never shift the LM's: a seed gives the same
        # speech tokens whether the request streams or not.
        return _Randomness(torch.Generator().manual_seed(seed),
                           torch.Generator().manual_seed(seed + 1))

    def _sampler(self, randomness: _Randomness) -> RasSampler:
        return RasSampler(self.models.sampling, self.models.lm.config.speech_token_size,
                          randomness.sampler)

    def _encode_prompt(self, audio: Audio) -> PromptFeatures:
        try:
            return self.prompts.encode(audio.samples, audio.sample_rate)
        except PromptAudioError as error:
            raise InvalidRequest(str(error)) from error

    def _normalize_prompt_text(self, text: str) -> str:
        return self.text.normalize(text)

    def _voice(self, request: SynthesisRequest) -> _Voice:
        mode = request.mode
        profile = self.registry.get(request.speaker_id) if request.speaker_id else None
        device = self.models.device
        if request.prompt is not None:
            features = self._encode_prompt(request.prompt)
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
            instruction = self.text.normalize(request.instruct_text)
            if not instruction.endswith(END_OF_PROMPT):
                instruction += END_OF_PROMPT
            lm_text, lm_tokens = self.tokenizer.encode(instruction), []
        elif use_transcript and tokens.shape[1] > 0:
            lm_text, lm_tokens = transcript_ids, tokens.flatten().tolist()
        else:
            lm_text, lm_tokens = [], []
        tag = mode is Mode.CROSS_LINGUAL or (mode is Mode.SFT and not lm_text)
        return _Voice(speaker=profile if request.prompt is None else None,
                      lm_prompt_text_ids=lm_text, lm_prompt_tokens=lm_tokens,
                      flow_prompt_tokens=tokens.to(device), flow_prompt_feat=feat.to(device),
                      embedding=embedding.to(device), tag_language=tag)

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
            stream = self.token2wav.start_stream(
                voice.flow_prompt_tokens, voice.flow_prompt_feat, voice.embedding,
                generator=randomness.vocoder, cancel=cancel,
                prompt_cache=self._speaker_flow_cache(voice))
            for token in tokens:
                for chunk in stream.push([token]):
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
        wav = self.token2wav.synthesize(token, voice.flow_prompt_tokens, voice.flow_prompt_feat,
                                        voice.embedding, speed=request.speed,
                                        generator=randomness.vocoder)
        if wav.shape[-1]:
            yield _to_numpy(wav)

    def _speaker_flow_cache(self, voice: _Voice) -> Any:
        """The flow's prompt cache of a stored speaker, built on first use and kept (LRU);
        a replaced speaker is a new profile object, so its old cache is never used."""
        profile = voice.speaker
        if profile is None or not self.token2wav.caches_streams or SPEAKER_FLOW_CACHES < 1:
            return None
        with self._flow_caches_lock:
            entry = self._flow_caches.get(profile.id)
            if entry is not None and entry[0] is profile:
                self._flow_caches.move_to_end(profile.id)
                return entry[1]
        cache = self.token2wav.prompt_cache(voice.flow_prompt_tokens, voice.flow_prompt_feat,
                                            voice.embedding)
        with self._flow_caches_lock:
            self._flow_caches[profile.id] = (profile, cache)
            self._flow_caches.move_to_end(profile.id)
            while len(self._flow_caches) > SPEAKER_FLOW_CACHES:
                self._flow_caches.popitem(last=False)
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
        yield from self._vocode(source.flatten().tolist(), voice, request, cancel, randomness)


def _to_numpy(wav: torch.Tensor) -> np.ndarray:
    return wav.detach().float().cpu().numpy().reshape(-1).astype(np.float32, copy=False)


_PRESET_LANGUAGES = {"中文": "zh", "英文": "en", "日语": "ja", "粤语": "yue", "韩语": "ko"}


def _preset(name: str, entry: dict[str, torch.Tensor], n_mels: int) -> SpeakerProfile:
    """A ``spk2info.pt`` speaker; its language is read from the official names (中文女 ...)."""
    language = next((code for word, code in _PRESET_LANGUAGES.items() if word in name), "und")
    return replace(preset_from_spk2info(name, entry, n_mels), language=language)
