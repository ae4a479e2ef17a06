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
# rebuilt into IPA here, the tone after the vowel (before a nasal coda), as Kokoro's Mandarin
# voices learnt it from misaki. Tones become the nearest of the four Mandarin contours: level
# high and mid (1, 3) high level, rising (2, 5) rising, low (4, 6) low. On the tuning sentences
# (scripts/bench_embedded_asr.py --set tuning --languages yue) this took Whisper's CER from 90 %
# (mid level toneless, 4 falling, tone after the coda) to 74 %: better, still not understood.
_YUE_INITIALS = {"b": "p", "p": "pʰ", "d": "t", "t": "tʰ", "g": "k", "k": "kʰ", "z": "ʦ",
                 "c": "ʦʰ", "s": "s", "j": "j", "N": "ŋ", "h": "h", "f": "f", "m": "m",
                 "n": "n", "l": "l", "w": "w", "gw": "kw", "kw": "kʰw"}
_YUE_FINALS = {"aa": "aː", "a": "ɐ", "e": "ɛ", "ei": "ei", "eo": "ø", "eoi": "øy", "oe": "œ",
               "o": "ɔ", "oi": "ɔy", "ou": "ou", "u": "u", "ui": "uy", "i": "i", "yu": "y",
               "ai": "ɐi", "aai": "aːi", "au": "ɐu", "aau": "aːu", "iu": "iu", "eu": "ɛu",
               "ng": "ŋ", "m": "m"}
_YUE_CODAS = {"ng": "ŋ", "m": "m", "n": "n", "p": "p", "t": "t", "k": "k"}
_YUE_TONES = {"1": "→", "7": "→", "2": "↗", "3": "→", "4": "↓", "5": "↗", "6": "↓"}


def _map(ps: str, table: list[tuple[str, str]]) -> str:
    for old, new in table:
        ps = ps.replace(old, new)
    return ps.replace(espeak.TIE, "")


def _yue_word(word: str) -> str:
    out = []
    after_final = False
    for name in word.replace("|", "").split("_"):
        name = name.strip("',")
        if not name:
            continue
        if name[-1].isdigit():  # a final with its tone
            name, tone = name[:-1], _YUE_TONES.get(name[-1], "")
            if name not in _YUE_FINALS and name.endswith("ng") and name[:-2] in _YUE_FINALS:
                out.append(_YUE_FINALS[name[:-2]] + tone + "ŋ")
            else:
                out.append(_YUE_FINALS.get(name, name) + tone)
            after_final = True
            continue
        if after_final and name in _YUE_CODAS:  # the final's coda, else the next initial
            out.append(_YUE_CODAS[name])
        else:
            out.append(_YUE_INITIALS.get(name, name))
        after_final = False
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
