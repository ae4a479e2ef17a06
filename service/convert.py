"""Checks a SynthesizeRequest message and turns it into the engine's SynthesisRequest.

Both native synthesis calls and the REST compatibility calls end here, so every request is
checked by the same code: fields and limits first (400/413), then the engine's own checks
(mode capability 501, speaker 404) in the servicer. Every cloning mode takes its voice either as
prompt audio or as the id of a registered speaker (``SynthesisRequest.speaker_id``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from service import limits
from service.audio import decode_audio
from service.errors import bad_request, too_large
from service.gen.cosyvoice.v1 import tts_pb2
from tts_core.engine import Audio, Mode, SynthesisRequest

AudioEncoding = tts_pb2.AudioEncoding
_MODE_FIELDS = ("sft", "zero_shot", "cross_lingual", "instruct", "voice_conversion")


@dataclass(frozen=True)
class OutputSpec:
    sample_rate: int  # 0: the engine's native rate
    encoding: int  # an AudioEncoding value


def _check_text(value: str, name: str, max_chars: int, *, required: bool) -> str:
    if required and not value.strip():
        raise bad_request(f"{name} is empty: give the text to use")
    if len(value) > max_chars:
        raise too_large(f"{name} has {len(value)} characters; the limit is {max_chars}: "
                        "split it into several requests")
    return value


def _prompt(message: tts_pb2.PromptAudio, what: str, has: bool) -> Audio:
    if not has:
        raise bad_request(f"{what} is required for this mode")
    return decode_audio(message.data, message.format, message.sample_rate, what=what)


def check_speed(speed: float) -> float:
    if speed == 0:
        return 1.0
    if not math.isfinite(speed) or not limits.MIN_SPEED <= speed <= limits.MAX_SPEED:
        raise bad_request(f"speed {speed:g} is out of range: use {limits.MIN_SPEED:g} to "
                          f"{limits.MAX_SPEED:g} (1.0 is normal)")
    return float(speed)


def check_output_rate(rate: int) -> int:
    if rate != 0 and rate not in limits.OUTPUT_SAMPLE_RATES:
        allowed = ", ".join(str(r) for r in limits.OUTPUT_SAMPLE_RATES)
        raise bad_request(f"sample_rate {rate} is not offered: choose one of {allowed}")
    return rate


def _speaker_id(value: str) -> str:
    return _check_text(value, "speaker_id", limits.MAX_SPEAKER_ID_CHARS, required=True).strip()


def _voice(message, mode: str) -> tuple[Audio | None, str]:
    """The ``voice`` oneof of a mode message: (prompt, "") or (None, speaker_id)."""
    voice = message.WhichOneof("voice")
    if voice == "prompt_audio":
        return _prompt(message.prompt_audio, "prompt audio", True), ""
    if voice == "speaker_id":
        return None, _speaker_id(message.speaker_id)
    raise bad_request(f"{mode} needs a voice: set speaker_id or prompt_audio (the id of a "
                      "registered speaker, or a recording of the voice)")


def to_engine_request(msg: tts_pb2.SynthesizeRequest, *, streamed_text: bool = False
                      ) -> tuple[SynthesisRequest, OutputSpec]:
    """Check ``msg`` and build the engine request.

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
    speed = check_speed(msg.speed)
    stream = msg.stream_within_sentence if msg.HasField("stream_within_sentence") else True
    needs_text = mode_field != "voice_conversion" and not streamed_text
    text = _check_text(msg.text, "text", limits.MAX_TEXT_CHARS, required=needs_text)
    common = dict(text=text, speed=speed, stream=stream)

    if mode_field == "sft":
        request = SynthesisRequest(mode=Mode.SFT, speaker_id=_speaker_id(msg.sft.speaker_id),
                                   **common)
    elif mode_field == "zero_shot":
        zs = msg.zero_shot
        prompt, speaker = _voice(zs, "zero_shot")
        if prompt is not None:
            prompt_text = _check_text(zs.prompt_text, "prompt_text",
                                      limits.MAX_PROMPT_TEXT_CHARS, required=True)
        elif zs.prompt_text.strip():
            raise bad_request("prompt_text goes with prompt_audio; with speaker_id leave it "
                              "empty (the registered speaker's own transcript is used)")
        else:
            prompt_text = ""
        request = SynthesisRequest(mode=Mode.ZERO_SHOT, prompt=prompt, speaker_id=speaker,
                                   prompt_text=prompt_text, **common)
    elif mode_field == "cross_lingual":
        prompt, speaker = _voice(msg.cross_lingual, "cross_lingual")
        request = SynthesisRequest(mode=Mode.CROSS_LINGUAL, prompt=prompt, speaker_id=speaker,
                                   **common)
    elif mode_field == "instruct":
        ins = msg.instruct
        instruct_text = _check_text(ins.instruct_text, "instruct_text",
                                    limits.MAX_INSTRUCT_TEXT_CHARS, required=True)
        prompt, speaker = _voice(ins, "instruct")
        request = SynthesisRequest(mode=Mode.INSTRUCT, prompt=prompt, speaker_id=speaker,
                                   instruct_text=instruct_text, **common)
    else:
        vc = msg.voice_conversion
        source = _prompt(vc.source_audio, "source audio", vc.HasField("source_audio"))
        prompt, speaker = _voice(vc, "voice_conversion")
        request = SynthesisRequest(mode=Mode.VOICE_CONVERSION, source=source, prompt=prompt,
                                   speaker_id=speaker, **common)
    return request, output
