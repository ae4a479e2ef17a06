"""Text front end of the CosyVoice 2 engine: normalisation, segmentation and language tags.

The LM reads text as Qwen2 BPE tokens, so numbers, dates, units and symbols must be spelled out
the way they are spoken before tokenisation. Written-form to spoken-form rules (text
normalisation, "TN") come from the ``wetext`` package (WeTextProcessing's FST grammars, shipped in
its wheel: no download at run time) for Chinese, English and Japanese; around it we add what it
does not do: full/half-width folding, punctuation clean-up, digit-by-digit reading of phone-number
like strings in English, cents, and protection of the model's special markers (``[breath]``,
``<strong>…</strong>``, ``<|en|>``, ``<|endofprompt|>`` …), which are passed through untouched.

Long texts are cut into segments the LM handles well (about 60–80 tokens), at sentence ends first,
then at clause punctuation, then at spaces (or between characters for CJK text), never inside a
marker or a ``<strong>…</strong>`` style span.
"""

from __future__ import annotations

import logging
import re
import threading
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..text_guard import guard_text

log = logging.getLogger(__name__)

LANGUAGES = ("zh", "en", "ja", "yue", "ko")

# The fine-grained control tokens CosyVoice 2 was trained with (its tokenizer adds them as special
# tokens), plus the prompt separator. Language / emotion tags of the ``<|xx|>`` form are matched by
# pattern instead of by list.
FINE_GRAINED_MARKERS: tuple[str, ...] = (
    "[breath]", "[noise]", "[laughter]", "[cough]", "[clucking]", "[accent]", "[quick_breath]",
    "[hissing]", "[sigh]", "[vocalized-noise]", "[lipsmack]", "[mn]",
    "<strong>", "</strong>", "<laughter>", "</laughter>",
)
_PIPE_TAG = r"<\|[A-Za-z0-9_\-]{1,32}\|>"

# Sentence-final and clause punctuation (after normalisation; both widths).
_SENTENCE_END = set("。！？；…!?;")
_CLAUSE = set("，、：,:—")
_CLOSERS = set("”’\"')）】」』》")

# Cantonese-only characters; a text that uses any of them is written Cantonese, not Mandarin.
_CANTONESE = set("嘅咗唔冇喺嚟啲佢哋乜嘢咩噉睇攞俾嗰咁")


def language_tag(language: str) -> str:
    """``"en"`` → ``"<|en|>"``; the tag CosyVoice 2 uses to name the language of the text."""
    if language not in LANGUAGES:
        raise ValueError(f"unknown language {language!r}; choose one of {', '.join(LANGUAGES)}")
    return f"<|{language}|>"


# ----------------------------------------------------------------------------- markers


@dataclass(frozen=True)
class Piece:
    """A run of plain text, or one special marker (kept verbatim)."""

    text: str
    marker: bool


def marker_pattern(markers: Iterable[str] = FINE_GRAINED_MARKERS) -> re.Pattern[str]:
    # Longest first, so that "[quick_breath]" is not read as something shorter.
    alternatives = sorted({re.escape(m) for m in markers}, key=len, reverse=True)
    return re.compile("|".join([_PIPE_TAG, *alternatives]))


_DEFAULT_MARKERS = marker_pattern()


def split_markers(text: str, pattern: re.Pattern[str] = _DEFAULT_MARKERS) -> list[Piece]:
    pieces: list[Piece] = []
    position = 0
    for match in pattern.finditer(text):
        if match.start() > position:
            pieces.append(Piece(text[position:match.start()], False))
        pieces.append(Piece(match.group(0), True))
        position = match.end()
    if position < len(text):
        pieces.append(Piece(text[position:], False))
    return pieces


# ----------------------------------------------------------------------------- scripts


def _is_cjk(char: str) -> bool:
    code = ord(char)
    return (0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0x20000 <= code <= 0x2A6DF
            or 0xF900 <= code <= 0xFAFF)


def _is_kana(char: str) -> bool:
    return 0x3040 <= ord(char) <= 0x30FF or 0x31F0 <= ord(char) <= 0x31FF


def _is_hangul(char: str) -> bool:
    code = ord(char)
    return 0xAC00 <= code <= 0xD7AF or 0x1100 <= code <= 0x11FF or 0x3130 <= code <= 0x318F


def _is_wide(char: str) -> bool:
    """Characters written without spaces between words (Han, kana, hangul) or CJK punctuation."""
    return (_is_cjk(char) or _is_kana(char) or _is_hangul(char)
            or 0x3000 <= ord(char) <= 0x303F or 0xFF00 <= ord(char) <= 0xFFEF)


def detect_language(text: str) -> str:
    """Guess the language from the script: kana → ja, hangul → ko, Han → zh (yue when the text
    uses Cantonese-only characters), otherwise en. Markers are ignored."""
    plain = "".join(p.text for p in split_markers(text) if not p.marker)
    han = kana = hangul = latin = 0
    for char in plain:
        if _is_kana(char):
            kana += 1
        elif _is_hangul(char):
            hangul += 1
        elif _is_cjk(char):
            han += 1
        elif char.isascii() and char.isalpha():
            latin += 1
    if kana:
        return "ja"
    if hangul and hangul >= han:
        return "ko"
    if han:
        return "yue" if any(char in _CANTONESE for char in plain) else "zh"
    return "en"


# ----------------------------------------------------------------------------- width, punctuation

_ZH_PUNCT_TO_ASCII = {"，": ",", "。": ".", "！": "!", "？": "?", "；": ";", "：": ":", "、": ",",
                      "“": '"', "”": '"', "‘": "'", "’": "'", "（": "(", "）": ")", "《": '"',
                      "》": '"', "「": '"', "」": '"', "『": '"', "』": '"', "【": "(", "】": ")",
                      "…": "...", "—": "-", "～": "~"}
_ASCII_TO_ZH_PUNCT = {",": "，", ".": "。", "!": "！", "?": "？", ";": "；", ":": "："}
_CJK_PUNCT_KEPT = set("，。！？；：、（）")


def to_half_width(text: str, keep_cjk_punctuation: bool) -> str:
    """Fold full-width ASCII forms (ＡＢＣ１２３) and the ideographic space to their ASCII
    counterparts. Chinese punctuation is kept when ``keep_cjk_punctuation`` (it carries the prosody
    of CJK text); otherwise it becomes ASCII punctuation too."""
    out = []
    for char in text:
        code = ord(char)
        if char == "\u3000":
            out.append(" ")
        elif 0xFF01 <= code <= 0xFF5E and not (keep_cjk_punctuation and char in _CJK_PUNCT_KEPT):
            out.append(chr(code - 0xFEE0))
        elif not keep_cjk_punctuation and char in _ZH_PUNCT_TO_ASCII:
            out.append(_ZH_PUNCT_TO_ASCII[char])
        else:
            out.append(char)
    return "".join(out)


_QUOTES = str.maketrans({"\u00ab": '"', "\u00bb": '"', "\u201e": '"', "\u2033": '"',
                         "\u2032": "'", "\u00b4": "'", "`": "'", "\u2013": "-", "\u2212": "-",
                         "\u00a0": " ", "\u2009": " ", "\u200b": "", "\ufeff": ""})


def _clean_cjk(text: str) -> str:
    # Spaces only matter between two Latin words ("iPhone 15 Pro" keeps its spaces).
    text = re.sub(r"(?<=[^\x00-\x7f])\s+|\s+(?=[^\x00-\x7f])", "", text)
    text = re.sub(r"[【】《》「」『』\[\]()（）`]", "", text)
    text = text.replace("——", "，").replace(" - ", "，")
    text = re.sub(r"…+|\.{3,}", "…", text)
    # ASCII punctuation right after a CJK character is Chinese punctuation typed in half width.
    text = re.sub(r"(?<=[\u3400-\u9fff])[,.!?;:](?!\d)",
                  lambda m: _ASCII_TO_ZH_PUNCT[m.group(0)], text)
    text = text.replace("²", "平方").replace("³", "立方")
    return text


def _clean_latin(text: str) -> str:
    text = re.sub(r"[\[\]{}()]", " ", text)
    text = re.sub(r"\s*--+\s*|\s+-\s+", ", ", text)
    text = re.sub(r"\.{4,}", "...", text)
    text = text.replace("²", " squared").replace("³", " cubed")
    text = re.sub(r"\s+([,.!?;:])", r"\1", text)
    return re.sub(r"[ \t]+", " ", text)


def _join_lines(text: str, wide: bool) -> str:
    """A line break ends a sentence (a heading, a list item) unless punctuation already does."""
    def join(match: re.Match[str]) -> str:
        before = text[:match.start()].rstrip()
        if not before or before[-1] in _SENTENCE_END or before[-1] in _CLAUSE or before[-1] in ".":
            return "" if wide else " "
        return "。" if wide else ". "

    return re.sub(r"[ \t]*\n\s*", join, text)


# ----------------------------------------------------------------------------- English pre-rules

_EN_DIGIT = "zero one two three four five six seven eight nine".split()
# A phone number: "+1 555-123-4567", "555 123 4567", "13812345678" (8+ digits in one run; shorter
# plain runs stay numbers: "1000000" is one million).
_PHONE = re.compile(r"(?<![\w.,])(\+?\d{1,4}(?:[ -]\d{2,5}){2,4}|\+?\d{8,})(?![\w.,]?\d)")
_CENTS = re.compile(r"\$(\d{1,3}(?:,\d{3})*|\d+)\.(\d{2})\b")


def _read_digits_en(match: re.Match[str]) -> str:
    groups = re.split(r"[ -]+", match.group(0).lstrip("+"))
    spoken = ", ".join(" ".join(_EN_DIGIT[int(d)] for d in group) for group in groups)
    return ("plus " if match.group(0).startswith("+") else "") + spoken


def _english_pre_rules(text: str) -> str:
    text = _PHONE.sub(_read_digits_en, text)

    def cents(match: re.Match[str]) -> str:
        dollars, cents_value = match.group(1), int(match.group(2))
        unit = "dollar" if dollars == "1" else "dollars"
        if cents_value == 0:
            return f"{dollars} {unit}"
        cent_unit = "cent" if cents_value == 1 else "cents"
        return f"{dollars} {unit} {cents_value} {cent_unit}"

    return _CENTS.sub(cents, text)


# ----------------------------------------------------------------------------- wetext


class _WeText:
    """The wetext normalisers, one per language, built on first use and used under a lock
    (one normalisation takes a millisecond; we do not rely on the FST library being re-entrant)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._normalizers: dict[str, object] = {}
        self._missing = False

    def __call__(self, text: str, language: str) -> str:
        grammar = {"zh": "zh", "yue": "zh", "en": "en", "ja": "ja"}.get(language)
        if grammar is None or self._missing or not text.strip():
            return text
        with self._lock:
            normalizer = self._normalizers.get(grammar)
            if normalizer is None:
                try:
                    from wetext import Normalizer
                except ImportError:
                    self._missing = True
                    log.warning("wetext is not installed: numbers, dates and units are read "
                                "as written (pip install wetext)")
                    return text
                normalizer = Normalizer(lang=grammar, operator="tn")
                self._normalizers[grammar] = normalizer
            # wetext strips the ends; keep them, they separate the text from adjacent markers.
            lead = text[: len(text) - len(text.lstrip())]
            trail = text[len(text.rstrip()):]
            spoken = normalizer.normalize(text)  # type: ignore[attr-defined]
        # wetext's English grammar hands quotes back escaped.
        return lead + spoken.replace('\\"', '"') + trail


_WETEXT = _WeText()


# ----------------------------------------------------------------------------- the front end

TokenCounter = Callable[[str], int]


class TextFrontend:
    """Normalises and segments text for the CosyVoice 2 LM.

    ``count_tokens`` returns the number of LM tokens of a string (the engine passes its Qwen2
    tokenizer); ``markers`` are the special tokens to pass through verbatim.
    """

    def __init__(self, count_tokens: TokenCounter, markers: Iterable[str] = FINE_GRAINED_MARKERS,
                 max_tokens: int = 80, min_tokens: int = 60, merge_tokens: int = 20) -> None:
        if not 0 < merge_tokens <= min_tokens <= max_tokens:
            raise ValueError("need 0 < merge_tokens <= min_tokens <= max_tokens")
        self.count_tokens = count_tokens
        self.pattern = marker_pattern(markers)
        self.max_tokens, self.min_tokens, self.merge_tokens = max_tokens, min_tokens, merge_tokens

    # -- normalisation

    def normalize(self, text: str, language: str | None = None, *, complete: bool = True) -> str:
        """Spoken form of ``text``; ``language`` None: detected from the script.

        ``complete=False`` for a piece of a text that goes on (streamed text): a trailing comma
        or colon then stays, instead of becoming the full stop that ends a whole text.

        Bounded work (:mod:`tts_core.text_guard`): a word over its length limit raises
        InvalidRequest; a very long digit run is read digit by digit in short groups.
        """
        text = guard_text(unicodedata.normalize("NFC", text).translate(_QUOTES))
        text = text.replace("\r", "\n")
        language = language or detect_language(text)
        if language not in LANGUAGES:
            raise ValueError(f"unknown language {language!r}; choose one of {', '.join(LANGUAGES)}")
        # Chinese and Japanese are written without spaces; Korean separates words with spaces
        # and uses Latin punctuation, so it is cleaned like English.
        wide = language in ("zh", "yue", "ja")
        pieces = []
        for piece in split_markers(text, self.pattern):
            if piece.marker:
                pieces.append(piece.text)
                continue
            plain = to_half_width(piece.text, keep_cjk_punctuation=wide)
            plain = _join_lines(plain, wide)
            if language == "en":
                plain = _english_pre_rules(plain)
            plain = _WETEXT(plain, language)
            plain = _clean_cjk(plain) if wide else _clean_latin(plain)
            pieces.append(plain)
        text = "".join(pieces).strip()
        if not complete:
            return text
        if wide:
            text = re.sub(r"[，、：,]+$", "。", text)
        else:
            text = re.sub(r"[,:]+$", ".", text)
        return text

    def tag_language(self, text: str, language: str | None = None) -> str:
        """Prefix the ``<|lang|>`` tag (cross-lingual mode), unless the text starts with one."""
        if re.match(_PIPE_TAG, text.lstrip()):
            return text
        return language_tag(language or detect_language(text)) + text

    # -- segmentation

    def split(self, text: str) -> list[str]:
        """Cut normalised text into segments of at most ``max_tokens`` tokens (a single word or
        marker longer than that stays whole). Punctuation-only segments are dropped."""
        units = self._units(text)
        segments: list[str] = []
        current, current_count = "", 0
        for unit in units:
            count = self._count(unit)
            if current and current_count + count > self.max_tokens:
                segments.append(current)
                current, current_count = "", 0
            current += unit
            current_count += count
        if current:
            # A short tail reads badly on its own: join it to the previous segment when it fits.
            if (segments and current_count < self.merge_tokens
                    and self._count(segments[-1]) + current_count
                    <= self.max_tokens + self.merge_tokens):
                segments[-1] += current
            else:
                segments.append(current)
        return [s.strip() for s in segments if _has_content(s, self.pattern)]

    def segments(self, text: str, language: str | None = None) -> list[str]:
        """``normalize`` then ``split``."""
        return self.split(self.normalize(text, language))

    def _count(self, text: str) -> int:
        return int(self.count_tokens(text)) if text else 0

    def _units(self, text: str) -> list[str]:
        """Sentences; a sentence over the limit becomes clauses, a clause over it words."""
        units: list[str] = []
        for sentence in _cut(text, self.pattern, _SENTENCE_END, latin_period=True):
            if self._count(sentence) <= self.max_tokens:
                units.append(sentence)
                continue
            for clause in _cut(sentence, self.pattern, _CLAUSE, latin_period=False):
                if self._count(clause) <= self.max_tokens:
                    units.append(clause)
                else:
                    units.extend(_words(clause, self.pattern))
        return units


def _has_content(text: str, pattern: re.Pattern[str]) -> bool:
    for piece in split_markers(text, pattern):
        if piece.marker or any(c.isalnum() for c in piece.text):
            return True
    return False


_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "vs", "prof", "sr", "jr", "etc", "no", "e.g",
                  "i.e", "inc", "ltd", "co"}


def _atoms(text: str, pattern: re.Pattern[str]) -> list[tuple[str, bool]]:
    """Characters of plain text, and whole markers; a paired span (``<strong>…</strong>``,
    ``<laughter>…</laughter>``) is one atom so nothing cuts through it."""
    atoms: list[tuple[str, bool]] = []
    pieces = split_markers(text, pattern)
    index = 0
    while index < len(pieces):
        piece = pieces[index]
        if piece.marker:
            opener = re.fullmatch(r"<([a-z]+)>", piece.text)
            if opener:
                closing = f"</{opener.group(1)}>"
                for end in range(index + 1, len(pieces)):
                    if pieces[end].marker and pieces[end].text == closing:
                        atoms.append(("".join(p.text for p in pieces[index:end + 1]), True))
                        index = end + 1
                        break
                else:
                    atoms.append((piece.text, True))
                    index += 1
                continue
            atoms.append((piece.text, True))
        else:
            atoms.extend((char, False) for char in piece.text)
        index += 1
    return atoms


def _cut(text: str, pattern: re.Pattern[str], stops: set[str], latin_period: bool) -> list[str]:
    """Cut after each stop character (and the closing quotes/brackets that follow it)."""
    atoms = _atoms(text, pattern)
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(atoms):
        atom, is_marker = atoms[i]
        current.append(atom)
        stop = not is_marker and atom in stops
        if not is_marker and atom == "." and latin_period:
            # "3.5" and "Mr." are not sentence ends; "end. Next" is.
            word = "".join(a for a, _ in atoms[max(0, i - 5):i]).split(" ")[-1].lower()
            next_char = atoms[i + 1][0] if i + 1 < len(atoms) else " "
            stop = next_char[:1].isspace() and word not in _ABBREVIATIONS
        i += 1
        if stop:
            while i < len(atoms) and not atoms[i][1] and (atoms[i][0] in _CLOSERS
                                                           or atoms[i][0] in stops):
                current.append(atoms[i][0])
                i += 1
            parts.append("".join(current))
            current = []
    if current:
        parts.append("".join(current))
    return [p for p in parts if p]


def _words(text: str, pattern: re.Pattern[str]) -> list[str]:
    """Words with their trailing space for Latin text; single characters for CJK text."""
    words: list[str] = []
    current = ""
    for atom, is_marker in _atoms(text, pattern):
        if is_marker or _is_wide(atom):
            if current:
                words.append(current)
            words.append(atom)
            current = ""
        else:
            current += atom
            if atom.isspace():
                words.append(current)
                current = ""
    if current:
        words.append(current)
    return words
