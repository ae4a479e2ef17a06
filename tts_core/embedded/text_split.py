"""Cut text into the pieces the engine synthesizes one at a time, each becoming one audio chunk.

Sentences end at . ! ? and their CJK forms (not after "Mr." or inside "3.14"); clauses at commas,
colons, semicolons and dashes. Each sentence is one piece; when streaming, the first sentence's
first few words make a piece of their own (at a clause end, or outside English at a phrase
boundary) so the first audio arrives early, and very long sentences are cut at clauses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SENTENCE_PAUSE = 0.3  # seconds of silence after a sentence, at speed 1
CLAUSE_PAUSE = 0.12
# The first piece is what the listener waits for: keep it to a short phrase (about half a
# second of speech; its synthesis time is roughly proportional to its length), cut at a phrase
# boundary so it is still read as a well-formed phrase.
FIRST_PIECE_UNITS = 4
MIN_HEAD_UNITS = 3
MIN_PIECE_UNITS = 3  # the part after the head keeps at least this much
# When streaming, a sentence longer than this is cut at its clauses (commas, colons, ...), so its
# audio comes in pieces of a few seconds; clauses shorter than MIN_CLAUSE_UNITS join a neighbour.
LONG_SENTENCE_UNITS = 40
MIN_CLAUSE_UNITS = 10

_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "etc", "no", "e.g",
                  "i.e", "approx", "fig", "inc", "ltd", "co", "mt"}
_CLOSERS = "\"'”’)）」』】》"
_SENTENCE_END = re.compile(rf"([。！？!?…]+|\.(?!\d))([{_CLOSERS}]*)(\s*)|\n+")
_CLAUSE_END = re.compile(r"([，、,;；:：—]+)(?!\d)")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7a3\uf900-\ufaff]")
_WORD = re.compile(r"[^\W\d_\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7a3]+|\d+")
_KANA = re.compile(r"[\u3040-\u30ff]")
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")
_PHRASE_STARTERS = {"the", "a", "an", "and", "or", "but", "to", "of", "in", "on", "at", "for",
                    "with", "from", "by", "that", "which", "who", "when", "because", "so", "if"}


@dataclass(frozen=True)
class Piece:
    text: str
    pause: float  # silence after this piece, before the next one (seconds at speed 1)
    # Speech units of the sentence this piece was cut from (0: the piece is a whole sentence).
    # Kokoro picks its style by input length; a head read with a short input's style sounds
    # rushed and clipped, so the engine scales the length up to the sentence's.
    sentence_units: int = 0
    # Set on the piece after a head: the head's text. The engine reads the whole sentence again
    # and keeps what follows the head, so the rest is read as in the whole sentence.
    spoken: str = ""


def speech_units(text: str) -> int:
    """Rough syllable-ish size: each CJK/Hangul character and each other word counts one."""
    return len(_CJK.findall(text)) + len(_WORD.findall(_CJK.sub(" ", text)))


def split_sentences(text: str) -> list[str]:
    sentences, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        if m.group(1) == ".":
            before = text[start:m.start()].split()
            last = before[-1].lower().lstrip("(\"'") if before else ""
            followed = m.end() < len(text) and not m.group(3)  # "a.b", "U.S.A"
            rest = text[m.end():].lstrip()
            lower_next = rest[:1].islower()  # "U.S.A. is": not a sentence end
            if (last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha()) or followed
                    or lower_next):
                continue
        sentences.append(text[start:m.end()])
        start = m.end()
    sentences.append(text[start:])
    return [s.strip() for s in sentences if s.strip()]


def split_clauses(sentence: str) -> list[str]:
    parts, start = [], 0
    for m in _CLAUSE_END.finditer(sentence):
        parts.append(sentence[start:m.end()])
        start = m.end()
    parts.append(sentence[start:])
    return [p.strip() for p in parts if p.strip()]


def join(left: str, right: str) -> str:
    """CJK text has no spaces between clauses; other scripts need one."""
    cjk = ord(left[-1]) >= 0x2E80 or ord(right[0]) >= 0x2E80
    return left + ("" if cjk else " ") + right


def join_with_pause(head: str, rest: str) -> str:
    """``head`` and ``rest`` with a comma between them unless ``head`` ends a clause already:
    the sentence read again after a head pauses where the head stopped, so the seam falls in
    silence, and the listener hears a phrase break there rather than a jump."""
    if _CLAUSE_END.search(head[-1:]) or _KANA.search(head + rest):
        # Japanese: a comma after the particle the head ends on changed the reading of the
        # words around it (日语男 held-out CER 7.7 % with it, 3.3 % without)
        return join(head, rest)
    cjk = ord(head[-1]) >= 0x2E80 or ord(rest[0]) >= 0x2E80
    return head + ("，" if cjk else ", ") + rest


def _merge_short(clauses: list[str], min_units: int) -> list[str]:
    """Join clauses shorter than ``min_units`` with their neighbour."""
    merged: list[str] = []
    for clause in clauses:
        if merged and speech_units(merged[-1]) < min_units:
            merged[-1] = join(merged[-1], clause)
        else:
            merged.append(clause)
    if len(merged) > 1 and speech_units(merged[-1]) < min_units:
        tail = merged.pop()
        merged[-1] = join(merged[-1], tail)
    return merged


def _word_spans(text: str) -> list[tuple[int, int, str]]:
    """Words with their offsets and part of speech ("" outside Chinese): Chinese runs are cut
    and tagged by jieba, so no word is split in two; other words end at spaces."""
    from tts_core.embedded.g2p_zh import tagged_words

    spans = []
    for m in re.finditer(r"[\u3400-\u4dbf\u4e00-\u9fff]+|[^\s\u3400-\u4dbf\u4e00-\u9fff]+", text):
        if _HAN.match(m.group()):
            pos = m.start()
            for word, flag in tagged_words(m.group()):
                spans.append((pos, pos + len(word), flag))
                pos += len(word)
        else:
            spans.append((*m.span(), ""))
    return spans


def _binds_left(word: str, flag: str) -> bool:
    """Chinese words that belong to the word before them: particles (的, 了, 吗), localisers
    (里, 上), suffixes (们)."""
    return flag[:1] in ("u", "y", "e", "k", "f") or word in _BOUND_RIGHT


def _chinese_boundary(left: str, right: str, left_flag: str, right_flag: str) -> bool | None:
    """Whether a cut between two Chinese words falls between phrases (True), inside a phrase but
    between words (False), or would tear a unit apart (None: never cut there)."""
    if left_flag[:1] == "p" or left == "的" or (left_flag[:1] == "m" and right_flag[:1] in "mq"):
        return None  # a preposition, 的 or a numeral stays with what follows
    if right_flag[:1] in ("p", "c") or left_flag[:1] == "t":
        return True  # before a preposition or conjunction, after a time word
    # subject (noun or pronoun) | predicate (verb, adverb, adjective)
    return left_flag[:1] in ("n", "r", "s") and right_flag[:1] in ("v", "d", "a")


_BOUND_RIGHT = {"们", "里", "上", "下", "中", "吧", "吗", "呢", "啊"}


def _cut_candidates(clause: str) -> list[tuple[int, bool]]:
    """Offsets where ``clause`` may be cut, each flagged when it falls between phrases: in
    Chinese by part of speech (subject | predicate, before a preposition or conjunction, after
    a time word; never before a particle such as 的 or 了), elsewhere before a function word
    ("the", "and"), in Japanese after a particle."""
    if _KANA.search(clause):
        from tts_core.embedded.g2p_ja import particle_ends

        return [(end, True) for end in particle_ends(clause)]
    spans = _word_spans(clause)
    candidates = []
    for (left_start, end, left_flag), (start, stop, right_flag) in zip(spans, spans[1:],
                                                                        strict=False):
        right = clause[start:stop]
        if right_flag and _binds_left(right, right_flag):
            continue
        if left_flag and right_flag:  # two Chinese words
            between = _chinese_boundary(clause[left_start:end], right, left_flag, right_flag)
            if between is None:
                continue
        else:
            between = right.lower() in _PHRASE_STARTERS
        candidates.append((end, between))
    return candidates


def cut_head(clause: str, units: int = FIRST_PIECE_UNITS) -> tuple[str, str]:
    """Split ``clause`` (a sentence) after its first clause if that ends between
    ``MIN_HEAD_UNITS`` and ``units + 3`` speech units from its start, else (not in English) at
    the phrase boundary nearest ``units`` in that range, else at a word boundary within one
    unit of ``units`` (English: only past ``LONG_SENTENCE_UNITS``); ("", clause) if it is
    short already or has no such place. The tail
    keeps at least ``MIN_PIECE_UNITS``."""
    if speech_units(clause) <= units + MIN_PIECE_UNITS:
        return "", clause
    for m in _CLAUSE_END.finditer(clause):  # a comma is the best-formed place to pause
        head_units = speech_units(clause[:m.end()])
        if head_units > units + 3 or speech_units(clause[m.end():]) < MIN_PIECE_UNITS:
            break
        if head_units >= 2:  # "你好，", "Hello," are whole phrases
            return clause[:m.end()].strip(), clause[m.end():].strip()
    if not _CJK.search(clause):
        # English: a few words read alone lose their last sound ("Written notes" heard as "With
        # notes") and a comma read into the middle of a phrase blurs the word before it ("The
        # bakery" as "The baker yawns"): 英文女 held-out WER 6.3 % cut before a function word,
        # 3.2 % uncut. Only a clause end is a safe place to cut, unless the sentence is long:
        # then first audio must not wait for all of it (a run-on of 300 words without
        # punctuation), so it is cut at a phrase boundary as in other languages.
        if speech_units(clause) <= LONG_SENTENCE_UNITS:
            return "", clause
    candidates = []  # (distance from the target, offset, between phrases)
    for end, between_phrases in _cut_candidates(clause):
        head_units = speech_units(clause[:end])
        if speech_units(clause[end:]) < MIN_PIECE_UNITS or head_units > units + 3:
            break
        if head_units >= MIN_HEAD_UNITS and (between_phrases or abs(head_units - units) <= 1):
            candidates.append((abs(head_units - units), end, between_phrases))
    if not candidates:
        return "", clause
    phrases = [c for c in candidates if c[2]]
    _, end, _ = min(phrases or candidates)
    return clause[:end].strip(), clause[end:].strip()


def split_text(text: str, stream: bool = True) -> list[Piece]:
    """Pieces in speaking order; the last one has no pause after it.

    Every sentence is one piece, except when streaming: then the first sentence starts with a
    short head (:func:`cut_head`, so the first audio comes early) and sentences longer than
    ``LONG_SENTENCE_UNITS`` are cut at clauses. Kokoro reads short pieces far worse than whole
    sentences (Mandarin held-out CER 12 % with every clause a piece vs 4 % whole, Whisper base),
    and after the head there is time: each piece is made while the one before it plays.
    """
    pieces: list[Piece] = []
    for sentence in split_sentences(text):
        long = stream and speech_units(sentence) > LONG_SENTENCE_UNITS
        parts = _merge_short(split_clauses(sentence), MIN_CLAUSE_UNITS) if long else [sentence]
        for i, part in enumerate(parts):
            pause = SENTENCE_PAUSE if i == len(parts) - 1 else CLAUSE_PAUSE
            pieces.append(Piece(part, pause))
    if stream and pieces:
        first = pieces[0]
        head, tail = cut_head(first.text)
        if head:
            units = speech_units(first.text)
            pieces[0:1] = [Piece(head, 0.0, units), Piece(tail, first.pause, units, head)]
    if pieces:
        last = pieces[-1]
        pieces[-1] = Piece(last.text, 0.0, last.sentence_units, last.spoken)
    return pieces
