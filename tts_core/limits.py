"""Every limit and request rule that engines and the service share, in one place.

The service (every API surface: native gRPC, the reference REST API, the OpenAI-compatible API)
and every engine read these values and call these checks, so a request is judged the same way
wherever it comes from, and ``ListSpeakers`` reports exactly what is enforced. Limits that only
the service knows (upload and body bytes, output sample rates, capacity) are in
``service/limits.py``. The README's limits table mirrors both files.

The checks raise the engine errors of :mod:`tts_core.engine`; the service maps them to gRPC and
HTTP statuses (:class:`TooLarge` is 413, :class:`SpeakerExists` 409, other ``InvalidRequest`` 400).
Messages name fields the way the caller's API spells them (:class:`FieldNames`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from tts_core.engine import InvalidRequest, Mode, SynthesisRequest, TooLarge

# Text to speak in one request, in characters (code points), surrounding whitespace included.
# Engines split it into sentences; longer texts belong in several requests.
MAX_TEXT_CHARS = 2000
# Streamed text (SynthesizeTextStream): all pieces of one call together. A whole stream is one
# LM context: with about 6 positions per Chinese character (its text token plus ~5 speech
# tokens) 4000 characters stay well inside CosyVoice 2's 32k positions.
MAX_STREAM_TEXT_CHARS = 4000
# How long a text stream may wait for its next piece (an abandoned stream must not hold a slot).
TEXT_STREAM_IDLE_SECONDS = 60.0
# Other text fields.
MAX_PROMPT_TEXT_CHARS = 500  # the transcript of a prompt recording
MAX_INSTRUCT_TEXT_CHARS = 500  # a style / emotion / dialect instruction
MAX_SPEAKER_ID_CHARS = 128  # any speaker id a request names
MAX_DESCRIPTION_CHARS = 500  # a registered speaker's description

# Ids of registered speakers become file names: letters (any script), digits, "_", "-", ".";
# no leading "." or "-"; at most 64 characters; never "..".
REGISTERED_SPEAKER_ID = re.compile(r"^[^\W][\w.\-]{0,63}$")
SPEAKER_ID_RULE = "use 1–64 letters, digits, '_', '-' or '.', starting with a letter or digit"
LANGUAGE_TAG = re.compile(r"[A-Za-z]{2,8}(-[A-Za-z0-9]{1,8})*")

# Prompt audio (the voice to clone) and voice-conversion source audio, in seconds. The speech
# tokenizer of CosyVoice 2 was trained on at most 30 s; below 0.5 s a prompt carries too little
# voice, while a source may be as short as one speech-token hop block.
MIN_PROMPT_SECONDS = 0.5
MAX_PROMPT_SECONDS = 30.0
MIN_SOURCE_SECONDS = 0.2
MAX_SOURCE_SECONDS = MAX_PROMPT_SECONDS
# Sample rates of audio handed to an engine (uploads are resampled by the engine).
MIN_INPUT_SAMPLE_RATE = 8000
MAX_INPUT_SAMPLE_RATE = 48000

# Speaking rate (1.0 is normal). Every engine supports this range.
MIN_SPEED = 0.5
MAX_SPEED = 2.0

# Bounded work per character of text (applied by tts_core/text_guard.py in every engine's front
# end): no word may make one long model call, no number thousands of words.
MAX_WORD_LETTERS = 64  # a longer run of letters is refused (real words, compounds too, are shorter)
MAX_UNSPACED_RUN = 256  # the same for scripts written without spaces (Thai, Lao, Khmer, ...)
MAX_NUMBER_DIGITS = 15  # a longer digit run is read digit by digit ...
DIGIT_GROUP = 3  # ... in groups of this many, separated like clauses


@dataclass(frozen=True)
class FieldNames:
    """How an API spells the fields a message refers to (so a message names what to fix)."""

    text: str = "text"
    prompt: str = "prompt audio"
    prompt_text: str = "prompt_text"
    speaker: str = "speaker_id"
    instruct_text: str = "instruct_text"
    cross_lingual: str = "cross_lingual"  # where to go without a transcript


ENGINE_NAMES = FieldNames()


def check_text(value: str, name: str, max_chars: int, *, required: bool) -> str:
    """``value`` unchanged, or InvalidRequest (empty) / TooLarge (over ``max_chars``)."""
    if required and not value.strip():
        raise InvalidRequest(f"{name} is empty: give the text to speak")
    if len(value) > max_chars:
        raise TooLarge(f"{name} has {len(value)} characters; the limit is {max_chars}: "
                       "split it into several requests")
    return value


def check_speed(speed: float) -> float:
    if not (isinstance(speed, int | float) and math.isfinite(speed)
            and MIN_SPEED <= speed <= MAX_SPEED):
        raise InvalidRequest(f"speed {speed!r} is out of range: use a value between "
                             f"{MIN_SPEED} and {MAX_SPEED} (1.0 is normal)")
    return float(speed)


def check_request(request: SynthesisRequest, names: FieldNames = ENGINE_NAMES, *,
                  streamed_text: bool = False) -> None:
    """The rules every request obeys whatever the engine (cheap; no audio is looked at).

    ``streamed_text``: the text arrives later (SynthesizeTextStream), so none is needed here.
    What depends on the engine (its modes, its speakers, the prompt's content) is the engine's
    ``validate``.
    """
    mode = request.mode
    if not isinstance(mode, Mode):
        raise InvalidRequest(f"unknown mode {mode!r}")
    needs_text = mode is not Mode.VOICE_CONVERSION and not streamed_text
    check_text(request.text, names.text, MAX_TEXT_CHARS, required=needs_text)
    check_speed(request.speed)
    check_text(request.speaker_id, names.speaker, MAX_SPEAKER_ID_CHARS, required=False)
    check_text(request.prompt_text, names.prompt_text, MAX_PROMPT_TEXT_CHARS, required=False)
    if mode is Mode.ZERO_SHOT:
        # A prompt recording comes with its transcript; a registered speaker brings its own.
        if request.prompt is not None and not request.prompt_text.strip():
            raise InvalidRequest(
                f"zero_shot needs {names.prompt_text}, the transcript of {names.prompt} "
                f"(without one, use {names.cross_lingual})")
        if request.prompt is None and request.prompt_text.strip():
            raise InvalidRequest(
                f"{names.prompt_text} goes with {names.prompt}; leave it out with "
                f"{names.speaker} (the registered speaker's own transcript is used)")
    if mode is Mode.INSTRUCT:
        check_text(request.instruct_text, names.instruct_text, MAX_INSTRUCT_TEXT_CHARS,
                   required=False)
        if not request.instruct_text.strip():
            raise InvalidRequest(f"instruct needs {names.instruct_text}: the style, emotion or "
                                 "dialect to speak in, e.g. '用四川话说这句话' or 'Speak calmly.'")


def is_valid_speaker_id(speaker_id: object) -> bool:
    """Whether ``speaker_id`` may name a registered speaker (it becomes a file name)."""
    return (isinstance(speaker_id, str) and REGISTERED_SPEAKER_ID.fullmatch(speaker_id) is not None
            and ".." not in speaker_id)


def check_registration(speaker_id: str, prompt_text: str = "", language: str | None = None,
                       description: str = "") -> None:
    """The rules for registering a speaker (the id, the transcript, the language tag)."""
    if not is_valid_speaker_id(speaker_id):
        raise InvalidRequest(f"speaker id {speaker_id!r} is not valid: {SPEAKER_ID_RULE}")
    check_text(prompt_text, "prompt_text", MAX_PROMPT_TEXT_CHARS, required=False)
    check_text(description, "description", MAX_DESCRIPTION_CHARS, required=False)
    if language is not None and not LANGUAGE_TAG.fullmatch(language):
        raise InvalidRequest(f"language {language!r} is not a language tag like 'zh' or "
                             "'en-US'")
