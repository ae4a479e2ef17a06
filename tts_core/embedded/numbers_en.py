"""Spell out numbers in English text: 42, 3.14, 1,000,000, 21st, 1999, $5.50, 30%."""

from __future__ import annotations

import re

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
         "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand"))
_ORDINAL_IRREGULAR = {"one": "first", "two": "second", "three": "third", "five": "fifth",
                      "eight": "eighth", "nine": "ninth", "twelve": "twelfth"}

_MONEY = re.compile(r"([$€£])(\d[\d,]*)(?:\.(\d{1,2}))?\b")
_PERCENT = re.compile(r"(\d[\d,]*(?:\.\d+)?)\s?%")
_ORDINAL = re.compile(r"\b(\d+)(st|nd|rd|th)\b", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\d.])(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?")
_CURRENCY = {"$": ("dollar", "cent"), "€": ("euro", "cent"), "£": ("pound", "penny")}


def cardinal(n: int) -> str:
    if n < 0:
        return "minus " + cardinal(-n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return f"{_ONES[hundreds]} hundred" + (f" {cardinal(rest)}" if rest else "")
    for value, name in _SCALES:
        if n >= value:
            head, rest = divmod(n, value)
            return f"{cardinal(head)} {name}" + (f" {cardinal(rest)}" if rest else "")
    raise AssertionError("unreachable")


def ordinal(n: int) -> str:
    words = cardinal(n)
    head, sep, last = words.rpartition(" ") if "-" not in words[-8:] else words.rpartition("-")
    if last in _ORDINAL_IRREGULAR:
        last = _ORDINAL_IRREGULAR[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return head + sep + last


def year(n: int) -> str:
    """1999 -> nineteen ninety-nine, 2005 -> two thousand five, 1900 -> nineteen hundred."""
    if 2000 <= n <= 2009:
        return cardinal(n)
    high, low = divmod(n, 100)
    if low == 0:
        return f"{cardinal(high)} hundred"
    return f"{cardinal(high)} {'oh ' + _ONES[low] if low < 10 else cardinal(low)}"


def _number(integer: str, fraction: str | None) -> str:
    grouped = "," in integer
    n = int(integer.replace(",", ""))
    if fraction is not None:
        return f"{cardinal(n)} point {' '.join(_ONES[int(d)] for d in fraction)}"
    if not grouped and len(integer) == 4 and 1100 <= n <= 2099:
        return year(n)
    if len(integer) > 1 and integer.startswith("0"):
        return " ".join(_ONES[int(d)] for d in integer)  # codes like 007
    return cardinal(n)


def _money(m: re.Match[str]) -> str:
    unit, sub = _CURRENCY[m.group(1)]
    whole = int(m.group(2).replace(",", ""))
    text = f"{cardinal(whole)} {unit}{'' if whole == 1 else 's'}"
    if m.group(3):
        cents = int(m.group(3).ljust(2, "0"))
        if sub == "penny":
            sub = "penny" if cents == 1 else "pence"
        elif cents != 1:
            sub += "s"
        text += f" and {cardinal(cents)} {sub}"
    return text


def expand_numbers(text: str) -> str:
    text = _MONEY.sub(_money, text)
    text = _PERCENT.sub(lambda m: f"{m.group(1)} percent", text)
    text = _ORDINAL.sub(lambda m: ordinal(int(m.group(1))), text)
    return _NUMBER.sub(lambda m: _number(m.group(1), m.group(2)), text)
