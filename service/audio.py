"""Audio in and out of the service: decoding uploads, resampling and encoding output chunks."""

from __future__ import annotations

import io
import struct

import numpy as np
import soundfile
import soxr

from service import limits as service_limits
from service.errors import bad_request, too_large
from service.gen.cosyvoice.v1 import tts_pb2
from tts_core import limits
from tts_core.engine import Audio

PromptAudioFormat = tts_pb2.PromptAudioFormat
AudioEncoding = tts_pb2.AudioEncoding


def decode_audio(data: bytes, fmt: int = PromptAudioFormat.PROMPT_AUDIO_FORMAT_UNSPECIFIED,
                 sample_rate: int = 0, *, what: str = "prompt audio",
                 min_seconds: float = limits.MIN_PROMPT_SECONDS) -> Audio:
    """Decode an upload into mono float32; raises a ServiceError a person can act on.

    ``min_seconds``: the shortest audio accepted (prompts and voice-conversion sources differ).
    """
    max_bytes = service_limits.MAX_UPLOAD_BYTES
    if not data:
        raise bad_request(f"{what} is missing or empty: upload a WAV/FLAC/OGG file")
    if len(data) > max_bytes:
        raise too_large(f"{what} is {len(data)} bytes; the limit is {max_bytes} "
                        f"bytes ({max_bytes // (1024 * 1024)} MiB)")
    if fmt == PromptAudioFormat.PROMPT_AUDIO_FORMAT_PCM_S16LE:
        _check_input_rate(sample_rate, what, "set sample_rate for raw PCM")
        if len(data) % 2:
            raise bad_request(f"{what} is raw 16-bit PCM but has an odd number of bytes")
        samples = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
        rate = sample_rate
    elif fmt in (PromptAudioFormat.PROMPT_AUDIO_FORMAT_UNSPECIFIED,
                 PromptAudioFormat.PROMPT_AUDIO_FORMAT_CONTAINER):
        samples, rate = _read_container(data, what)
    else:
        raise bad_request(f"{what}: unknown format {fmt}")
    audio = Audio(samples=np.ascontiguousarray(samples, dtype=np.float32), sample_rate=int(rate))
    if not np.isfinite(audio.samples).all():
        raise bad_request(f"{what} contains NaN or infinite samples")
    _check_max_duration(audio.duration, what)
    if audio.duration < min_seconds:
        raise bad_request(f"{what} is {audio.duration:.2f} s long; at least "
                          f"{min_seconds:g} s of speech is needed")
    return audio


# How the containers libsndfile reads begin, to tell a damaged file from a foreign one.
_CONTAINER_MAGIC = ((b"RIFF", "WAV"), (b"RF64", "WAV"), (b"fLaC", "FLAC"), (b"OggS", "OGG"),
                    (b"FORM", "AIFF"), (b"ID3", "MP3"), (b"\xff\xfb", "MP3"))


def _read_container(data: bytes, what: str) -> tuple[np.ndarray, int]:
    """Mono float32 samples and the rate of a WAV/FLAC/OGG/... file."""
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as file:
            # Checked from the header, before decoding: a compressed upload within the byte
            # limit can hold hours of many-channel audio, gigabytes once decoded.
            _check_input_rate(file.samplerate, what, "resample the file")
            _check_max_duration(file.frames / file.samplerate, what)
            if file.channels > service_limits.MAX_INPUT_CHANNELS:
                raise bad_request(f"{what} has {file.channels} channels; at most "
                                  f"{service_limits.MAX_INPUT_CHANNELS} are accepted (mono is "
                                  "best)")
            samples = file.read(dtype="float32", always_2d=True)
            rate = file.samplerate
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError):
        # libsndfile's own text names its internals (chunk names, "W64/RF64"): say instead
        # what the bytes look like.
        kind = next((name for magic, name in _CONTAINER_MAGIC if data.startswith(magic)), None)
        reason = (f"it starts like a {kind} file but is damaged or cut short" if kind else
                  "its format is not recognised")
        raise bad_request(f"{what} could not be decoded: {reason}; send a WAV, FLAC or OGG "
                          "file, or raw 16-bit PCM with its sample rate") from None
    return samples.mean(axis=1, dtype=np.float32), rate  # down-mixed to mono


def _check_max_duration(seconds: float, what: str) -> None:
    if seconds > limits.MAX_PROMPT_SECONDS:
        raise too_large(f"{what} is {seconds:.1f} s long; the limit is "
                        f"{limits.MAX_PROMPT_SECONDS:g} s: cut it to a shorter clip")


def _check_input_rate(rate: int, what: str, hint: str) -> None:
    if not limits.MIN_INPUT_SAMPLE_RATE <= rate <= limits.MAX_INPUT_SAMPLE_RATE:
        raise bad_request(f"{what} has sample rate {rate} Hz; accepted are "
                          f"{limits.MIN_INPUT_SAMPLE_RATE} to {limits.MAX_INPUT_SAMPLE_RATE} Hz "
                          f"({hint})")


def wav_stream_header(sample_rate: int, bits: int = 16) -> bytes:
    """A 44-byte WAV header for a stream of unknown length (size fields 0xFFFFFFFF)."""
    unknown = 0xFFFFFFFF
    block_align = bits // 8
    return (b"RIFF" + struct.pack("<I", unknown) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate,
                                    sample_rate * block_align, block_align, bits)
            + b"data" + struct.pack("<I", unknown))


def to_s16le(samples: np.ndarray) -> bytes:
    clipped = np.clip(samples, -1.0, 1.0)
    return (clipped * 32767.0).round().astype("<i2").tobytes()


# Format names of the HTTP APIs (REST ``format=``, OpenAI ``response_format``) and the
# encodings they stand for; encoding.py makes every one of them but float PCM.
FORMAT_ENCODINGS = {
    "pcm": AudioEncoding.AUDIO_ENCODING_PCM_S16LE,
    "wav": AudioEncoding.AUDIO_ENCODING_WAV,
    "mp3": AudioEncoding.AUDIO_ENCODING_MP3,
    "opus": AudioEncoding.AUDIO_ENCODING_OPUS,
    "aac": AudioEncoding.AUDIO_ENCODING_AAC,
    "flac": AudioEncoding.AUDIO_ENCODING_FLAC,
}


class OutputEncoder:
    """Turns engine chunks (float32, native rate) into the bytes a client asked for.

    The resampler is a soxr stream that keeps state across chunks, so joins are seamless; the
    codecs are the streaming encoders of ``service.encoding`` (one per call).
    """

    def __init__(self, native_rate: int, output_rate: int, encoding: int):
        from service.encoding import AudioFormat, open_encoder

        self.native_rate = native_rate
        requested_rate = output_rate or native_rate
        self.encoding = encoding or AudioEncoding.AUDIO_ENCODING_PCM_S16LE
        self._resampler = (soxr.ResampleStream(native_rate, requested_rate, 1, dtype="float32",
                                               quality="HQ")
                           if requested_rate != native_rate else None)
        if self.encoding == AudioEncoding.AUDIO_ENCODING_PCM_F32LE:
            self._codec = None
            self.output_rate = requested_rate
            self.content_type = f"audio/x-f32le; rate={requested_rate}; channels=1"
        else:
            name = next(n for n, e in FORMAT_ENCODINGS.items() if e == self.encoding)
            self._codec = open_encoder(AudioFormat(name), requested_rate)
            self.output_rate = self._codec.sample_rate  # Opus may code another rate
            self.content_type = self._codec.content_type
        # Codecs cost real CPU per chunk: the server runs them off its event loop.
        self.compressed = self.encoding not in (AudioEncoding.AUDIO_ENCODING_PCM_S16LE,
                                                AudioEncoding.AUDIO_ENCODING_WAV,
                                                AudioEncoding.AUDIO_ENCODING_PCM_F32LE)

    def encode(self, chunk: np.ndarray, *, last: bool = False) -> bytes:
        samples = np.asarray(chunk, dtype=np.float32).reshape(-1)
        if self._resampler is not None:
            samples = self._resampler.resample_chunk(samples, last=last)
        if self._codec is None:
            return samples.astype("<f4").tobytes()
        return self._codec.encode(samples)

    def finish(self) -> bytes:
        """Whatever the resampler and the codec still hold, and the stream's trailer."""
        data = self.encode(np.zeros(0, dtype=np.float32), last=True)
        return data + (self._codec.finish() if self._codec is not None else b"")
