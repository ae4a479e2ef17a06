"""CosyVoice 3 tokenizer: CosyVoice 2's pipeline with the extra special and pronunciation tokens.

A tiny Qwen2-style BPE is written in the official file layout and loaded through ``from_dir``;
the ids of the added tokens must keep the official order (the README of the CosyVoice 3 parity
set derives them: ``<|endofprompt|>`` 151646, ``[breath]`` 151647, ``<|endofsystem|>`` 151663,
``[AA]`` 151664 … ``[ǜ]`` 151923).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tts_core.cosyvoice2.tokenizer import (
    COSYVOICE2_SPECIAL_TOKENS,
    ENDOFPROMPT,
    CosyVoice2Tokenizer,
    write_tiny_tokenizer,
)
from tts_core.cosyvoice3.tokenizer import (
    COSYVOICE3_SPECIAL_TOKENS,
    END_OF_SYSTEM,
    ENGLISH_PHONE_TOKENS,
    PINYIN_TOKENS,
    PRONUNCIATION_TOKENS,
    CosyVoice3Tokenizer,
)

VOCAB = 1200
OFFICIAL_IDS = {ENDOFPROMPT: 151646, "[breath]": 151647, END_OF_SYSTEM: 151663, "[AA]": 151664,
                "[AA1]": 151666, "[ZH]": 151747, "[a]": 151748, "[ǜ]": 151923}


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> CosyVoice3Tokenizer:
    root = write_tiny_tokenizer(tmp_path_factory.mktemp("blank_en"), VOCAB,
                                special_tokens=COSYVOICE3_SPECIAL_TOKENS)
    return CosyVoice3Tokenizer.from_dir(root)


def test_token_lists() -> None:
    assert len(ENGLISH_PHONE_TOKENS) == 84 and len(PINYIN_TOKENS) == 176
    assert len(set(PRONUNCIATION_TOKENS)) == 260
    for group in (ENGLISH_PHONE_TOKENS, PINYIN_TOKENS):  # official order: sorted by name
        assert [t[1:-1] for t in group] == sorted(t[1:-1] for t in group)
    assert COSYVOICE3_SPECIAL_TOKENS[:len(COSYVOICE2_SPECIAL_TOKENS)] == COSYVOICE2_SPECIAL_TOKENS
    assert all(t.startswith("[") and t.endswith("]") for t in PRONUNCIATION_TOKENS)


def test_added_ids_follow_the_official_order(tok: CosyVoice3Tokenizer) -> None:
    base = tok.token_to_id(ENDOFPROMPT)
    for token, official in OFFICIAL_IDS.items():
        assert tok.token_to_id(token) - base == official - OFFICIAL_IDS[ENDOFPROMPT], token
    ids = [tok.token_to_id(t) for t in COSYVOICE3_SPECIAL_TOKENS[2:]]
    assert ids == list(range(base, base + len(ids)))  # dense, in registration order
    assert tok.max_token_id < VOCAB


@pytest.mark.parametrize("token", ["[AA1]", "[ǐ]", "[j]", "[zh]", "[iáng]", END_OF_SYSTEM])
def test_pronunciation_tokens_stay_whole(tok: CosyVoice3Tokenizer, token: str) -> None:
    ids = tok.encode(f"报道{token}予好评")
    assert ids == tok.encode("报道") + [tok.token_to_id(token)] + tok.encode("予好评")


def test_cv2_tokenizer_splits_what_cv3_keeps(tok: CosyVoice3Tokenizer, tmp_path: Path) -> None:
    cv2 = CosyVoice2Tokenizer.from_dir(write_tiny_tokenizer(tmp_path, 1000))
    assert cv2.token_to_id("[AA1]") is None
    assert len(cv2.encode("[AA1]")) > 1 and len(tok.encode("[AA1]")) == 1
