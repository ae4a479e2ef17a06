"""Decodes the reference REST API's requests into the SynthesizeRequest that Synthesize takes.

The gateway hands each /inference_* request over as query-parameter fields plus the raw body
(google.api.HttpBody). Bodies may be ``application/x-www-form-urlencoded``,
``multipart/form-data`` (the prompt recording in the file field ``prompt_wav``) or
``application/json`` (``prompt_wav`` base64-encoded). A field may come from the query string or
the body; the body wins when both give it.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from urllib.parse import parse_qsl

from google.protobuf.message import Message
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from service import limits
from service.errors import bad_request, too_large, unsupported_media_type
from service.gen.cosyvoice.v1 import tts_pb2

AudioEncoding = tts_pb2.AudioEncoding

_COMMON = ("sample_rate", "speed", "format", "stream")


@dataclass(frozen=True)
class Endpoint:
    path: str
    fields: tuple[str, ...]  # text fields it takes, required ones first
    required: tuple[str, ...]
    needs_prompt: bool


ENDPOINTS = {
    "sft": Endpoint("/inference_sft", ("tts_text", "spk_id", *_COMMON),
                    ("tts_text", "spk_id"), False),
    "zero_shot": Endpoint("/inference_zero_shot", ("tts_text", "prompt_text", *_COMMON),
                          ("tts_text", "prompt_text"), True),
    "cross_lingual": Endpoint("/inference_cross_lingual", ("tts_text", *_COMMON),
                              ("tts_text",), True),
    "instruct": Endpoint("/inference_instruct", ("tts_text", "spk_id", "instruct_text", *_COMMON),
                         ("tts_text", "spk_id", "instruct_text"), False),
    "instruct2": Endpoint("/inference_instruct2", ("tts_text", "instruct_text", *_COMMON),
                          ("tts_text", "instruct_text"), True),
}
PROMPT_FIELD = "prompt_wav"
_FORMATS = {"pcm": AudioEncoding.AUDIO_ENCODING_PCM_S16LE, "wav": AudioEncoding.AUDIO_ENCODING_WAV}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def decode(kind: str, request: Message) -> tts_pb2.SynthesizeRequest:
    """Turn an Inference*Request (query fields + raw body) into a SynthesizeRequest."""
    endpoint = ENDPOINTS[kind]
    fields = {f.name: getattr(request, f.name) for f in request.DESCRIPTOR.fields
              if f.name != "body" and getattr(request, f.name)}
    body_fields, prompt = _parse_body(request.body.content_type, request.body.data, endpoint)
    fields.update(body_fields)

    missing = [name for name in endpoint.required if not fields.get(name, "").strip()]
    if missing:
        raise bad_request(f"{endpoint.path} needs {' and '.join(missing)}; it takes the fields "
                          f"{', '.join(endpoint.fields)}" + (f" and the file {PROMPT_FIELD}"
                                                             if endpoint.needs_prompt else ""))
    if endpoint.needs_prompt and not prompt:
        raise bad_request(f"{endpoint.path} needs the prompt recording: upload it as the "
                          f"multipart file field {PROMPT_FIELD!r} (WAV, FLAC or OGG)")
    if not endpoint.needs_prompt and prompt:
        raise bad_request(f"{endpoint.path} takes no {PROMPT_FIELD}; use /inference_zero_shot, "
                          "/inference_cross_lingual or /inference_instruct2 for a cloned voice")

    msg = tts_pb2.SynthesizeRequest(text=fields["tts_text"])
    prompt_audio = tts_pb2.PromptAudio(data=prompt) if prompt else None
    if kind == "sft":
        msg.sft.speaker_id = fields["spk_id"]
    elif kind == "zero_shot":
        msg.zero_shot.prompt_text = fields["prompt_text"]
        msg.zero_shot.prompt_audio.CopyFrom(prompt_audio)
    elif kind == "cross_lingual":
        msg.cross_lingual.prompt_audio.CopyFrom(prompt_audio)
    elif kind == "instruct":
        msg.instruct.instruct_text = fields["instruct_text"]
        msg.instruct.speaker_id = fields["spk_id"]
    else:
        msg.instruct.instruct_text = fields["instruct_text"]
        msg.instruct.prompt_audio.CopyFrom(prompt_audio)

    msg.sample_rate = _parse_int(fields.get("sample_rate", ""), "sample_rate",
                                 limits.REST_DEFAULT_SAMPLE_RATE)
    msg.speed = _parse_speed(fields.get("speed", ""))
    fmt = fields.get("format", "pcm").strip().lower() or "pcm"
    if fmt not in _FORMATS:
        raise bad_request(f"format {fmt!r} is not offered: use pcm (raw 16-bit) or wav")
    msg.encoding = _FORMATS[fmt]
    stream = fields.get("stream", "").strip().lower()
    if stream:
        if stream not in _TRUE | _FALSE:
            raise bad_request(f"stream must be true or false, not {stream!r}")
        msg.stream_within_sentence = stream in _TRUE
    return msg


def _parse_int(value: str, name: str, default: int) -> int:
    value = value.strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise bad_request(f"{name} must be a whole number of Hz, not {value!r}") from None


def _parse_speed(value: str) -> float:
    value = value.strip()
    if not value:
        return 1.0
    try:
        speed = float(value)
    except ValueError:
        raise bad_request(f"speed must be a number such as 1.0, not {value!r}") from None
    if not math.isfinite(speed) or speed <= 0:
        raise bad_request(f"speed must be a positive number, not {value!r}")
    return speed


def _parse_body(content_type: str, data: bytes, endpoint: Endpoint) -> tuple[dict[str, str], bytes]:
    """Return (text fields, prompt bytes) from a raw request body."""
    if not data:
        return {}, b""
    if len(data) > limits.MAX_REQUEST_BODY_BYTES:
        raise too_large(f"request body is {len(data)} bytes; the limit is "
                        f"{limits.MAX_REQUEST_BODY_BYTES} bytes")
    media_type, params = parse_options_header(content_type or "")
    media_type = media_type.decode("latin-1").lower()
    if media_type == "application/x-www-form-urlencoded":
        try:
            pairs = parse_qsl(data.decode("utf-8"), keep_blank_values=True, strict_parsing=True)
        except (UnicodeDecodeError, ValueError):
            raise bad_request("the form body is not valid UTF-8 url-encoded data") from None
        fields, files = _collect(pairs, [], endpoint)
    elif media_type == "multipart/form-data":
        boundary = params.get(b"boundary")
        if not boundary:
            raise bad_request("multipart/form-data body without a boundary parameter")
        fields, files = _collect(*_parse_multipart(data, boundary), endpoint)
    elif media_type in ("application/json", "text/json"):
        fields, files = _parse_json(data, endpoint)
    else:
        raise unsupported_media_type(
            f"Content-Type {media_type or '(none)'} is not understood: send "
            "multipart/form-data, application/x-www-form-urlencoded or application/json")
    return fields, files.get(PROMPT_FIELD, b"")


def _collect(pairs: list[tuple[str, str]], files: list[tuple[str, bytes]],
             endpoint: Endpoint) -> tuple[dict[str, str], dict[str, bytes]]:
    fields: dict[str, str] = {}
    uploads: dict[str, bytes] = {}
    for name, value in pairs:
        if name == PROMPT_FIELD:
            raise bad_request(f"{PROMPT_FIELD} must be uploaded as a file (multipart/form-data)")
        _check_name(name, endpoint)
        fields[name] = value
    for name, content in files:
        if name != PROMPT_FIELD:
            raise bad_request(f"unexpected file field {name!r}; the only file field is "
                              f"{PROMPT_FIELD!r}")
        uploads[name] = content
    return fields, uploads


def _check_name(name: str, endpoint: Endpoint) -> None:
    if name not in endpoint.fields:
        extra = f" and the file {PROMPT_FIELD}" if endpoint.needs_prompt else ""
        raise bad_request(f"unknown field {name!r} for {endpoint.path}; it takes "
                          f"{', '.join(endpoint.fields)}{extra}")


def _parse_multipart(data: bytes, boundary: bytes) -> tuple[list[tuple[str, str]],
                                                            list[tuple[str, bytes]]]:
    parts: list[tuple[dict[str, bytes], bytearray]] = []
    header_name = bytearray()
    header_value = bytearray()

    def on_part_begin() -> None:
        parts.append(({}, bytearray()))

    def on_header_field(buf: bytes, start: int, end: int) -> None:
        header_name.extend(buf[start:end])

    def on_header_value(buf: bytes, start: int, end: int) -> None:
        header_value.extend(buf[start:end])

    def on_header_end() -> None:
        parts[-1][0][bytes(header_name).decode("latin-1").lower()] = bytes(header_value)
        header_name.clear()
        header_value.clear()

    def on_part_data(buf: bytes, start: int, end: int) -> None:
        parts[-1][1].extend(buf[start:end])

    callbacks = {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                 "on_header_value": on_header_value, "on_header_end": on_header_end,
                 "on_part_data": on_part_data}
    parser = MultipartParser(boundary, callbacks)
    try:
        parser.write(data)
        parser.finalize()
    except MultipartParseError as error:
        raise bad_request(f"the multipart/form-data body is malformed ({error})") from None
    fields: list[tuple[str, str]] = []
    files: list[tuple[str, bytes]] = []
    for headers, content in parts:
        disposition, options = parse_options_header(headers.get("content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if disposition != b"form-data" or not name:
            raise bad_request("a multipart part lacks 'Content-Disposition: form-data; name=...'")
        if b"filename" in options or name == PROMPT_FIELD:
            files.append((name, bytes(content)))
        else:
            try:
                fields.append((name, content.decode("utf-8")))
            except UnicodeDecodeError:
                raise bad_request(f"multipart field {name!r} is not UTF-8 text") from None
    return fields, files


def _parse_json(data: bytes, endpoint: Endpoint) -> tuple[dict[str, str], dict[str, bytes]]:
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, ValueError) as error:
        raise bad_request(f"the JSON body is malformed ({error})") from None
    if not isinstance(obj, dict):
        raise bad_request("the JSON body must be an object such as {\"tts_text\": \"...\"}")
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    for name, value in obj.items():
        if name == PROMPT_FIELD and endpoint.needs_prompt:
            if not isinstance(value, str):
                raise bad_request(f"{PROMPT_FIELD} in JSON must be a base64 string")
            try:
                files[name] = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise bad_request(f"{PROMPT_FIELD} is not valid base64") from None
            continue
        _check_name(name, endpoint)
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, int | float):
            value = str(value)
        elif not isinstance(value, str):
            raise bad_request(f"JSON field {name!r} must be a string or a number")
        fields[name] = value
    return fields, files
