from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AudioEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUDIO_ENCODING_UNSPECIFIED: _ClassVar[AudioEncoding]
    AUDIO_ENCODING_PCM_S16LE: _ClassVar[AudioEncoding]
    AUDIO_ENCODING_WAV: _ClassVar[AudioEncoding]
    AUDIO_ENCODING_PCM_F32LE: _ClassVar[AudioEncoding]
    AUDIO_ENCODING_MP3: _ClassVar[AudioEncoding]
    AUDIO_ENCODING_OPUS: _ClassVar[AudioEncoding]
    AUDIO_ENCODING_AAC: _ClassVar[AudioEncoding]
    AUDIO_ENCODING_FLAC: _ClassVar[AudioEncoding]

class PromptAudioFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROMPT_AUDIO_FORMAT_UNSPECIFIED: _ClassVar[PromptAudioFormat]
    PROMPT_AUDIO_FORMAT_CONTAINER: _ClassVar[PromptAudioFormat]
    PROMPT_AUDIO_FORMAT_PCM_S16LE: _ClassVar[PromptAudioFormat]

class SynthesisMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SYNTHESIS_MODE_UNSPECIFIED: _ClassVar[SynthesisMode]
    SYNTHESIS_MODE_SFT: _ClassVar[SynthesisMode]
    SYNTHESIS_MODE_ZERO_SHOT: _ClassVar[SynthesisMode]
    SYNTHESIS_MODE_CROSS_LINGUAL: _ClassVar[SynthesisMode]
    SYNTHESIS_MODE_INSTRUCT: _ClassVar[SynthesisMode]
    SYNTHESIS_MODE_VOICE_CONVERSION: _ClassVar[SynthesisMode]
AUDIO_ENCODING_UNSPECIFIED: AudioEncoding
AUDIO_ENCODING_PCM_S16LE: AudioEncoding
AUDIO_ENCODING_WAV: AudioEncoding
AUDIO_ENCODING_PCM_F32LE: AudioEncoding
AUDIO_ENCODING_MP3: AudioEncoding
AUDIO_ENCODING_OPUS: AudioEncoding
AUDIO_ENCODING_AAC: AudioEncoding
AUDIO_ENCODING_FLAC: AudioEncoding
PROMPT_AUDIO_FORMAT_UNSPECIFIED: PromptAudioFormat
PROMPT_AUDIO_FORMAT_CONTAINER: PromptAudioFormat
PROMPT_AUDIO_FORMAT_PCM_S16LE: PromptAudioFormat
SYNTHESIS_MODE_UNSPECIFIED: SynthesisMode
SYNTHESIS_MODE_SFT: SynthesisMode
SYNTHESIS_MODE_ZERO_SHOT: SynthesisMode
SYNTHESIS_MODE_CROSS_LINGUAL: SynthesisMode
SYNTHESIS_MODE_INSTRUCT: SynthesisMode
SYNTHESIS_MODE_VOICE_CONVERSION: SynthesisMode

class PromptAudio(_message.Message):
    __slots__ = ("data", "format", "sample_rate")
    DATA_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    format: PromptAudioFormat
    sample_rate: int
    def __init__(self, data: _Optional[bytes] = ..., format: _Optional[_Union[PromptAudioFormat, str]] = ..., sample_rate: _Optional[int] = ...) -> None: ...

class SftMode(_message.Message):
    __slots__ = ("speaker_id",)
    SPEAKER_ID_FIELD_NUMBER: _ClassVar[int]
    speaker_id: str
    def __init__(self, speaker_id: _Optional[str] = ...) -> None: ...

class ZeroShotMode(_message.Message):
    __slots__ = ("prompt_audio", "speaker_id", "prompt_text")
    PROMPT_AUDIO_FIELD_NUMBER: _ClassVar[int]
    SPEAKER_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    prompt_audio: PromptAudio
    speaker_id: str
    prompt_text: str
    def __init__(self, prompt_audio: _Optional[_Union[PromptAudio, _Mapping]] = ..., speaker_id: _Optional[str] = ..., prompt_text: _Optional[str] = ...) -> None: ...

class CrossLingualMode(_message.Message):
    __slots__ = ("prompt_audio", "speaker_id")
    PROMPT_AUDIO_FIELD_NUMBER: _ClassVar[int]
    SPEAKER_ID_FIELD_NUMBER: _ClassVar[int]
    prompt_audio: PromptAudio
    speaker_id: str
    def __init__(self, prompt_audio: _Optional[_Union[PromptAudio, _Mapping]] = ..., speaker_id: _Optional[str] = ...) -> None: ...

class InstructMode(_message.Message):
    __slots__ = ("instruct_text", "speaker_id", "prompt_audio")
    INSTRUCT_TEXT_FIELD_NUMBER: _ClassVar[int]
    SPEAKER_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_AUDIO_FIELD_NUMBER: _ClassVar[int]
    instruct_text: str
    speaker_id: str
    prompt_audio: PromptAudio
    def __init__(self, instruct_text: _Optional[str] = ..., speaker_id: _Optional[str] = ..., prompt_audio: _Optional[_Union[PromptAudio, _Mapping]] = ...) -> None: ...

class VoiceConversionMode(_message.Message):
    __slots__ = ("source_audio", "prompt_audio", "speaker_id")
    SOURCE_AUDIO_FIELD_NUMBER: _ClassVar[int]
    PROMPT_AUDIO_FIELD_NUMBER: _ClassVar[int]
    SPEAKER_ID_FIELD_NUMBER: _ClassVar[int]
    source_audio: PromptAudio
    prompt_audio: PromptAudio
    speaker_id: str
    def __init__(self, source_audio: _Optional[_Union[PromptAudio, _Mapping]] = ..., prompt_audio: _Optional[_Union[PromptAudio, _Mapping]] = ..., speaker_id: _Optional[str] = ...) -> None: ...

class SynthesizeRequest(_message.Message):
    __slots__ = ("text", "sft", "zero_shot", "cross_lingual", "instruct", "voice_conversion", "speed", "sample_rate", "encoding", "stream_within_sentence")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SFT_FIELD_NUMBER: _ClassVar[int]
    ZERO_SHOT_FIELD_NUMBER: _ClassVar[int]
    CROSS_LINGUAL_FIELD_NUMBER: _ClassVar[int]
    INSTRUCT_FIELD_NUMBER: _ClassVar[int]
    VOICE_CONVERSION_FIELD_NUMBER: _ClassVar[int]
    SPEED_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    STREAM_WITHIN_SENTENCE_FIELD_NUMBER: _ClassVar[int]
    text: str
    sft: SftMode
    zero_shot: ZeroShotMode
    cross_lingual: CrossLingualMode
    instruct: InstructMode
    voice_conversion: VoiceConversionMode
    speed: float
    sample_rate: int
    encoding: AudioEncoding
    stream_within_sentence: bool
    def __init__(self, text: _Optional[str] = ..., sft: _Optional[_Union[SftMode, _Mapping]] = ..., zero_shot: _Optional[_Union[ZeroShotMode, _Mapping]] = ..., cross_lingual: _Optional[_Union[CrossLingualMode, _Mapping]] = ..., instruct: _Optional[_Union[InstructMode, _Mapping]] = ..., voice_conversion: _Optional[_Union[VoiceConversionMode, _Mapping]] = ..., speed: _Optional[float] = ..., sample_rate: _Optional[int] = ..., encoding: _Optional[_Union[AudioEncoding, str]] = ..., stream_within_sentence: _Optional[bool] = ...) -> None: ...

class SynthesizeTextStreamRequest(_message.Message):
    __slots__ = ("config", "text")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    config: SynthesizeRequest
    text: str
    def __init__(self, config: _Optional[_Union[SynthesizeRequest, _Mapping]] = ..., text: _Optional[str] = ...) -> None: ...

class SynthesizeResponse(_message.Message):
    __slots__ = ("audio", "stats")
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    audio: AudioChunk
    stats: SynthesisStats
    def __init__(self, audio: _Optional[_Union[AudioChunk, _Mapping]] = ..., stats: _Optional[_Union[SynthesisStats, _Mapping]] = ...) -> None: ...

class AudioChunk(_message.Message):
    __slots__ = ("data", "sample_rate", "encoding", "index")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    sample_rate: int
    encoding: AudioEncoding
    index: int
    def __init__(self, data: _Optional[bytes] = ..., sample_rate: _Optional[int] = ..., encoding: _Optional[_Union[AudioEncoding, str]] = ..., index: _Optional[int] = ...) -> None: ...

class SynthesisStats(_message.Message):
    __slots__ = ("audio_seconds", "time_to_first_chunk_seconds", "total_seconds", "engine", "chunks", "sample_rate")
    AUDIO_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_CHUNK_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    audio_seconds: float
    time_to_first_chunk_seconds: float
    total_seconds: float
    engine: str
    chunks: int
    sample_rate: int
    def __init__(self, audio_seconds: _Optional[float] = ..., time_to_first_chunk_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ..., engine: _Optional[str] = ..., chunks: _Optional[int] = ..., sample_rate: _Optional[int] = ...) -> None: ...

class ListSpeakersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Speaker(_message.Message):
    __slots__ = ("id", "language", "description", "registered")
    ID_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    id: str
    language: str
    description: str
    registered: bool
    def __init__(self, id: _Optional[str] = ..., language: _Optional[str] = ..., description: _Optional[str] = ..., registered: _Optional[bool] = ...) -> None: ...

class ModeSupport(_message.Message):
    __slots__ = ("mode", "supported", "reason")
    MODE_FIELD_NUMBER: _ClassVar[int]
    SUPPORTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    mode: SynthesisMode
    supported: bool
    reason: str
    def __init__(self, mode: _Optional[_Union[SynthesisMode, str]] = ..., supported: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class ServiceLimits(_message.Message):
    __slots__ = ("max_text_chars", "max_upload_bytes", "max_prompt_seconds", "min_prompt_seconds", "output_sample_rates", "min_input_sample_rate", "max_input_sample_rate", "min_speed", "max_speed", "max_stream_text_chars", "text_stream_idle_seconds")
    MAX_TEXT_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_UPLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MIN_PROMPT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SAMPLE_RATES_FIELD_NUMBER: _ClassVar[int]
    MIN_INPUT_SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUT_SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    MIN_SPEED_FIELD_NUMBER: _ClassVar[int]
    MAX_SPEED_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAM_TEXT_CHARS_FIELD_NUMBER: _ClassVar[int]
    TEXT_STREAM_IDLE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    max_text_chars: int
    max_upload_bytes: int
    max_prompt_seconds: float
    min_prompt_seconds: float
    output_sample_rates: _containers.RepeatedScalarFieldContainer[int]
    min_input_sample_rate: int
    max_input_sample_rate: int
    min_speed: float
    max_speed: float
    max_stream_text_chars: int
    text_stream_idle_seconds: float
    def __init__(self, max_text_chars: _Optional[int] = ..., max_upload_bytes: _Optional[int] = ..., max_prompt_seconds: _Optional[float] = ..., min_prompt_seconds: _Optional[float] = ..., output_sample_rates: _Optional[_Iterable[int]] = ..., min_input_sample_rate: _Optional[int] = ..., max_input_sample_rate: _Optional[int] = ..., min_speed: _Optional[float] = ..., max_speed: _Optional[float] = ..., max_stream_text_chars: _Optional[int] = ..., text_stream_idle_seconds: _Optional[float] = ...) -> None: ...

class ListSpeakersResponse(_message.Message):
    __slots__ = ("speakers", "engine", "sample_rate", "modes", "supports_speaker_registration", "limits", "supports_text_streaming")
    SPEAKERS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    MODES_FIELD_NUMBER: _ClassVar[int]
    SUPPORTS_SPEAKER_REGISTRATION_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    SUPPORTS_TEXT_STREAMING_FIELD_NUMBER: _ClassVar[int]
    speakers: _containers.RepeatedCompositeFieldContainer[Speaker]
    engine: str
    sample_rate: int
    modes: _containers.RepeatedCompositeFieldContainer[ModeSupport]
    supports_speaker_registration: bool
    limits: ServiceLimits
    supports_text_streaming: bool
    def __init__(self, speakers: _Optional[_Iterable[_Union[Speaker, _Mapping]]] = ..., engine: _Optional[str] = ..., sample_rate: _Optional[int] = ..., modes: _Optional[_Iterable[_Union[ModeSupport, _Mapping]]] = ..., supports_speaker_registration: _Optional[bool] = ..., limits: _Optional[_Union[ServiceLimits, _Mapping]] = ..., supports_text_streaming: _Optional[bool] = ...) -> None: ...

class GetServerStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetServerStatusResponse(_message.Message):
    __slots__ = ("engine", "uptime_seconds", "max_concurrent", "max_queue", "active_syntheses", "queued_syntheses", "started_total", "completed_total", "cancelled_total", "failed_total", "rejected_total", "engine_chunks_total", "max_batch", "batch_occupancy")
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SYNTHESES_FIELD_NUMBER: _ClassVar[int]
    QUEUED_SYNTHESES_FIELD_NUMBER: _ClassVar[int]
    STARTED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    FAILED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REJECTED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ENGINE_CHUNKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    BATCH_OCCUPANCY_FIELD_NUMBER: _ClassVar[int]
    engine: str
    uptime_seconds: float
    max_concurrent: int
    max_queue: int
    active_syntheses: int
    queued_syntheses: int
    started_total: int
    completed_total: int
    cancelled_total: int
    failed_total: int
    rejected_total: int
    engine_chunks_total: int
    max_batch: int
    batch_occupancy: int
    def __init__(self, engine: _Optional[str] = ..., uptime_seconds: _Optional[float] = ..., max_concurrent: _Optional[int] = ..., max_queue: _Optional[int] = ..., active_syntheses: _Optional[int] = ..., queued_syntheses: _Optional[int] = ..., started_total: _Optional[int] = ..., completed_total: _Optional[int] = ..., cancelled_total: _Optional[int] = ..., failed_total: _Optional[int] = ..., rejected_total: _Optional[int] = ..., engine_chunks_total: _Optional[int] = ..., max_batch: _Optional[int] = ..., batch_occupancy: _Optional[int] = ...) -> None: ...

class RegisterSpeakerRequest(_message.Message):
    __slots__ = ("speaker_id", "prompt_audio", "prompt_text", "language", "description", "replace")
    SPEAKER_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_AUDIO_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    speaker_id: str
    prompt_audio: PromptAudio
    prompt_text: str
    language: str
    description: str
    replace: bool
    def __init__(self, speaker_id: _Optional[str] = ..., prompt_audio: _Optional[_Union[PromptAudio, _Mapping]] = ..., prompt_text: _Optional[str] = ..., language: _Optional[str] = ..., description: _Optional[str] = ..., replace: _Optional[bool] = ...) -> None: ...

class RegisterSpeakerResponse(_message.Message):
    __slots__ = ("speaker",)
    SPEAKER_FIELD_NUMBER: _ClassVar[int]
    speaker: Speaker
    def __init__(self, speaker: _Optional[_Union[Speaker, _Mapping]] = ...) -> None: ...

class DeleteSpeakerRequest(_message.Message):
    __slots__ = ("speaker_id",)
    SPEAKER_ID_FIELD_NUMBER: _ClassVar[int]
    speaker_id: str
    def __init__(self, speaker_id: _Optional[str] = ...) -> None: ...

class DeleteSpeakerResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
