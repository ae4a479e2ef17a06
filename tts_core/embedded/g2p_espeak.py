"""Korean, Cantonese and other languages -> Kokoro phonemes, using espeak-ng 1.52's readings.

espeak works clause by clause and drops punctuation, so text is cut at punctuation here and the
marks are put back between the phonemized pieces (Kokoro uses them for phrasing and intonation).
"""

from __future__ import annotations

import re

from tts_core.embedded import espeak

_PUNCT = re.compile(r"([,.!?;:，。！？；：、…—]+)")
_PUNCT_OUT = {"，": ",", "、": ",", "。": ".", "！": "!", "？": "?", "；": ";", "：": ":"}

# espeak IPA -> Kokoro symbols for non-English voices (ties "^" mark multi-letter phonemes).
_GENERIC = sorted({
    "a^ɪ": "I", "a^ʊ": "W", "e^ɪ": "A", "o^ʊ": "O", "ɔ^ɪ": "Y",
    "d^z": "ʣ", "d^ʒ": "ʤ", "t^s": "ʦ", "t^ʃ": "ʧ", "t^ɕ": "ʨ", "d^ʑ": "ʥ",
    "ɫ": "l", "ɬ": "l", "ʷ": "w", "ɵ": "ø", "ʉ": "u", "ʏ": "y", "ɘ": "ə", "ɞ": "ɜ", "g": "ɡ",
    "-": "",
}.items(), key=lambda kv: -len(kv[0]))
# espeak's Korean marks unreleased final stops with q-like symbols; Kokoro knows plain k.
# Its ㅈ/ㅊ are alveolo-palatal, Kokoro's Mandarin ʨ (j, q), not the English ʧ (ch).
_KOREAN = {"q": "k", "ʧ": "ʨ"}
# espeak writes Korean aspiration as a plain "h" after the stop (k^h, th, t^ɕh), which Kokoro reads
# as a second sound; it knows aspiration as "ʰ" from Mandarin (pʰ, tʰ, kʰ, ʨʰ). Both changes
# lowered Whisper's character error rate on the Korean bench set (jf_nezumi 27% -> 22%).
_KOREAN_ASPIRATE = re.compile(r"([kptʨ])h")

# Cantonese: espeak's yue voice names phonemes after Jyutping (ASCII mode), so its readings are
# rebuilt into IPA here. Tones become the arrows Kokoro learnt for Mandarin, nearest contour.
_YUE_INITIALS = {"b": "p", "p": "pʰ", "d": "t", "t": "tʰ", "g": "k", "k": "kʰ", "z": "ʦ",
                 "c": "ʦʰ", "s": "s", "j": "j", "N": "ŋ", "h": "h", "f": "f", "m": "m",
                 "n": "n", "l": "l", "w": "w"}
_YUE_FINALS = {"aa": "aː", "a": "ɐ", "e": "ɛ", "ei": "ei", "eo": "ø", "eoi": "øy", "oe": "œ",
               "oeng": "œŋ", "o": "ɔ", "oi": "ɔy", "ou": "ou", "ong": "ɔŋ", "ang": "ɐŋ",
               "aang": "aːŋ", "ung": "ʊŋ", "u": "u", "ui": "uy", "i": "i", "ing": "ɪŋ", "yu": "y",
               "ai": "ɐi", "aai": "aːi", "au": "ɐu", "aau": "aːu", "iu": "iu", "eng": "ɛŋ",
               "eu": "ɛu", "ng": "ŋ", "m": "m", "k": "k", "t": "t", "p": "p", "n": "n"}
_YUE_TONES = {"1": "→", "7": "→", "2": "↗", "3": "", "4": "↘", "5": "↗", "6": "↓"}


def _map(ps: str, table: list[tuple[str, str]]) -> str:
    for old, new in table:
        ps = ps.replace(old, new)
    return ps.replace(espeak.TIE, "")


def _yue_word(word: str) -> str:
    out = []
    for name in word.replace("|", "").split("_"):
        name = name.strip("',")
        if not name:
            continue
        tone = ""
        if name[-1].isdigit():
            name, tone = name[:-1], _YUE_TONES.get(name[-1], "")
        ipa = _YUE_FINALS.get(name) or _YUE_INITIALS.get(name) or name
        out.append(ipa + tone)
    return "".join(out)


def _phonemize_piece(piece: str, voice: str) -> str:
    if voice == "yue":
        return " ".join(_yue_word(w) for w in espeak.phonemize_names(piece, voice, separator="_"))
    words = espeak.phonemize(piece, voice)
    if voice == "ko":
        return " ".join(_KOREAN_ASPIRATE.sub(r"\1ʰ", _map(w, _GENERIC + list(_KOREAN.items())))
                        for w in words)
    return " ".join(_map(w, _GENERIC) for w in words)


def phonemize(text: str, voice: str) -> str:
    """Phonemes for ``text`` in espeak voice ``voice`` ("ko", "yue", "ru", ...)."""
    out: list[str] = []
    for piece in _PUNCT.split(text):
        if not piece.strip():
            continue
        if _PUNCT.fullmatch(piece):
            mark = "".join(_PUNCT_OUT.get(ch, ch) for ch in piece)
            if out:
                out[-1] += mark
            continue
        if ps := _phonemize_piece(piece, voice):
            out.append(ps)
    return " ".join(out)
