"""OpenAI's speech API (``POST /v1/audio/speech``, ``GET /v1/models``, ``GET /v1/audio/voices``).

Decodes OpenAI's JSON into the engine's ``SynthesisRequest`` (the values are then checked by
the same request rules as every other call, ``tts_core/limits.py``) and writes OpenAI's JSON:
the model and voice listings, server-sent events and the error object
``{"error": {"message", "type", "param", "code"}}``.

Mapping: ``input`` is the text; ``voice`` a preset or registered speaker id (sft mode);
``instructions`` switch to instruct mode with that speaker (501 where the engine has none);
``speed`` is taken in OpenAI's range 0.25 – 4.0 and clamped to what the engines support
(``tts_core.limits.MIN_SPEED`` – ``MAX_SPEED``), the speed used is named in the response header
``x-cosyvoice-speed``; ``response_format`` picks the encoding; audio is at 24 kHz mono, as
OpenAI's (its ``pcm`` is 24 kHz 16-bit little-endian).
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass

from python_multipart.multipart import parse_options_header

from service import errors
from service.audio import FORMAT_ENCODINGS
from service.convert import OutputSpec, check_rules
from service.errors import ServiceError, bad_request, too_large, unsupported_media_type
from service.json_body import json_type, parse_json_object
from service.limits import MAX_REQUEST_BODY_BYTES
from tts_core import limits
from tts_core.engine import Mode, Speaker, SynthesisRequest

OUTPUT_RATE = 24000  # OpenAI's audio is 24 kHz
SPEED_HEADER = "x-cosyvoice-speed"
MIN_OPENAI_SPEED, MAX_OPENAI_SPEED = 0.25, 4.0
# Model names OpenAI clients send; each one is served by the engine the server runs.
OPENAI_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")
# response_format -> the encoding that makes it.
FORMATS = FORMAT_ENCODINGS
DEFAULT_FORMAT = "mp3"
STREAM_FORMATS = ("audio", "sse")
FIELDS = ("model", "input", "voice", "response_format", "speed", "instructions",
          "stream_format")
NAMES = limits.FieldNames(text="input", prompt="a prompt recording", speaker="voice",
                          instruct_text="instructions")


@dataclass(frozen=True)
class Speech:
    """A decoded /v1/audio/speech request."""

    request: SynthesisRequest
    output: OutputSpec
    response_format: str
    sse: bool  # server-sent events instead of the bare audio
    speed_applied: float


def _string(body: dict, name: str, *, required: bool = False, default: str = "") -> str:
    value = body.get(name)
    if value is None:
        if required:
            raise bad_request(f"'{name}' is required", name)
        return default
    if not isinstance(value, str):
        raise bad_request(f"'{name}' must be a string, not {json_type(value)}", name)
    return value


def _voice(body: dict) -> str:
    voice = body.get("voice")
    if isinstance(voice, dict):  # OpenAI's custom voices: {"id": "..."}
        unknown = sorted(set(voice) - {"id"})
        if unknown:
            raise bad_request(f"unrecognized request argument 'voice.{unknown[0]}': a voice "
                              'object is {"id": "<speaker id>"}', "voice")
        voice = voice.get("id")
    if not isinstance(voice, str) or not voice.strip():
        raise bad_request("'voice' is required: a preset or registered speaker id (GET "
                           "/v1/audio/voices lists them)", "voice")
    return voice.strip()


def _speed(body: dict) -> float:
    speed = body.get("speed", 1.0)
    if speed is None:
        return 1.0
    if isinstance(speed, bool) or not isinstance(speed, int | float):
        raise bad_request(f"'speed' must be a number, not {json_type(speed)}", "speed")
    if not math.isfinite(speed) or not MIN_OPENAI_SPEED <= speed <= MAX_OPENAI_SPEED:
        raise bad_request(f"speed {speed!r} is out of range: use {MIN_OPENAI_SPEED} to "
                           f"{MAX_OPENAI_SPEED} (this server speaks at {limits.MIN_SPEED} to "
                           f"{limits.MAX_SPEED} and clamps to that)", "speed")
    return min(max(float(speed), limits.MIN_SPEED), limits.MAX_SPEED)


def model_ids(engine: str) -> tuple[str, ...]:
    return (engine, *OPENAI_MODELS)


def decode_speech(body: bytes, content_type: str, engine: str) -> Speech:
    """Check a /v1/audio/speech body and build the engine request (raises ServiceError)."""
    media_type = parse_options_header(content_type or "")[0].decode("latin-1").lower()
    if media_type != "application/json":
        raise unsupported_media_type(f"Content-Type {media_type or '(none)'} is not understood: "
                                     "send the request as application/json")
    if len(body) > MAX_REQUEST_BODY_BYTES:
        raise too_large(f"request body is {len(body)} bytes; the limit is "
                        f"{MAX_REQUEST_BODY_BYTES} bytes")
    fields = parse_json_object(body, '{"model": "tts-1", "input": "Hello.", "voice": "英文女"}')
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise bad_request(f"unrecognized request argument {unknown[0]!r}; this endpoint "
                           f"takes {', '.join(FIELDS)}", unknown[0])

    model = _string(fields, "model", required=True)
    if model not in model_ids(engine):
        raise errors.not_found(f"the model {model!r} does not exist on this server: use "
                               f"{', '.join(model_ids(engine))} (all are the {engine} engine)",
                               "model")
    text = _string(fields, "input", required=True)
    voice = _voice(fields)
    instructions = _string(fields, "instructions")
    response_format = _string(fields, "response_format", default=DEFAULT_FORMAT).lower()
    if response_format not in FORMATS:
        raise bad_request(f"response_format {response_format!r} is not available on this "
                           f"server: use one of {', '.join(FORMATS)}", "response_format")
    stream_format = _string(fields, "stream_format", default="audio").lower()
    if stream_format not in STREAM_FORMATS:
        raise bad_request(f"stream_format {stream_format!r} is not one of "
                           f"{', '.join(STREAM_FORMATS)}", "stream_format")
    speed = _speed(fields)

    if instructions.strip():
        request = SynthesisRequest(Mode.INSTRUCT, text=text, speaker_id=voice,
                                   instruct_text=instructions, speed=speed)
    else:
        request = SynthesisRequest(Mode.SFT, text=text, speaker_id=voice, speed=speed)
    check_rules(request, NAMES)
    return Speech(request=request, output=OutputSpec(OUTPUT_RATE, FORMATS[response_format]),
                  response_format=response_format, sse=stream_format == "sse",
                  speed_applied=speed)


# ------------------------------------------------------------------ what the server writes

_TYPES = {401: "authentication_error", 404: "invalid_request_error",
          409: "invalid_request_error", 413: "invalid_request_error",
          415: "invalid_request_error", 501: "invalid_request_error", 503: "server_error"}
_CODES = {401: "invalid_api_key", 404: "not_found", 409: "conflict", 413: "too_large",
          415: "unsupported_media_type", 501: "unsupported", 503: "server_busy",
          500: "internal_error"}


def error_body(error: ServiceError) -> bytes:
    """OpenAI's error object for ``error``."""
    status = error.http_status or 500
    kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return json.dumps({"error": {
        "message": error.message, "type": kind, "param": error.param,
        "code": _CODES.get(status, "invalid_request" if status < 500 else "server_error"),
    }}, ensure_ascii=False).encode()


def sse_event(event: dict) -> bytes:
    return f"data: {json.dumps(event)}\n\n".encode()


def sse_delta(audio: bytes) -> bytes:
    return sse_event({"type": "speech.audio.delta", "audio": base64.b64encode(audio).decode()})


def sse_done(input_chars: int) -> bytes:
    # Usage is counted in characters of input (there are no billing tokens here).
    return sse_event({"type": "speech.audio.done", "usage": {
        "input_tokens": input_chars, "output_tokens": 0, "total_tokens": input_chars}})


def sse_error(error: ServiceError) -> bytes:
    return sse_event({"type": "error", **json.loads(error_body(error))})


def models_body(engine: str, created: int) -> bytes:
    return json.dumps({"object": "list", "data": [
        {"id": model, "object": "model", "created": created, "owned_by": "cosyvoice-service"}
        for model in model_ids(engine)]}).encode()


def voices_body(speakers: list[Speaker]) -> bytes:
    return json.dumps({"voices": [
        {"id": s.id, "name": s.id, "language": s.language, "description": s.description,
         "registered": s.registered} for s in speakers]}, ensure_ascii=False).encode()
