"""English text -> Kokoro phonemes (US).

Words are looked up in misaki's hand-checked ("gold") and derived ("silver") US lexicons, the
phoneme style Kokoro v1.0 was trained on. Unknown words go to espeak-ng, whose IPA is rewritten
into the same symbol set (diphthongs as single letters: eɪ -> A, aɪ -> I, oʊ -> O, ...).
Numbers, ordinals, years, money and percentages are spelled out first.
"""

from __future__ import annotations

import importlib.resources
import json
import re
from functools import lru_cache

from tts_core.embedded import espeak
from tts_core.embedded.numbers_en import expand_numbers

_VOWELS = set("AIOWYaeiouæɑɒɔəɛɜɪʊʌᵊ")
# espeak IPA (tie "^" joins multi-letter phonemes) -> Kokoro's US symbols; longest first.
_ESPEAK_TO_KOKORO = sorted({
    "a^ɪ": "I", "a^ʊ": "W", "e^ɪ": "A", "o^ʊ": "O", "ɔ^ɪ": "Y",
    "d^ʒ": "ʤ", "t^ʃ": "ʧ", "ə^l": "ᵊl",
    "ɜːɹ": "ɜɹ", "ɜː": "ɜɹ", "ɚ": "əɹ", "ɝ": "ɜɹ", "ɪə": "iə",
    "r": "ɹ", "ɾ": "T", "ʔ": "t", "ɐ": "ə", "ɬ": "l", "x": "k", "ç": "k", "g": "ɡ",
    "ː": "", "\u0303": "",
}.items(), key=lambda kv: -len(kv[0]))
_SYLLABIC = "\u0329"  # n̩ -> ᵊn

_TOKEN = re.compile(r"[A-Za-z]+(?:['’-][A-Za-z]+)*|[^\sA-Za-z]")
_PUNCT_OUT = {",": ",", ".": ".", "!": "!", "?": "?", ";": ";", ":": ":", "—": "—", "…": "…",
              "-": "—", "(": "(", ")": ")", '"': '"', "“": "“", "”": "”"}
_SYMBOL_WORDS = {"&": "and", "+": "plus", "@": "at", "=": "equals", "#": "number", "/": "slash"}


@lru_cache(maxsize=1)
def _lexicon() -> dict[str, str]:
    """Word -> phonemes; gold entries win over silver. POS variants collapse to their default."""
    data = importlib.resources.files("misaki") / "data"
    merged: dict[str, str] = {}
    for name in ("us_silver.json", "us_gold.json"):
        for word, value in json.loads((data / name).read_text(encoding="utf-8")).items():
            if isinstance(value, dict):
                value = value.get("DEFAULT") or next((v for v in value.values() if v), None)
            if value:
                merged[word] = value
    return merged


def _lookup(word: str) -> str | None:
    lex = _lexicon()
    for candidate in (word, word.lower(), word.capitalize()):
        if candidate in lex:
            return lex[candidate]
    return None


def _add_suffix_s(stem: str) -> str:
    last = stem.rstrip("ˈˌ")[-1:]
    if last in set("szʃʒʧʤ"):
        return stem + "ɪz"
    return stem + ("s" if last in set("ptkfθ") else "z")


def _add_suffix_ed(stem: str) -> str:
    last = stem[-1:]
    if last in "td":
        return stem + "ᵻd"
    return stem + ("t" if last in set("pkfθsʃʧ") else "d")


def _inflected(word: str) -> str | None:
    """Plural/possessive -s, past -ed and -ing of a lexicon word (the lexicon lacks many)."""
    low = word.lower().replace("’", "'")
    if low.endswith("'s") and (stem := _lookup(word[:-2])):
        return _add_suffix_s(stem)
    if low.endswith("s") and len(low) > 3:
        for cut in (1, 2):  # cats, boxes
            if stem := _lookup(word[:-cut]):
                return _add_suffix_s(stem)
    if low.endswith("ed") and len(low) > 4:
        for base in (word[:-2], word[:-1], word[:-3]):  # jumped, saved, stopped
            if stem := _lookup(base):
                return _add_suffix_ed(stem)
    if low.endswith("ing") and len(low) > 5:
        for base in (word[:-3], word[:-3] + "e", word[:-4]):  # going, making, running
            if stem := _lookup(base):
                return stem + "ɪŋ"
    return None


def _spell(word: str) -> str | None:
    letters = [_lookup(ch.upper()) for ch in word]
    return "".join(letters) if all(letters) else None


def _from_espeak(word: str) -> str:
    out = []
    for ps in espeak.phonemize(word, "en-us"):
        for old, new in _ESPEAK_TO_KOKORO:
            ps = ps.replace(old, new)
        ps = re.sub(r"(\S)" + _SYLLABIC, r"ᵊ\1", ps)
        out.append(ps.replace(espeak.TIE, ""))
    return "".join(out)


def _starts_with_vowel_sound(phonemes: str | None) -> bool:
    return bool(phonemes) and phonemes.lstrip("ˈˌ")[:1] in _VOWELS


def word_to_phonemes(word: str) -> str:
    """Phonemes for one word (letters, apostrophes and inner hyphens only)."""
    if "-" in word and _lookup(word) is None:  # forty-two, text-to-speech
        return " ".join(word_to_phonemes(part) for part in word.split("-") if part)
    if len(word) > 1 and word.isupper() and _lookup(word) is None:
        if spelled := _spell(word):  # acronyms: "GPU" -> G P U
            return spelled
    return _lookup(word) or _inflected(word) or _from_espeak(word)


def phonemize(text: str) -> str:
    """English text (one clause or more) to a Kokoro phoneme string."""
    text = expand_numbers(text.replace("’", "'"))
    tokens = _TOKEN.findall(text)
    words: list[str] = []
    pending_function_word: tuple[int, str] | None = None
    for token in tokens:
        if token in _PUNCT_OUT:
            mark = _PUNCT_OUT[token]
            if words and mark in ",.!?;:…)”\"":
                words[-1] += mark
            else:
                words.append(mark)
            continue
        if token in _SYMBOL_WORDS:
            token = _SYMBOL_WORDS[token]
        if not token[0].isalpha():
            continue  # other symbols (emoji, %, ...) that expand_numbers left: not spoken
        phonemes = word_to_phonemes(token)
        # Reduced function words depend on the sound that follows them ("the apple").
        if pending_function_word is not None:
            index, fw = pending_function_word
            before_vowel = _starts_with_vowel_sound(phonemes)
            if fw == "the":
                words[index] = "ði" if before_vowel else "ðə"
            elif fw == "to":
                words[index] = "tu" if before_vowel else "tə"
            pending_function_word = None
        low = token.lower()
        if low in ("the", "to"):
            pending_function_word = (len(words), low)
        elif low == "a":
            phonemes = "ɐ"  # the article (a capital "A" too: sentence starts outnumber letters)
        words.append(phonemes)
    # Kokoro v1.0 writes the American flap and glottal stop as T and t.
    return " ".join(words).replace("ɾ", "T").replace("ʔ", "t")
