"""Mandarin text -> Kokoro phonemes with misaki's zh G2P (jieba words, pypinyin readings).

Kokoro v1.0 was trained on misaki's first Mandarin scheme (IPA with tone arrows ↓→↗↘), which is
its ``ZHG2P()`` without a version; numbers are read in Chinese (cn2an) before lookup.
"""

from __future__ import annotations

import logging
import threading
from functools import lru_cache

_lock = threading.Lock()  # jieba's lazy dictionary load and cn2an are not meant for threads


@lru_cache(maxsize=1)
def _jieba():
    import jieba

    jieba.setLogLevel(logging.WARNING)  # it prints a banner on its first cut otherwise
    jieba.initialize()  # builds the prefix dictionary now, not on the first request
    return jieba


@lru_cache(maxsize=1)
def _g2p():
    _jieba()
    from misaki.zh import ZHG2P

    return ZHG2P()


def words(text: str) -> list[str]:
    """Chinese word segmentation (jieba)."""
    with _lock:
        return _jieba().lcut(text)


@lru_cache(maxsize=1)
def _posseg():
    import jieba.posseg

    _jieba()
    return jieba.posseg


def tagged_words(text: str) -> list[tuple[str, str]]:
    """Words with jieba's part-of-speech flags (n noun, v verb, p preposition, c conjunction,
    u* particle, t time word, m numeral, ...); the words join up to ``text``."""
    with _lock:
        return [(pair.word, pair.flag) for pair in _posseg().lcut(text)]


def phonemize(text: str) -> str:
    with _lock:
        phonemes, _ = _g2p()(text)
    return phonemes
