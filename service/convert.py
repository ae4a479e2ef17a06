"""Turns a SynthesizeRequest message into the engine's SynthesisRequest.

Every synthesis call ends here (native gRPC and, through ``compat``, the reference REST API):
this module reads the message's structure (which mode, which voice, which output) and decodes
its audio; the rules on the values (text length, speed, transcripts, instructions) are
``tts_core.limits.check_request``, which the engines run as well. The engine's own checks (mode
capability 501, speaker 404) follow in the server. Every cloning mode takes its voice either as
prompt audio or as the id of a registered speaker (``SynthesisRequest.speaker_id``).
"""

from __future__ import annotations

from dataclasses import dataclass

from service import limits as service_limits
from service.audio import decode_audio
from service.errors import bad_request, from_engine_error
from service.gen.cosyvoice.v1 import tts_pb2
from tts_core import limits
from tts_core.engine import Audio, EngineError, Mode, SynthesisRequest

AudioEncoding = tts_pb2.AudioEncoding
_MODE_FIELDS = ("sft", "zero_shot", "cross_lingual", "instruct", "voice_conversion")
# How the proto spells the fields the rules talk about.
GRPC_NAMES = limits.FieldNames(prompt="prompt_audio")


@dataclass(frozen=True)
class OutputSpec:
    sample_rate: int  # 0: the engine's native rate
    encoding: int  # an AudioEncoding value


def check_rules(request: SynthesisRequest, names: limits.FieldNames = GRPC_NAMES, *,
                streamed_text: bool = False) -> SynthesisRequest:
    """``tts_core.limits.check_request`` with its errors as the client hears them."""
    try:
        limits.check_request(request, names, streamed_text=streamed_text)
    except EngineError as error:
        raise from_engine_error(error) from None
    return request


def speed(value: float) -> float:
    """The proto's speed (0: not set, i.e. normal) checked against the one speed rule."""
    try:
        return limits.check_speed(value or 1.0)
    except EngineError as error:
        raise from_engine_error(error) from None


def check_output_rate(rate: int) -> int:
    if rate != 0 and rate not in service_limits.OUTPUT_SAMPLE_RATES:
        allowed = ", ".join(str(r) for r in service_limits.OUTPUT_SAMPLE_RATES)
        raise bad_request(f"sample_rate {rate} is not offered: choose one of {allowed}")
    return rate


def _audio(message: tts_pb2.PromptAudio, what: str, has: bool,
           min_seconds: float = limits.MIN_PROMPT_SECONDS) -> Audio:
    if not has:
        raise bad_request(f"{what} is required for this mode")
    return decode_audio(message.data, message.format, message.sample_rate, what=what,
                        min_seconds=min_seconds)


def _voice(message, mode: str) -> tuple[Audio | None, str]:
    """The ``voice`` oneof of a mode message: (prompt, "") or (None, speaker_id)."""
    voice = message.WhichOneof("voice")
    if voice == "prompt_audio":
        return _audio(message.prompt_audio, "prompt audio", True), ""
    if voice == "speaker_id" and message.speaker_id.strip():
        return None, message.speaker_id.strip()
    raise bad_request(f"{mode} needs a voice: set speaker_id or prompt_audio (the id of a "
                      "registered speaker, or a recording of the voice)")


def to_engine_request(msg: tts_pb2.SynthesizeRequest, *, streamed_text: bool = False,
                      names: limits.FieldNames = GRPC_NAMES
                      ) -> tuple[SynthesisRequest, OutputSpec]:
    """Check ``msg`` and build the engine request (raises ServiceError).

    ``streamed_text``: the config of SynthesizeTextStream, whose text arrives later (``text`` is
    optional and voice_conversion, which speaks no text, is refused).
    """
    mode_field = msg.WhichOneof("mode")
    if mode_field is None:
        raise bad_request(f"no mode given: set one of {', '.join(_MODE_FIELDS)}")
    if streamed_text and mode_field == "voice_conversion":
        raise bad_request("voice_conversion re-voices source audio and takes no text: use "
                          "Synthesize for it")
    if msg.encoding not in AudioEncoding.values():
        raise bad_request(f"unknown encoding {msg.encoding}")
    output = OutputSpec(check_output_rate(msg.sample_rate), msg.encoding)
    stream = msg.stream_within_sentence if msg.HasField("stream_within_sentence") else True
    common = dict(text=msg.text, speed=speed(msg.speed), stream=stream)

    if mode_field == "sft":
        speaker = msg.sft.speaker_id.strip()
        if not speaker:
            raise bad_request("sft needs speaker_id: a preset or registered speaker (see "
                              "ListSpeakers)")
        request = SynthesisRequest(mode=Mode.SFT, speaker_id=speaker, **common)
    elif mode_field == "zero_shot":
        prompt, speaker = _voice(msg.zero_shot, "zero_shot")
        request = SynthesisRequest(mode=Mode.ZERO_SHOT, prompt=prompt, speaker_id=speaker,
                                   prompt_text=msg.zero_shot.prompt_text, **common)
    elif mode_field == "cross_lingual":
        prompt, speaker = _voice(msg.cross_lingual, "cross_lingual")
        request = SynthesisRequest(mode=Mode.CROSS_LINGUAL, prompt=prompt, speaker_id=speaker,
                                   **common)
    elif mode_field == "instruct":
        prompt, speaker = _voice(msg.instruct, "instruct")
        request = SynthesisRequest(mode=Mode.INSTRUCT, prompt=prompt, speaker_id=speaker,
                                   instruct_text=msg.instruct.instruct_text, **common)
    else:
        vc = msg.voice_conversion
        source = _audio(vc.source_audio, "source audio", vc.HasField("source_audio"),
                        limits.MIN_SOURCE_SECONDS)
        prompt, speaker = _voice(vc, "voice_conversion")
        request = SynthesisRequest(mode=Mode.VOICE_CONVERSION, source=source, prompt=prompt,
                                   speaker_id=speaker, **common)
    return check_rules(request, names, streamed_text=streamed_text), output
