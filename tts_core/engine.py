"""The one small interface every synthesis engine implements.

The service layer talks to engines only through the types in this module: it hands over a
:class:`SynthesisRequest` and iterates float32 mono audio chunks at the engine's native sample
rate. Engines raise the :class:`EngineError` subclasses below for problems a client caused, so the
service can map them to the right status without knowing anything about the engine.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


class Mode(enum.Enum):
    """What kind of voice a request asks for."""

    SFT = "sft"  # a preset speaker
    ZERO_SHOT = "zero_shot"  # clone the prompt voice; prompt transcript given
    CROSS_LINGUAL = "cross_lingual"  # clone the prompt voice; no transcript
    INSTRUCT = "instruct"  # style / emotion / dialect instruction (+ speaker or prompt)
    VOICE_CONVERSION = "voice_conversion"  # re-voice source speech with the prompt voice


@dataclass(frozen=True)
class Audio:
    """Mono float32 samples in [-1, 1] and their sample rate."""

    samples: np.ndarray
    sample_rate: int

    @property
    def duration(self) -> float:
        return len(self.samples) / float(self.sample_rate)


@dataclass(frozen=True)
class Speaker:
    """A voice a client can name with ``speaker_id``."""

    id: str
    language: str  # BCP-47-ish tag: "zh", "en", "ja", "ko", "yue", ...
    description: str = ""
    registered: bool = False  # True for voices cloned and stored at run time


@dataclass(frozen=True)
class Capabilities:
    """What an engine can do, so clients can be told in advance."""

    engine: str
    sample_rate: int
    modes: frozenset[Mode]
    # For each mode the engine cannot serve: a sentence a person can act on.
    unsupported_reasons: dict[Mode, str] = field(default_factory=dict)
    supports_speaker_registration: bool = False  # the engine implements SpeakerRegistration
    supports_text_streaming: bool = False  # the engine implements TextStreamSynthesis


@dataclass(frozen=True)
class SynthesisRequest:
    mode: Mode
    text: str = ""
    speaker_id: str = ""
    prompt: Audio | None = None
    prompt_text: str = ""
    instruct_text: str = ""
    source: Audio | None = None  # voice conversion input
    speed: float = 1.0
    # Stream inside a sentence (smaller, earlier chunks) rather than sentence by sentence.
    stream: bool = True


class EngineError(Exception):
    """Base class for errors a client caused; the message is shown to the client."""


class InvalidRequest(EngineError):
    """A field is missing, malformed or out of range."""


class TooLarge(InvalidRequest):
    """A field is over its size limit (text length, audio duration): HTTP 413."""


class SpeakerExists(InvalidRequest):
    """Registering a speaker under an id that is taken (without ``replace``): HTTP 409."""


class UnknownSpeaker(EngineError):
    """The requested speaker id does not exist."""


class UnsupportedMode(EngineError):
    """The engine cannot serve this mode (the message says what would)."""


class Engine(Protocol):
    """A speech synthesis engine.

    ``synthesize`` runs in a worker thread, never on the server's event loop. It must validate the
    request before doing expensive work (raising an :class:`EngineError`), then yield chunks as
    soon as they are ready, and check ``cancel`` often enough to stop within one chunk.
    """

    name: str

    def capabilities(self) -> Capabilities: ...

    def speakers(self) -> list[Speaker]: ...

    def validate(self, request: SynthesisRequest) -> None:
        """Raise an EngineError if ``request`` cannot be served; cheap, no synthesis."""
        ...

    def synthesize(
        self, request: SynthesisRequest, cancel: threading.Event
    ) -> Iterator[np.ndarray]:
        """Yield float32 mono chunks at ``capabilities().sample_rate``."""
        ...


class SpeakerRegistration(Protocol):
    """Optional: engines that can store a prompt's voice under an id (capability flag above)."""

    def register_speaker(self, speaker_id: str, prompt: Audio, prompt_text: str = "",
                         language: str | None = None, description: str = "",
                         replace: bool = False) -> Speaker:
        """Compute the prompt's features once and keep them (persisted) under ``speaker_id``."""
        ...

    def delete_speaker(self, speaker_id: str) -> None:
        """Forget a registered speaker; UnknownSpeaker if there is none of that id."""
        ...


class TextStreamSynthesis(Protocol):
    """Optional: engines that start speaking while the text is still arriving."""

    def validate_text_stream(self, request: SynthesisRequest) -> None:
        """Like ``validate`` for a request whose text has not arrived yet (``text`` unused)."""
        ...

    def synthesize_text_stream(self, request: SynthesisRequest, text_pieces: Iterable[str],
                               cancel: threading.Event) -> Iterator[np.ndarray]:
        """Like ``synthesize``, the text coming from ``text_pieces`` (``request.text`` unused)."""
        ...
