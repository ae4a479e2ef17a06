from service.gen.cosyvoice.v1 import tts_pb2 as _tts_pb2
from google.api import annotations_pb2 as _annotations_pb2
from google.api import httpbody_pb2 as _httpbody_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InferenceSftRequest(_message.Message):
    __slots__ = ("body", "tts_text", "spk_id", "sample_rate", "speed", "format", "stream")
    BODY_FIELD_NUMBER: _ClassVar[int]
    TTS_TEXT_FIELD_NUMBER: _ClassVar[int]
    SPK_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    SPEED_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    body: _httpbody_pb2.HttpBody
    tts_text: str
    spk_id: str
    sample_rate: str
    speed: str
    format: str
    stream: str
    def __init__(self, body: _Optional[_Union[_httpbody_pb2.HttpBody, _Mapping]] = ..., tts_text: _Optional[str] = ..., spk_id: _Optional[str] = ..., sample_rate: _Optional[str] = ..., speed: _Optional[str] = ..., format: _Optional[str] = ..., stream: _Optional[str] = ...) -> None: ...

class InferenceZeroShotRequest(_message.Message):
    __slots__ = ("body", "tts_text", "spk_id", "prompt_text", "sample_rate", "speed", "format", "stream")
    BODY_FIELD_NUMBER: _ClassVar[int]
    TTS_TEXT_FIELD_NUMBER: _ClassVar[int]
    SPK_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    SPEED_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    body: _httpbody_pb2.HttpBody
    tts_text: str
    spk_id: str
    prompt_text: str
    sample_rate: str
    speed: str
    format: str
    stream: str
    def __init__(self, body: _Optional[_Union[_httpbody_pb2.HttpBody, _Mapping]] = ..., tts_text: _Optional[str] = ..., spk_id: _Optional[str] = ..., prompt_text: _Optional[str] = ..., sample_rate: _Optional[str] = ..., speed: _Optional[str] = ..., format: _Optional[str] = ..., stream: _Optional[str] = ...) -> None: ...

class InferenceCrossLingualRequest(_message.Message):
    __slots__ = ("body", "tts_text", "spk_id", "sample_rate", "speed", "format", "stream")
    BODY_FIELD_NUMBER: _ClassVar[int]
    TTS_TEXT_FIELD_NUMBER: _ClassVar[int]
    SPK_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    SPEED_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    body: _httpbody_pb2.HttpBody
    tts_text: str
    spk_id: str
    sample_rate: str
    speed: str
    format: str
    stream: str
    def __init__(self, body: _Optional[_Union[_httpbody_pb2.HttpBody, _Mapping]] = ..., tts_text: _Optional[str] = ..., spk_id: _Optional[str] = ..., sample_rate: _Optional[str] = ..., speed: _Optional[str] = ..., format: _Optional[str] = ..., stream: _Optional[str] = ...) -> None: ...

class InferenceInstructRequest(_message.Message):
    __slots__ = ("body", "tts_text", "spk_id", "instruct_text", "sample_rate", "speed", "format", "stream")
    BODY_FIELD_NUMBER: _ClassVar[int]
    TTS_TEXT_FIELD_NUMBER: _ClassVar[int]
    SPK_ID_FIELD_NUMBER: _ClassVar[int]
    INSTRUCT_TEXT_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    SPEED_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    body: _httpbody_pb2.HttpBody
    tts_text: str
    spk_id: str
    instruct_text: str
    sample_rate: str
    speed: str
    format: str
    stream: str
    def __init__(self, body: _Optional[_Union[_httpbody_pb2.HttpBody, _Mapping]] = ..., tts_text: _Optional[str] = ..., spk_id: _Optional[str] = ..., instruct_text: _Optional[str] = ..., sample_rate: _Optional[str] = ..., speed: _Optional[str] = ..., format: _Optional[str] = ..., stream: _Optional[str] = ...) -> None: ...

class InferenceInstruct2Request(_message.Message):
    __slots__ = ("body", "tts_text", "spk_id", "instruct_text", "sample_rate", "speed", "format", "stream")
    BODY_FIELD_NUMBER: _ClassVar[int]
    TTS_TEXT_FIELD_NUMBER: _ClassVar[int]
    SPK_ID_FIELD_NUMBER: _ClassVar[int]
    INSTRUCT_TEXT_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    SPEED_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    body: _httpbody_pb2.HttpBody
    tts_text: str
    spk_id: str
    instruct_text: str
    sample_rate: str
    speed: str
    format: str
    stream: str
    def __init__(self, body: _Optional[_Union[_httpbody_pb2.HttpBody, _Mapping]] = ..., tts_text: _Optional[str] = ..., spk_id: _Optional[str] = ..., instruct_text: _Optional[str] = ..., sample_rate: _Optional[str] = ..., speed: _Optional[str] = ..., format: _Optional[str] = ..., stream: _Optional[str] = ...) -> None: ...

class InferenceVcRequest(_message.Message):
    __slots__ = ("body", "spk_id", "sample_rate", "speed", "format", "stream")
    BODY_FIELD_NUMBER: _ClassVar[int]
    SPK_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    SPEED_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    body: _httpbody_pb2.HttpBody
    spk_id: str
    sample_rate: str
    speed: str
    format: str
    stream: str
    def __init__(self, body: _Optional[_Union[_httpbody_pb2.HttpBody, _Mapping]] = ..., spk_id: _Optional[str] = ..., sample_rate: _Optional[str] = ..., speed: _Optional[str] = ..., format: _Optional[str] = ..., stream: _Optional[str] = ...) -> None: ...

class RegisterSpeakerUploadRequest(_message.Message):
    __slots__ = ("body", "spk_id", "prompt_text", "language", "description", "replace")
    BODY_FIELD_NUMBER: _ClassVar[int]
    SPK_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    body: _httpbody_pb2.HttpBody
    spk_id: str
    prompt_text: str
    language: str
    description: str
    replace: str
    def __init__(self, body: _Optional[_Union[_httpbody_pb2.HttpBody, _Mapping]] = ..., spk_id: _Optional[str] = ..., prompt_text: _Optional[str] = ..., language: _Optional[str] = ..., description: _Optional[str] = ..., replace: _Optional[str] = ...) -> None: ...
