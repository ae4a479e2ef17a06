"""Bounds on the work one text can cause, applied by every engine's text front end.

A short request must not cost a long one: a 1 400-letter "word" is read by the G2P and the model
as a single unit (one huge model call before any audio), and a 1 000-digit number spelled out as a
cardinal becomes thousands of words in one clause. So, by construction:

- a word (a run of letters of a script written with spaces) longer than ``MAX_WORD_LETTERS`` is
  refused with a message saying where it is; no real word is that long;
- a run of more than ``MAX_NUMBER_DIGITS`` digits is read digit by digit, in groups of
  ``DIGIT_GROUP`` separated by commas, so it splits into short clauses like any other text
  ("12345678901234567" -> "1 2 3, 4 5 6, ...").

Han, kana and hangul are read character by character, and scripts written without spaces (Thai,
Lao, Khmer, Myanmar, ...) get a longer limit, ``MAX_UNSPACED_RUN``. The limits live in
:mod:`tts_core.limits` with every other request rule.
"""

from __future__ import annotations

import re
import unicodedata

from tts_core.engine import InvalidRequest
from tts_core.limits import DIGIT_GROUP, MAX_NUMBER_DIGITS, MAX_UNSPACED_RUN, MAX_WORD_LETTERS

# A digit run: plain digits, or a number written with thousands separators ("1,234,567").
_DIGIT_RUN = re.compile(r"(?<!\d)(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)")
_UNSPACED_SCRIPTS = ("THAI", "LAO", "KHMER", "MYANMAR", "TIBETAN", "JAVANESE", "BALINESE")


def _letter_class(char: str) -> str | None:
    """"word" for letters of scripts written with spaces, "unspaced" for those written without,
    None for everything else (CJK ideographs, kana and hangul are read per character)."""
    code = ord(char)
    if (0x3040 <= code <= 0x30FF or 0x31F0 <= code <= 0x31FF or 0x3400 <= code <= 0x9FFF
            or 0xAC00 <= code <= 0xD7AF or 0xF900 <= code <= 0xFAFF or 0x1100 <= code <= 0x11FF
            or 0x3130 <= code <= 0x318F or 0xFF66 <= code <= 0xFF9F or code >= 0x20000):
        return None
    category = unicodedata.category(char)
    if not (category.startswith("L") or category.startswith("M")):
        return None
    name = unicodedata.name(char, "")
    return "unspaced" if name.startswith(_UNSPACED_SCRIPTS) else "word"


def check_words(text: str) -> None:
    """Raise InvalidRequest if ``text`` has a word longer than the limits above."""
    run_class, run_start, run_length = None, 0, 0
    for index, char in enumerate(text + " "):
        cls = _letter_class(char) if index < len(text) else None
        if cls is not None and cls == run_class:
            run_length += 1
            continue
        if run_class is not None:
            limit = MAX_WORD_LETTERS if run_class == "word" else MAX_UNSPACED_RUN
            if run_length > limit:
                head = text[run_start:run_start + 12]
                raise InvalidRequest(
                    f"the text has a {run_length}-letter word at character {run_start + 1} "
                    f"(starting {head!r}); words longer than {limit} letters are refused: "
                    "put spaces or hyphens between its parts")
        run_class, run_start, run_length = cls, index, 1


def _group_digits(match: re.Match[str]) -> str:
    digits = match.group(0).replace(",", "")
    if len(digits) <= MAX_NUMBER_DIGITS:
        return match.group(0)
    groups = (digits[i:i + DIGIT_GROUP] for i in range(0, len(digits), DIGIT_GROUP))
    return ", ".join(" ".join(group) for group in groups)


def group_long_numbers(text: str) -> str:
    """Rewrite digit runs longer than ``MAX_NUMBER_DIGITS`` as spaced digit groups."""
    return _DIGIT_RUN.sub(_group_digits, text)


def guard_text(text: str) -> str:
    """The text an engine may work on: refuses over-long words, groups over-long numbers.
    Cost is linear in the length of ``text``."""
    check_words(text)
    return group_long_numbers(text)
