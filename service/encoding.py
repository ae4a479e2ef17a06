"""Streaming audio encoders: engine samples in, bytes ready to send out, one encoder per request.

Raw PCM and WAV are written here (16-bit, see `service.audio`); mp3, Opus, AAC and FLAC are encoded
and muxed by the FFmpeg libraries bundled in PyAV's wheel (libmp3lame, libopus, FFmpeg's native
AAC and FLAC encoders). Every format is streamable: each `encode` call returns whatever the muxer
has completed so far, so a client can start playing (or stop reading) at any chunk boundary. The
container header waits for the first audio, so the first non-empty chunk is playable on its own.

| format | container | content type | encoded rate | bit rate | extra audio when decoded |
|---|---|---|---|---|---|
| pcm | none (s16le) | audio/L16; rate=R; channels=1 | R | 16 bit * R | none |
| wav | RIFF, sizes 0xFFFFFFFF | audio/wav | R | 16 bit * R | none |
| flac | native FLAC | audio/flac | R | lossless | none |
| mp3 | MPEG audio frames | audio/mpeg | R | 64 kbit/s | 1105 samples first, padding |
| aac | ADTS (AAC-LC) | audio/aac | R | 64 kbit/s (32 at 8 kHz) | 1024 samples first, padding |
| opus | Ogg | audio/ogg; codecs=opus | R or 24/48 kHz | 32 kbit/s | none (pre-skip, end trim) |

mp3 and ADTS cannot signal the encoder delay in a stream (mp3's LAME/Xing header is only written
by seeking back to the start of a file), so their decoders return a little silence first; Ogg
Opus carries pre-skip and the exact end in its granule positions, so it decodes to the input's
length. Opus codes only 8, 12, 16, 24 and 48 kHz: 22050 Hz input is resampled to 24000 Hz and
44100 Hz to 48000 Hz (soxr, streaming, so chunk joins stay seamless); `sample_rate` says which.
Decoders return Opus at 48 kHz whatever the encoded rate (its header records the original rate).
A stream with no samples at all is the header alone (WAV, FLAC, Ogg) or empty (pcm, mp3, AAC).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from fractions import Fraction

import av
import numpy as np
import soxr

from service.audio import to_s16le, wav_stream_header
from service.limits import OUTPUT_SAMPLE_RATES


class AudioFormat(StrEnum):
    PCM = "pcm"
    WAV = "wav"
    MP3 = "mp3"
    OPUS = "opus"
    AAC = "aac"
    FLAC = "flac"


# Ogg pages are closed at this duration, and FFmpeg's Ogg muxer holds the last closed page back
# (so it can carry the end-of-stream flag): audio leaves the encoder at most about twice this
# late. Shorter pages cost 27 header bytes each (~2 kbit/s at 100 ms against 32 kbit/s of Opus).
OGG_PAGE_SECONDS = 0.1

def open_encoder(fmt: AudioFormat | str, sample_rate: int) -> StreamingEncoder:
    """A fresh encoder for one stream of mono float32 audio at `sample_rate` Hz.

    Raises ValueError for an unknown format or a sample rate outside `OUTPUT_SAMPLE_RATES`.
    """
    try:
        fmt = AudioFormat(fmt)
    except ValueError:
        names = ", ".join(f.value for f in AudioFormat)
        raise ValueError(f"unknown audio format {fmt!r}; supported formats: {names}") from None
    if isinstance(sample_rate, bool) or sample_rate not in OUTPUT_SAMPLE_RATES:
        rates = ", ".join(str(r) for r in OUTPUT_SAMPLE_RATES)
        raise ValueError(f"sample rate {sample_rate!r} Hz is not supported for {fmt.value} "
                         f"output; supported rates: {rates} Hz")
    if fmt in (AudioFormat.PCM, AudioFormat.WAV):
        return _RawEncoder(int(sample_rate), wav=fmt is AudioFormat.WAV)
    return _CodecEncoder(_CODECS[fmt], int(sample_rate))


class StreamingEncoder(ABC):
    """Encodes one stream. Calls may come from any thread; one call runs at a time."""

    content_type: str
    sample_rate: int  # the rate actually encoded (Opus may differ from the input rate)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._finished = False

    def encode(self, samples: np.ndarray) -> bytes:
        """Encode mono float32 samples in [-1, 1] (louder is clipped); returns the bytes ready
        to send now, possibly b"" while the codec fills a frame."""
        samples = np.asarray(samples, dtype=np.float32)
        if samples.ndim > 1 and max(samples.shape, default=0) != samples.size:
            raise ValueError(f"expected mono samples, got an array of shape {samples.shape}")
        with self._lock:
            if self._finished:
                raise RuntimeError("encode() called after finish()")
            return self._encode(samples.reshape(-1))

    def finish(self) -> bytes:
        """Flush the codec and write the trailer; returns the last bytes of the stream.
        A second call returns b""."""
        with self._lock:
            if self._finished:
                return b""
            self._finished = True
            return self._finish()

    @abstractmethod
    def _encode(self, samples: np.ndarray) -> bytes: ...

    @abstractmethod
    def _finish(self) -> bytes: ...


class _RawEncoder(StreamingEncoder):
    """Little-endian 16-bit PCM, optionally after a streaming WAV header."""

    def __init__(self, sample_rate: int, *, wav: bool):
        super().__init__()
        self.sample_rate = sample_rate
        self.content_type = "audio/wav" if wav else f"audio/L16; rate={sample_rate}; channels=1"
        self._header = wav_stream_header(sample_rate) if wav else b""

    def _encode(self, samples: np.ndarray) -> bytes:
        header, self._header = self._header, b""
        return header + to_s16le(samples)

    def _finish(self) -> bytes:
        header, self._header = self._header, b""  # an empty stream is still a valid WAV file
        return header


@dataclass(frozen=True)
class _Codec:
    container: str
    codec: str
    sample_format: str  # what the encoder takes: float planar/packed, or s16 for lossless
    content_type: str
    container_options: dict[str, str] = field(default_factory=dict)
    bit_rate: Callable[[int], int] | None = None  # of the sample rate; None: lossless
    rates: tuple[int, ...] = ()  # the only rates the codec takes; () for any

    def encoded_rate(self, sample_rate: int) -> int:
        if not self.rates or sample_rate in self.rates:
            return sample_rate
        return min(r for r in self.rates if r >= sample_rate)


_CODECS = {
    AudioFormat.MP3: _Codec(
        "mp3", "libmp3lame", "fltp", "audio/mpeg",
        # No ID3 tag: a stream is not a file, and a tag would put metadata before the audio.
        {"id3v2_version": "0", "write_xing": "0"}, bit_rate=lambda rate: 64_000),
    AudioFormat.OPUS: _Codec(
        "ogg", "libopus", "flt", "audio/ogg; codecs=opus",
        {"page_duration": str(int(OGG_PAGE_SECONDS * 1_000_000))}, bit_rate=lambda rate: 32_000,
        rates=(8000, 12000, 16000, 24000, 48000)),
    # AAC-LC carries at most 6144 bits per 1024-sample frame (48 kbit/s at 8 kHz).
    AudioFormat.AAC: _Codec("adts", "aac", "fltp", "audio/aac",
                            bit_rate=lambda rate: min(64_000, 4 * rate)),
    # No padding block: it only helps editors rewriting tags in place.
    AudioFormat.FLAC: _Codec("flac", "flac", "s16", "audio/flac",
                             {"metadata_header_padding": "0"}),
}


class _Sink:
    """A write-only file for the muxer. Having no seek() it is not seekable, so muxers never go
    back to rewrite bytes that were already sent (FLAC's total length stays 0 = unknown)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


class _CodecEncoder(StreamingEncoder):
    """A PyAV (FFmpeg) encoder and muxer writing into memory."""

    def __init__(self, codec: _Codec, input_rate: int):
        super().__init__()
        self.content_type = codec.content_type
        self.sample_rate = codec.encoded_rate(input_rate)
        self._resampler = (soxr.ResampleStream(input_rate, self.sample_rate, 1, dtype="float32",
                                               quality="HQ")
                           if self.sample_rate != input_rate else None)
        self._sink = _Sink()
        # flush_packets: hand every muxed packet to the sink at once instead of filling
        # FFmpeg's 32 KiB I/O buffer first.
        self._container = av.open(self._sink, "w", format=codec.container,
                                  container_options={"flush_packets": "1",
                                                     **codec.container_options})
        self._stream = self._container.add_stream(codec.codec, rate=self.sample_rate)
        context = self._stream.codec_context
        context.layout = "mono"
        context.format = codec.sample_format
        if codec.bit_rate is not None:
            context.bit_rate = codec.bit_rate(self.sample_rate)
        context.thread_count = 1  # a request is small; threads would only add start-up cost
        context.open()
        # Held back until audio follows, so that the first non-empty chunk is playable on its
        # own (FFmpeg refuses an Ogg stream of headers only); an empty stream is all header.
        self._container.start_encoding()
        self._header = self._sink.take()
        self._frame_size = context.frame_size or 4096
        self._format = codec.sample_format
        self._time_base = Fraction(1, self.sample_rate)
        self._pending = np.zeros(0, dtype=np.float32)
        self._pts = 0

    def _encode(self, samples: np.ndarray) -> bytes:
        if self._resampler is not None:
            samples = self._resampler.resample_chunk(samples)
        self._pending = np.concatenate([self._pending, samples])
        whole = len(self._pending) - len(self._pending) % self._frame_size
        for start in range(0, whole, self._frame_size):
            self._send(self._pending[start:start + self._frame_size])
        self._pending = self._pending[whole:]
        data = self._sink.take()
        if data and self._header:
            data, self._header = self._header + data, b""
        return data

    def _finish(self) -> bytes:
        if self._resampler is not None:
            self._pending = np.concatenate(
                [self._pending, self._resampler.resample_chunk(np.zeros(0, np.float32),
                                                               last=True)])
        for start in range(0, len(self._pending), self._frame_size):
            self._send(self._pending[start:start + self._frame_size])  # last one may be short
        self._pending = self._pending[:0]
        self._container.mux(self._stream.encode(None))
        self._container.close()
        data, self._header = self._header + self._sink.take(), b""
        return data

    def _send(self, samples: np.ndarray) -> None:
        if self._format == "s16":
            data = np.frombuffer(to_s16le(samples), dtype="<i2")
        else:
            data = np.clip(samples, -1.0, 1.0)
        frame = av.AudioFrame.from_ndarray(data.reshape(1, -1), format=self._format,
                                           layout="mono")
        frame.sample_rate = self.sample_rate
        frame.time_base = self._time_base
        frame.pts = self._pts
        self._pts += len(samples)
        self._container.mux(self._stream.encode(frame))
