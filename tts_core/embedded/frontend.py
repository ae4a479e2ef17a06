"""Text of any supported script -> Kokoro token ids.

Text is cut into runs of one script (Han, kana, Hangul, Latin, Cyrillic, ...); digits, spaces and
punctuation join the run they stand in. Each run goes to the G2P of its language: Han is read as
Japanese when the text has kana or the speaker is Japanese, as Cantonese for a Cantonese speaker,
else as Mandarin; Latin is English. Symbols outside the model's vocabulary are dropped.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from tts_core.embedded import g2p_en, g2p_espeak, g2p_ja, g2p_zh

# Letters of scripts with no dedicated G2P here -> the espeak-ng voice that reads them.
_ESPEAK_SCRIPTS = {"CYRILLIC": "ru", "GREEK": "el", "ARABIC": "ar", "HEBREW": "he",
                   "DEVANAGARI": "hi", "THAI": "th", "BENGALI": "bn", "TAMIL": "ta",
                   "TELUGU": "te", "GEORGIAN": "ka", "ARMENIAN": "hy", "GUJARATI": "gu",
                   "GURMUKHI": "pa", "KANNADA": "kn", "MALAYALAM": "ml", "SINHALA": "si",
                   "MYANMAR": "my", "ETHIOPIC": "am"}
_KANA = re.compile(r"[\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9d]")
_NON_VOCAB_FIXES = str.maketrans({"g": "ɡ", "\u2019": "'", "\n": " ", "\t": " "})


@dataclass(frozen=True)
class Run:
    text: str
    language: str  # "zh", "ja", "en", "yue", "ko", or another espeak voice name


def script_of(ch: str) -> str | None:
    """"han", "kana", "hangul", "latin", an espeak voice for other letters, or None (neutral)."""
    o = ord(ch)
    if 0x3040 <= o <= 0x30FF or 0x31F0 <= o <= 0x31FF or 0xFF66 <= o <= 0xFF9D:
        return "kana"
    if (0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0xF900 <= o <= 0xFAFF
            or 0x20000 <= o <= 0x2FFFF or ch in "々〇"):
        return "han"
    if 0xAC00 <= o <= 0xD7A3 or 0x1100 <= o <= 0x11FF or 0x3130 <= o <= 0x318F:
        return "hangul"
    if not ch.isalpha():
        return None
    family = unicodedata.name(ch, "").split(" ")[0]
    if family == "LATIN":
        return "latin"
    return _ESPEAK_SCRIPTS.get(family, "unsupported")


def has_speakable(text: str) -> bool:
    """Whether ``text`` has a digit or a letter of a script some G2P here can read."""
    return any(ch.isdigit() or script_of(ch) not in (None, "unsupported") for ch in text)


def _language(script: str, speaker_language: str, japanese_context: bool) -> str:
    if script == "han":
        if japanese_context:
            return "ja"
        return "yue" if speaker_language == "yue" else "zh"
    return {"kana": "ja", "hangul": "ko", "latin": "en"}.get(script, script)


def split_runs(text: str, speaker_language: str) -> list[Run]:
    """Cut ``text`` into runs of one language each, in order."""
    japanese_context = speaker_language == "ja" or bool(_KANA.search(text))
    runs: list[list[str]] = []  # [language, text]
    leading = ""
    for ch in text:
        script = script_of(ch)
        if script is None or script == "unsupported":
            if runs:
                runs[-1][1] += ch
            else:
                leading += ch
            continue
        language = _language(script, speaker_language, japanese_context)
        if runs and runs[-1][0] == language:
            runs[-1][1] += ch
        else:
            runs.append([language, leading + ch])
            leading = ""
    if leading.strip():  # only digits and symbols: read them in the speaker's language
        runs.append([speaker_language, leading])
    return [Run(t, lang) for lang, t in runs if t.strip()]


def phonemize_run(run: Run) -> str:
    if run.language == "en":
        return g2p_en.phonemize(run.text)
    if run.language == "zh":
        return g2p_zh.phonemize(run.text)
    if run.language == "ja":
        return g2p_ja.phonemize(run.text)
    return g2p_espeak.phonemize(run.text, run.language)


def phonemize(text: str, speaker_language: str) -> str:
    """Kokoro phoneme string for ``text`` spoken by a speaker of ``speaker_language``."""
    parts = (phonemize_run(run).strip() for run in split_runs(text, speaker_language))
    return " ".join(p for p in parts if p)


def to_token_ids(phonemes: str, vocab: dict[str, int]) -> list[int]:
    """Map symbols to ids, dropping what the model never learnt; squeeze repeated spaces."""
    phonemes = re.sub(r"\s+", " ", phonemes.translate(_NON_VOCAB_FIXES)).strip()
    return [vocab[ch] for ch in phonemes if ch in vocab]


def split_tokens(ids: list[int], limit: int, breaks: set[int], spaces: set[int]) -> list[list[int]]:
    """Cut an over-long id sequence into pieces of at most ``limit``, preferring to cut after
    punctuation (``breaks``), then at a space, and only as a last resort mid-word."""
    pieces: list[list[int]] = []
    while len(ids) > limit:
        window = ids[:limit]
        cut = next((i + 1 for i in range(limit - 1, limit // 2, -1) if window[i] in breaks), None)
        if cut is None:
            cut = next((i + 1 for i in range(limit - 1, limit // 2, -1) if window[i] in spaces),
                       limit)
        pieces.append(ids[:cut])
        ids = ids[cut:]
        while ids and ids[0] in spaces:
            ids = ids[1:]
    if ids:
        pieces.append(ids)
    return pieces
