"""Bounded work per request: pathological words are refused, long numbers read in groups, and
no model call (so no first chunk) grows with the length of the text."""

from __future__ import annotations

import random
import threading

import pytest
import requests

from tts_core import text_guard
from tts_core.engine import InvalidRequest, Mode, SynthesisRequest

_RNG = random.Random(3)
LONG_WORD = "".join(_RNG.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(1400))
LONG_NUMBER = "".join(_RNG.choice("123456789") for _ in range(1000))


@pytest.mark.parametrize("text", [
    "x" * 65, "Hello " + "ab" * 40 + " there", "Привет " + "д" * 70, "ก" * 257,
])
def test_over_long_words_are_refused_with_their_position(text: str) -> None:
    with pytest.raises(InvalidRequest, match=r"-letter word at character \d+.*put spaces"):
        text_guard.check_words(text)


@pytest.mark.parametrize("text", [
    "x" * 64, "Rindfleischetikettierungsüberwachungsaufgabenübertragungsgesetz",
    "pneumonoultramicroscopicsilicovolcanoconiosis", "字" * 2000, "한국어" * 300,
    "ก" * 256, "well-" * 100, "a b " * 500,
])
def test_real_text_passes(text: str) -> None:
    text_guard.check_words(text)


@pytest.mark.parametrize("text, expected", [
    ("call 123456789012345 now", "call 123456789012345 now"),  # 15 digits: still a number
    ("1,234,567 people", "1,234,567 people"),
    ("code 1234567890123456", "code 1 2 3, 4 5 6, 7 8 9, 0 1 2, 3 4 5, 6"),
    ("1,234,567,890,123,456,789", "1 2 3, 4 5 6, 7 8 9, 0 1 2, 3 4 5, 6 7 8, 9"),
    ("pi is 3.14159265358979323", "pi is 3.1 4 1, 5 9 2, 6 5 3, 5 8 9, 7 9 3, 2 3"),
])
def test_long_digit_runs_are_read_in_groups(text: str, expected: str) -> None:
    assert text_guard.group_long_numbers(text) == expected


def test_guard_is_linear_and_every_group_is_short() -> None:
    spoken = text_guard.guard_text(LONG_NUMBER)
    groups = spoken.split(", ")
    assert len(groups) == 334 and all(len(g.split()) <= 3 for g in groups)


@pytest.fixture(scope="module")
def embedded():
    from tts_core.embedded.engine import EmbeddedEngine

    return EmbeddedEngine(threads=1)


def _chunk_seconds(engine, text: str, chunks: int) -> list[float]:
    out = []
    stream = engine.synthesize(SynthesisRequest(Mode.SFT, text=text, speaker_id="英文女"),
                               threading.Event())
    for chunk in stream:
        out.append(len(chunk) / 24000)
        if len(out) == chunks:
            break
    stream.close()
    return out


def test_embedded_first_chunk_does_not_grow_with_the_text(embedded) -> None:
    # The work before the first audio is one model call; its length is bounded by the first
    # clause, whatever follows: a 1 000-digit number, or 300 words without punctuation.
    number = _chunk_seconds(embedded, f"The code is {LONG_NUMBER}.", 1)
    run_on = _chunk_seconds(embedded, " ".join(["people like spoken words"] * 75), 1)
    assert number[0] < 4.0 and run_on[0] < 4.0, (number, run_on)
    # No later call may grow without bound either (CALL_TOKENS: about 15 s of speech).
    long_clause = _chunk_seconds(embedded, "Well, " + " ".join(["people like words"] * 100), 2)
    assert max(long_clause) < 20.0, long_clause
    with pytest.raises(InvalidRequest, match="1400-letter word"):
        embedded.validate(SynthesisRequest(Mode.SFT, text=LONG_WORD, speaker_id="英文女"))


def test_cosyvoice2_front_end_bounds_segments() -> None:
    from tests.test_cv2_text_frontend import count_units
    from tts_core.cosyvoice2.text_frontend import TextFrontend

    frontend = TextFrontend(count_units)
    segments = frontend.segments(f"The code is {LONG_NUMBER}.", "en")
    assert len(segments) > 10 and max(count_units(s) for s in segments) <= frontend.max_tokens
    digits = "zero one two three four five six seven eight nine".split()
    first_group = " ".join(digits[int(d)] for d in LONG_NUMBER[:3])
    assert segments[0].startswith(f"The code is {first_group}, "), segments[0]
    with pytest.raises(InvalidRequest, match="1400-letter word"):
        frontend.segments(f"Hello {LONG_WORD}.", "en")


def test_rest_refuses_a_pathological_word_at_once(stack) -> None:
    reply = requests.post(f"{stack.rest_url}/inference_sft", headers=stack.headers,
                          data={"tts_text": LONG_WORD, "spk_id": "英文女"}, timeout=60)
    assert reply.status_code == 400, reply.text
    assert "1400-letter word" in reply.json()["message"]
