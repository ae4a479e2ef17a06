"""Decodes the reference REST API's requests into the SynthesizeRequest that Synthesize takes.

The gateway hands each /inference_* request (and /register_speaker) over as query-parameter
fields plus the raw body (google.api.HttpBody). Bodies may be
``application/x-www-form-urlencoded``, ``multipart/form-data`` (the prompt recording in the file
field ``prompt_wav``, voice conversion's source speech in ``source_wav``) or ``application/json``
(files base64-encoded under the same names). A field may come from the query string or the
body; the body wins when both give it. Where a prompt recording is taken, ``spk_id`` (a
registered speaker) may stand in for it.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl

from google.protobuf.message import Message
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from service import limits
from service.audio import FORMAT_ENCODINGS
from service.errors import bad_request, too_large, unsupported_media_type
from service.gen.cosyvoice.v1 import tts_pb2
from service.json_body import parse_json_object
from tts_core.limits import FieldNames

_COMMON = ("sample_rate", "speed", "format", "stream")
PROMPT_FIELD = "prompt_wav"
SOURCE_FIELD = "source_wav"
FILE_FIELDS = (PROMPT_FIELD, SOURCE_FIELD)
# How this API spells the fields the request rules (tts_core.limits) talk about.
REST_NAMES = FieldNames(text="tts_text", prompt=PROMPT_FIELD, speaker="spk_id",
                        cross_lingual="/inference_cross_lingual")


@dataclass(frozen=True)
class Endpoint:
    path: str
    fields: tuple[str, ...]  # text fields it takes
    required: tuple[str, ...]  # text fields it always needs
    files: tuple[str, ...] = ()  # file fields it takes
    # Takes a cloned voice: the file prompt_wav, or spk_id naming a registered speaker.
    voice: bool = False

    def takes(self) -> str:
        files = (f" and the file{'s' if len(self.files) > 1 else ''} {', '.join(self.files)}"
                 if self.files else "")
        return f"it takes the fields {', '.join(self.fields)}{files}"


ENDPOINTS = {
    "sft": Endpoint("/inference_sft", ("tts_text", "spk_id", *_COMMON), ("tts_text", "spk_id")),
    "zero_shot": Endpoint("/inference_zero_shot", ("tts_text", "prompt_text", "spk_id", *_COMMON),
                          ("tts_text",), (PROMPT_FIELD,), voice=True),
    "cross_lingual": Endpoint("/inference_cross_lingual", ("tts_text", "spk_id", *_COMMON),
                              ("tts_text",), (PROMPT_FIELD,), voice=True),
    "instruct": Endpoint("/inference_instruct", ("tts_text", "spk_id", "instruct_text", *_COMMON),
                         ("tts_text", "spk_id", "instruct_text")),
    "instruct2": Endpoint("/inference_instruct2",
                          ("tts_text", "instruct_text", "spk_id", *_COMMON),
                          ("tts_text", "instruct_text"), (PROMPT_FIELD,), voice=True),
    "vc": Endpoint("/inference_vc", ("spk_id", *_COMMON), (), (SOURCE_FIELD, PROMPT_FIELD),
                   voice=True),
}
REGISTER = Endpoint("/register_speaker",
                    ("spk_id", "prompt_text", "language", "description", "replace"),
                    ("spk_id",), (PROMPT_FIELD,))
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _fields(endpoint: Endpoint, request: Message) -> tuple[dict[str, str], dict[str, bytes]]:
    """Query fields and body fields (the body wins), files; checks the always-required ones."""
    fields = {f.name: getattr(request, f.name) for f in request.DESCRIPTOR.fields
              if f.name != "body" and getattr(request, f.name)}
    body_fields, files = _parse_body(request.body.content_type, request.body.data, endpoint)
    fields.update(body_fields)
    missing = [name for name in endpoint.required if not fields.get(name, "").strip()]
    if missing:
        raise bad_request(f"{endpoint.path} needs {' and '.join(missing)}; {endpoint.takes()}")
    return fields, files


def _voice(endpoint: Endpoint, fields: dict[str, str], files: dict[str, bytes]
           ) -> tuple[bytes, str]:
    """(prompt bytes, "") or (b"", registered speaker id): exactly one of the two."""
    prompt = files.get(PROMPT_FIELD, b"")
    speaker = fields.get("spk_id", "").strip()
    if prompt and speaker:
        raise bad_request(f"{endpoint.path} takes either the file {PROMPT_FIELD} or spk_id (a "
                          "registered speaker), not both")
    if not prompt and not speaker:
        raise bad_request(f"{endpoint.path} needs the prompt recording: upload it as the "
                          f"multipart file field {PROMPT_FIELD!r} (WAV, FLAC or OGG), or name a "
                          "registered speaker with spk_id")
    return prompt, speaker


def _set_voice(mode: Message, prompt: bytes, speaker: str) -> None:
    if prompt:
        mode.prompt_audio.CopyFrom(tts_pb2.PromptAudio(data=prompt))
    else:
        mode.speaker_id = speaker


def decode(kind: str, request: Message) -> tts_pb2.SynthesizeRequest:
    """Turn an Inference*Request (query fields + raw body) into a SynthesizeRequest.

    Only the form of the request is checked here; its values are checked where every surface's
    are, by ``convert.to_engine_request(..., names=REST_NAMES)``.
    """
    endpoint = ENDPOINTS[kind]
    fields, files = _fields(endpoint, request)
    prompt, speaker = _voice(endpoint, fields, files) if endpoint.voice else (b"", "")

    msg = tts_pb2.SynthesizeRequest(text=fields.get("tts_text", ""))
    if kind == "sft":
        msg.sft.speaker_id = fields["spk_id"]
    elif kind == "zero_shot":
        # Whether the transcript goes with the voice is a request rule (tts_core.limits).
        msg.zero_shot.prompt_text = fields.get("prompt_text", "")
        _set_voice(msg.zero_shot, prompt, speaker)
    elif kind == "cross_lingual":
        _set_voice(msg.cross_lingual, prompt, speaker)
    elif kind == "instruct":
        msg.instruct.instruct_text = fields["instruct_text"]
        msg.instruct.speaker_id = fields["spk_id"]
    elif kind == "instruct2":
        msg.instruct.instruct_text = fields["instruct_text"]
        _set_voice(msg.instruct, prompt, speaker)
    else:
        source = files.get(SOURCE_FIELD, b"")
        if not source:
            raise bad_request(f"{endpoint.path} needs the speech to re-voice: upload it as the "
                              f"multipart file field {SOURCE_FIELD!r} (WAV, FLAC or OGG)")
        msg.voice_conversion.source_audio.CopyFrom(tts_pb2.PromptAudio(data=source))
        _set_voice(msg.voice_conversion, prompt, speaker)

    msg.sample_rate = _parse_int(fields.get("sample_rate", ""), "sample_rate",
                                 limits.REST_DEFAULT_SAMPLE_RATE)
    msg.speed = _parse_speed(fields.get("speed", ""))
    fmt = fields.get("format", "pcm").strip().lower() or "pcm"
    if fmt not in FORMAT_ENCODINGS:
        raise bad_request(f"format {fmt!r} is not offered: use pcm (raw 16-bit, the default), "
                          f"{', '.join(list(FORMAT_ENCODINGS)[1:])}")
    msg.encoding = FORMAT_ENCODINGS[fmt]
    stream = _parse_bool(fields.get("stream", ""), "stream")
    if stream is not None:
        msg.stream_within_sentence = stream
    return msg


def decode_register(request: Message) -> tts_pb2.RegisterSpeakerRequest:
    """Turn a RegisterSpeakerUploadRequest into the RegisterSpeakerRequest it stands for."""
    fields, files = _fields(REGISTER, request)
    prompt = files.get(PROMPT_FIELD, b"")
    if not prompt:
        raise bad_request(f"{REGISTER.path} needs the voice recording: upload it as the "
                          f"multipart file field {PROMPT_FIELD!r} (WAV, FLAC or OGG)")
    return tts_pb2.RegisterSpeakerRequest(
        speaker_id=fields["spk_id"], prompt_audio=tts_pb2.PromptAudio(data=prompt),
        prompt_text=fields.get("prompt_text", ""), language=fields.get("language", "").strip(),
        description=fields.get("description", ""),
        replace=bool(_parse_bool(fields.get("replace", ""), "replace")))


def _parse_bool(value: str, name: str) -> bool | None:
    value = value.strip().lower()
    if not value:
        return None
    if value not in _TRUE | _FALSE:
        raise bad_request(f"{name} must be true or false, not {value[:40]!r}")
    return value in _TRUE


_INTEGER = re.compile(r"[+-]?[0-9]+")
_DECIMAL = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def _parse_int(value: str, name: str, default: int) -> int:
    value = value.strip()
    if not value:
        return default
    if not _INTEGER.fullmatch(value):  # int() also takes "22_050" and non-ASCII digits
        raise bad_request(f"{name} must be a whole number of Hz, not {value[:40]!r}")
    number = int(value)
    if not -2**31 <= number < 2**31:  # the proto field is 32-bit: say so, never fail later
        raise bad_request(f"{name} {value[:20]!r} is out of range: use one of the output rates "
                          "listed by GET /v1/speakers (e.g. 22050)")
    return number


def _parse_speed(value: str) -> float:
    value = value.strip()
    if not value:
        return 1.0
    if not _DECIMAL.fullmatch(value):  # float() also takes "nan", "inf" and "1_0"
        raise bad_request(f"speed must be a number such as 1.0, not {value[:40]!r}")
    speed = float(value)
    if not math.isfinite(speed) or speed <= 0:
        raise bad_request(f"speed must be a positive number, not {value[:40]!r}")
    return speed


def _parse_body(content_type: str, data: bytes, endpoint: Endpoint
                ) -> tuple[dict[str, str], dict[str, bytes]]:
    """Return (text fields, files) from a raw request body."""
    if not data:
        return {}, {}
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
    return fields, files


def _collect(pairs: list[tuple[str, str]], files: list[tuple[str, bytes]],
             endpoint: Endpoint) -> tuple[dict[str, str], dict[str, bytes]]:
    fields: dict[str, str] = {}
    uploads: dict[str, bytes] = {}
    for name, value in pairs:
        if name in endpoint.files:
            raise bad_request(f"{name} must be uploaded as a file (multipart/form-data)")
        _check_name(name, endpoint)
        fields[name] = value
    for name, content in files:
        _check_file(name, endpoint)
        uploads[name] = content
    return fields, uploads


def _check_name(name: str, endpoint: Endpoint) -> None:
    if name in FILE_FIELDS:
        _check_file(name, endpoint)
    if name not in endpoint.fields:
        raise bad_request(f"unknown field {name!r} for {endpoint.path}; {endpoint.takes()}")


def _check_file(name: str, endpoint: Endpoint) -> None:
    if name in endpoint.files:
        return
    if name == PROMPT_FIELD:
        raise bad_request(f"{endpoint.path} takes no {PROMPT_FIELD}; use /inference_zero_shot, "
                          "/inference_cross_lingual or /inference_instruct2 for a cloned voice")
    if name == SOURCE_FIELD:
        raise bad_request(f"{endpoint.path} takes no {SOURCE_FIELD}; voice conversion is "
                          "/inference_vc")
    raise bad_request(f"unexpected file field {name!r} for {endpoint.path}; {endpoint.takes()}")


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

    ended = []

    def on_end() -> None:  # the closing delimiter "--BOUNDARY--" was read
        ended.append(True)

    callbacks = {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                 "on_header_value": on_header_value, "on_header_end": on_header_end,
                 "on_part_data": on_part_data, "on_end": on_end}
    parser = MultipartParser(boundary, callbacks)
    try:
        parser.write(data)
        parser.finalize()
    except MultipartParseError:
        # The parser's own wording (byte offsets, its state names) helps no client.
        raise bad_request("the multipart/form-data body is malformed: a part's headers or a "
                          "boundary line are not valid (each part needs 'Content-Disposition: "
                          "form-data; name=...' in ASCII)") from None
    if not ended:  # a cut-off upload must never be spoken as if it were whole
        raise bad_request("the multipart/form-data body is truncated: it ends before its closing "
                          "boundary line ('--' + boundary + '--'); send the whole body again")
    fields: list[tuple[str, str]] = []
    files: list[tuple[str, bytes]] = []
    for headers, content in parts:
        disposition, options = parse_options_header(headers.get("content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if disposition != b"form-data" or not name:
            raise bad_request("a multipart part lacks 'Content-Disposition: form-data; name=...'")
        if b"filename" in options or name in FILE_FIELDS:
            files.append((name, bytes(content)))
        else:
            try:
                fields.append((name, content.decode("utf-8")))
            except UnicodeDecodeError:
                raise bad_request(f"multipart field {name!r} is not UTF-8 text") from None
    return fields, files


def _parse_json(data: bytes, endpoint: Endpoint) -> tuple[dict[str, str], dict[str, bytes]]:
    obj = parse_json_object(data, '{"tts_text": "..."}')
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    for name, value in obj.items():
        if name in endpoint.files:
            if not isinstance(value, str):
                raise bad_request(f"{name} in JSON must be a base64 string")
            try:
                files[name] = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise bad_request(f"{name} is not valid base64") from None
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
