"""Streaming encoders (service/encoding.py): real speech in, decoded back with PyAV (FFmpeg).

Lossless formats must decode to exactly the 16-bit samples of the input; lossy ones must keep the
waveform (correlation >= 0.9 once aligned for the documented encoder delay) and the duration
(within one codec frame). Every prefix of the stream that an encoder returned, cut where a chunk
ended, must decode on its own: that is what a streaming client sees.
"""

from __future__ import annotations

import functools
import io
import struct
import threading
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
import soxr

from service.audio import to_s16le, wav_stream_header
from service.encoding import AudioFormat, open_encoder

AUDIO_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "audio"
SPEECH_FILE = AUDIO_DIR / "cross_lingual_prompt.wav"

LOSSLESS = (AudioFormat.PCM, AudioFormat.WAV, AudioFormat.FLAC)
LOSSY = (AudioFormat.MP3, AudioFormat.AAC, AudioFormat.OPUS)
# Samples a decoder returns before the input's first sample (documented in service/encoding.py):
# mp3 and ADTS cannot signal the encoder delay in a stream; Ogg Opus signals its pre-skip.
LEADING = {AudioFormat.MP3: 1105, AudioFormat.AAC: 1024, AudioFormat.OPUS: 0,
           AudioFormat.PCM: 0, AudioFormat.WAV: 0, AudioFormat.FLAC: 0}
LONGEST_FRAME = {AudioFormat.MP3: 1152, AudioFormat.AAC: 1024}
# Audio an encoder may hold back after an encode() call: codec lookahead and a partly filled
# frame, one FLAC block, or two Ogg pages (service.encoding.OGG_PAGE_SECONDS each).
MAX_HELD_BACK_SECONDS = 0.3
OPUS_DECODED_RATE = 48000  # FFmpeg decodes Opus at 48 kHz whatever rate was encoded
# Irregular engine chunk sizes, an empty one included.
CHUNK_SIZES = (4410, 1, 317, 0, 9000, 2048, 123, 6000)


@functools.cache
def speech(rate: int, seconds: float = 4.0) -> np.ndarray:
    """English speech from a real recording (22050 Hz), resampled to `rate`."""
    samples, native = soundfile.read(SPEECH_FILE, dtype="float32")
    samples = samples[: int(seconds * native)]
    if rate != native:
        samples = soxr.resample(samples, native, rate, quality="HQ")
    samples.flags.writeable = False
    return samples


def encode_in_chunks(fmt: AudioFormat, rate: int, samples: np.ndarray,
                     sizes: tuple[int, ...] = CHUNK_SIZES) -> tuple[list[bytes], list[int]]:
    """What each encode() call returned, finish() last, and the input fed up to each call."""
    encoder = open_encoder(fmt, rate)
    chunks, fed, pos, i = [], [], 0, 0
    while pos < len(samples):
        size = sizes[i % len(sizes)]
        chunks.append(encoder.encode(samples[pos:pos + size]))
        pos = min(pos + size, len(samples))
        fed.append(pos)
        i += 1
    chunks.append(encoder.finish())
    fed.append(len(samples))
    return chunks, fed


def decode(data: bytes, fmt: AudioFormat, rate: int) -> tuple[np.ndarray, int]:
    """Samples (int16 for lossless formats, float32 otherwise) and the decoded rate."""
    if fmt is AudioFormat.PCM:
        return np.frombuffer(data, dtype="<i2"), rate
    if fmt in (AudioFormat.MP3, AudioFormat.AAC):
        # As a streaming client would: parse the elementary stream, no container probing.
        codec = av.CodecContext.create("mp3float" if fmt is AudioFormat.MP3 else "aac", "r")
        frames = [f for p in codec.parse(data) + codec.parse(None) for f in codec.decode(p)]
        frames += codec.decode(None)
    else:
        if not data:
            return np.zeros(0, np.int16), rate
        container = {AudioFormat.OPUS: "ogg"}.get(fmt, fmt.value)
        with av.open(io.BytesIO(data), format=container) as file:
            frames = list(file.decode(audio=0))
    if not frames:
        return np.zeros(0, np.int16 if fmt in LOSSLESS else np.float32), rate
    samples = np.concatenate([f.to_ndarray().reshape(-1) for f in frames])
    if samples.dtype == np.int16 and fmt not in LOSSLESS:
        samples = samples.astype(np.float32) / 32768.0
    return samples, frames[0].sample_rate


def reference(samples: np.ndarray, fmt: AudioFormat, encoded_rate: int, rate: int) -> np.ndarray:
    """The input as the decoder should return it (Opus: at its 48 kHz decoding rate)."""
    if fmt is AudioFormat.OPUS:
        return soxr.resample(samples, rate, OPUS_DECODED_RATE, quality="HQ")
    return samples


def aligned_correlation(decoded: np.ndarray, expected: np.ndarray,
                        max_lag: int) -> tuple[float, int]:
    """Correlation of `decoded` with `expected` at the leading offset (0..max_lag) that
    matches best, and that offset."""
    n = len(expected)
    decoded = decoded[:n + max_lag]
    size = 1 << (len(decoded) + n).bit_length()
    cross = np.fft.irfft(np.fft.rfft(decoded, size) * np.conj(np.fft.rfft(expected, size)),
                         size)[:max_lag + 1]
    lag = int(np.argmax(cross))
    m = min(len(decoded) - lag, n)
    return float(np.corrcoef(decoded[lag:lag + m], expected[:m])[0, 1]), lag


def expected_encoded_rate(fmt: AudioFormat, rate: int) -> int:
    if fmt is AudioFormat.OPUS:
        return {22050: 24000, 44100: 48000}.get(rate, rate)
    return rate


# --- round trips -------------------------------------------------------------------------------

@pytest.mark.parametrize("rate", [22050, 24000, 16000])
@pytest.mark.parametrize("fmt", LOSSLESS)
def test_lossless_round_trip_is_exact(fmt: AudioFormat, rate: int) -> None:
    samples = speech(rate)
    chunks, _ = encode_in_chunks(fmt, rate, samples)
    decoded, decoded_rate = decode(b"".join(chunks), fmt, rate)
    assert decoded_rate == rate
    np.testing.assert_array_equal(decoded, np.frombuffer(to_s16le(samples), dtype="<i2"))


@pytest.mark.parametrize("rate", [22050, 24000, 8000, 44100])
@pytest.mark.parametrize("fmt", LOSSY)
def test_lossy_round_trip_keeps_rate_duration_and_waveform(fmt: AudioFormat, rate: int) -> None:
    samples = speech(rate)
    encoder_rate = open_encoder(fmt, rate).sample_rate
    assert encoder_rate == expected_encoded_rate(fmt, rate)
    chunks, _ = encode_in_chunks(fmt, rate, samples)
    decoded, decoded_rate = decode(b"".join(chunks), fmt, rate)
    expected = reference(samples, fmt, encoder_rate, rate)

    assert decoded_rate == (OPUS_DECODED_RATE if fmt is AudioFormat.OPUS else rate)
    extra = len(decoded) - LEADING[fmt] - len(expected)
    if fmt is AudioFormat.OPUS:  # pre-skip and end trim are signalled: the input's length
        assert abs(extra) <= 2, extra
    else:  # leading delay, then the last frame padded
        assert 0 <= extra < LONGEST_FRAME[fmt], extra
    corr, lag = aligned_correlation(decoded, expected, max_lag=2 * LEADING[fmt] + 64)
    assert lag == LEADING[fmt]
    assert corr >= 0.9, f"{fmt.value} at {rate} Hz: correlation {corr:.3f}"
    # The end is there too (Kokoro-FastAPI #273/#447 lost the last Opus page).
    tail = slice(len(expected) - decoded_rate // 2, len(expected))
    tail_corr = np.corrcoef(decoded[LEADING[fmt]:][tail], expected[tail])[0, 1]
    assert tail_corr >= 0.9, f"last 0.5 s: correlation {tail_corr:.3f}"


def test_opus_ogg_framing() -> None:
    """Ogg pages in order, BOS first, EOS only on the last, granule = pre-skip + samples."""
    chunks, _ = encode_in_chunks(AudioFormat.OPUS, 22050, speech(22050))
    data = b"".join(chunks)
    pages, pos = [], 0
    while pos < len(data):
        assert data[pos:pos + 4] == b"OggS", f"no page at byte {pos}"
        flags, granule, serial, sequence, _crc, segments = struct.unpack(
            "<xBqIIIB", data[pos + 4:pos + 27])
        size = sum(data[pos + 27:pos + 27 + segments])
        pages.append((flags, granule, serial, sequence, data[pos + 27 + segments:][:size]))
        pos += 27 + segments + size
    assert pos == len(data)
    assert [p[3] for p in pages] == list(range(len(pages)))
    assert len({p[2] for p in pages}) == 1
    assert [p[0] & 2 for p in pages] == [2] + [0] * (len(pages) - 1)  # beginning of stream
    assert [p[0] & 4 for p in pages] == [0] * (len(pages) - 1) + [4]  # end of stream
    head = pages[0][4]
    assert head[:8] == b"OpusHead"
    version, channels, pre_skip, input_rate = struct.unpack("<BBHI", head[8:16])
    assert (version, channels, input_rate) == (1, 1, 24000)
    assert pages[1][4][:8] == b"OpusTags"
    granules = [p[1] for p in pages[2:]]
    assert granules == sorted(granules)
    decoded, _ = decode(data, AudioFormat.OPUS, 22050)
    assert granules[-1] == pre_skip + len(decoded)


def test_wav_keeps_the_streaming_header() -> None:
    encoder = open_encoder(AudioFormat.WAV, 24000)
    first = encoder.encode(speech(24000)[:100])
    assert first[:44] == wav_stream_header(24000)
    assert encoder.encode(speech(24000)[100:200])[:4] != b"RIFF"
    assert open_encoder(AudioFormat.WAV, 16000).finish() == wav_stream_header(16000)


def test_loud_input_is_clipped_not_wrapped() -> None:
    loud = np.clip(speech(24000) * 4.0, -1.5, 1.5)
    for fmt in AudioFormat:
        chunks, _ = encode_in_chunks(fmt, 24000, loud)
        decoded, _ = decode(b"".join(chunks), fmt, 24000)
        if fmt in LOSSLESS:
            np.testing.assert_array_equal(decoded, np.frombuffer(to_s16le(loud), dtype="<i2"))
        else:
            expected = reference(np.clip(loud, -1, 1), fmt, 24000, 24000)
            corr, _ = aligned_correlation(decoded, expected, max_lag=LEADING[fmt])
            assert corr >= 0.9, f"{fmt.value}: {corr:.3f}"


# --- streaming ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", list(AudioFormat))
def test_every_prefix_decodes_and_output_is_not_held_back(fmt: AudioFormat) -> None:
    """Cut the stream where any chunk ended: it decodes to the start of the full stream, and
    it holds all but the last MAX_HELD_BACK_SECONDS of the input fed so far."""
    rate = 22050
    samples = speech(rate, seconds=6.0)
    chunks, fed = encode_in_chunks(fmt, rate, samples, sizes=(int(0.4 * rate), 1000, 7000))
    full, decoded_rate = decode(b"".join(chunks), fmt, rate)
    scale = decoded_rate / rate
    first_audio = None
    for i in range(len(chunks) - 1):  # finish() excluded: output must come before it
        prefix, _ = decode(b"".join(chunks[: i + 1]), fmt, rate)
        assert len(prefix) <= len(full)
        np.testing.assert_allclose(prefix, full[:len(prefix)], atol=1e-6)
        audio = max(0, len(prefix) - LEADING[fmt]) / decoded_rate
        assert audio >= fed[i] / rate - MAX_HELD_BACK_SECONDS, (i, audio, fed[i] / rate)
        if first_audio is None and audio > 0:
            first_audio = i
    assert first_audio is not None and fed[first_audio] / rate <= MAX_HELD_BACK_SECONDS + 0.4
    assert len(chunks[-1]) < 0.1 * sum(map(len, chunks))  # finish() adds only the tail
    assert len(full) >= round(scale * len(samples)) - 2  # all of it, at the end


@pytest.mark.parametrize("fmt", list(AudioFormat))
def test_first_non_empty_chunk_decodes_alone(fmt: AudioFormat) -> None:
    rate = 24000
    encoder = open_encoder(fmt, rate)
    samples = speech(rate)
    first = b""
    for start in range(0, len(samples), 2400):  # 0.1 s at a time, until bytes come out
        first = encoder.encode(samples[start:start + 2400])
        if first:
            break
    decoded, _ = decode(first, fmt, rate)  # raises if the chunk is not a decodable stream
    assert len(decoded) > 0
    later = first + b"".join(encoder.encode(samples[s:s + 2400]) for s in range(start + 2400,
                                                                              start + 12000, 2400))
    decoded_later, _ = decode(later, fmt, rate)
    assert len(decoded_later) > max(len(decoded), LEADING[fmt])


def test_short_and_empty_streams() -> None:
    for fmt in AudioFormat:
        for n in (1, 100):
            encoder = open_encoder(fmt, 16000)
            data = encoder.encode(speech(16000)[:n]) + encoder.finish()
            decoded, rate = decode(data, fmt, 16000)
            if fmt is AudioFormat.OPUS:
                assert abs(len(decoded) - n * rate // 16000) <= 2
            elif fmt in LOSSLESS:
                assert len(decoded) == n
            else:
                assert len(decoded) >= n
        empty = open_encoder(fmt, 16000).finish()
        if fmt in (AudioFormat.WAV, AudioFormat.FLAC):
            assert len(decode(empty, fmt, 16000)[0]) == 0


def test_encoders_in_parallel_threads_match_sequential() -> None:
    samples = speech(22050, seconds=2.0)
    formats = [AudioFormat.MP3, AudioFormat.OPUS, AudioFormat.AAC, AudioFormat.FLAC]
    expected = [decode(b"".join(encode_in_chunks(f, 22050, samples)[0]), f, 22050)[0]
                for f in formats]
    results: dict[int, np.ndarray] = {}

    def run(i: int) -> None:
        results[i] = decode(b"".join(encode_in_chunks(formats[i], 22050, samples)[0]),
                            formats[i], 22050)[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(formats))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, want in enumerate(expected):
        np.testing.assert_array_equal(results[i], want)


# --- API ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("fmt", "content_type"), [
    ("pcm", "audio/L16; rate=22050; channels=1"),
    ("wav", "audio/wav"),
    ("mp3", "audio/mpeg"),
    ("opus", "audio/ogg; codecs=opus"),
    ("aac", "audio/aac"),
    ("flac", "audio/flac"),
])
def test_content_type(fmt: str, content_type: str) -> None:
    assert open_encoder(AudioFormat(fmt), 22050).content_type == content_type


def test_bad_arguments_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match="unknown audio format 'ogg'.*mp3"):
        open_encoder("ogg", 22050)  # type: ignore[arg-type]
    for rate in (11025, 0, 96000, True, 22050.5):
        with pytest.raises(ValueError, match="sample rate .* supported rates: 8000"):
            open_encoder(AudioFormat.MP3, rate)  # type: ignore[arg-type]
    encoder = open_encoder(AudioFormat.OPUS, 22050)
    with pytest.raises(ValueError, match="mono"):
        encoder.encode(np.zeros((100, 2), np.float32))
    encoder.encode(np.zeros((1, 100), np.float32))  # a single row or column is mono
    assert encoder.finish()
    assert encoder.finish() == b""
    with pytest.raises(RuntimeError, match="after finish"):
        encoder.encode(np.zeros(10, np.float32))
