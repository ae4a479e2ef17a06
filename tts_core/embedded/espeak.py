"""Text to IPA with libespeak-ng 1.52, loaded through ctypes from the ``espeakng-loader`` wheel.

No system espeak is needed (Debian's 1.51 also reads Mandarin wrongly). libespeak-ng keeps global
state (the current voice, internal buffers), so every call holds one process-wide lock.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import espeakng_loader

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # report errors instead of calling exit()
_CHARS_UTF8 = 1
_PHONEMES_IPA = 0x02
_PHONEMES_TIE = 0x80  # join the letters of one multi-letter phoneme with the char in bits 8-23
TIE = "^"

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_voice: str | None = None


class EspeakError(RuntimeError):
    """libespeak-ng could not be loaded or does not know a voice."""


def _load() -> ctypes.CDLL:
    global _lib
    if _lib is not None:
        return _lib
    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetVoiceByName.restype = ctypes.c_int
    lib.espeak_TextToPhonemes.argtypes = [
        ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int]
    lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
    data = Path(espeakng_loader.get_data_path())
    # espeak-ng accepts the data folder itself or the folder that holds it.
    for path in (data, data.parent):
        rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, str(path).encode(), _INITIALIZE_DONT_EXIT)
        if rate > 0:
            _lib = lib
            return lib
    raise EspeakError(f"libespeak-ng failed to initialise with the data in {data}")


def _text_to_phonemes(text: str, voice: str, mode: int) -> list[str]:
    global _voice
    text = text.strip()
    if not text:
        return []
    with _lock:
        lib = _load()
        if voice != _voice:
            if lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise EspeakError(f"espeak-ng has no voice {voice!r}")
            _voice = voice
        buf = ctypes.create_string_buffer(text.encode("utf-8"))
        cursor = ctypes.c_void_p(ctypes.addressof(buf))
        words: list[str] = []
        # Each call converts one clause and moves the cursor on; it becomes NULL at the end.
        while cursor.value:
            out = lib.espeak_TextToPhonemes(ctypes.byref(cursor), _CHARS_UTF8, mode)
            if out:
                words.extend(out.decode("utf-8", errors="ignore").split())
    return words


def phonemize(text: str, voice: str) -> list[str]:
    """IPA for ``text`` read by espeak ``voice`` (e.g. "en-us", "ko", "ru"), one string per word.

    Multi-letter phonemes come joined by :data:`TIE` (``a^ɪ``) so callers can map them to single
    symbols. espeak drops punctuation; callers split clauses themselves.
    """
    return _text_to_phonemes(text, voice, _PHONEMES_IPA | _PHONEMES_TIE | (ord(TIE) << 8))


def phonemize_names(text: str, voice: str, separator: str = "_") -> list[str]:
    """espeak's own phoneme names (ASCII), ``separator`` between phonemes, one string per word.

    Some voices (yue) name phonemes after a romanisation and have no proper IPA for them.
    """
    return _text_to_phonemes(text, voice, ord(separator) << 8)
