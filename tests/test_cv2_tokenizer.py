"""CosyVoice 2 tokenizer: Qwen2 byte-level BPE + CosyVoice's special tokens, on a tiny vocab.

The official Qwen2 files are not available offline, so a tiny BPE is trained and written in the
official file layout (vocab.json, merges.txt, tokenizer_config.json) and loaded through the same
``from_dir`` path as a released model directory.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest

from tts_core.cosyvoice2.tokenizer import (
    COSYVOICE2_SPECIAL_TOKENS,
    ENDOFPROMPT,
    ENDOFTEXT,
    CosyVoice2Tokenizer,
    write_tiny_tokenizer,
)

VOCAB = 1000
SAMPLES = [
    "Hello world, this is a test.",
    "收到好友从远方寄来的生日礼物，那份意外的惊喜让我心中充满了甜蜜。",
    "こんにちは、元気ですか。안녕하세요!",
    "Mixed 中文 and English 123 4567 — “quotes” ✓ 🙂",
    "  leading spaces\n\nand\tnew lines  ",
    "I'm sure they'll say it's what we'd've done",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_tokenizer(tmp_path_factory.mktemp("blank_en"), VOCAB)


@pytest.fixture(scope="module")
def tok(tiny_dir: Path) -> CosyVoice2Tokenizer:
    return CosyVoice2Tokenizer.from_dir(tiny_dir)


def test_writer_produces_the_official_file_layout(tiny_dir: Path) -> None:
    names = {p.name for p in tiny_dir.iterdir()}
    assert names == {"vocab.json", "merges.txt", "tokenizer_config.json"}
    vocab = json.loads((tiny_dir / "vocab.json").read_text())
    assert sorted(vocab.values()) == list(range(len(vocab)))  # dense ids 0..n-1
    assert (tiny_dir / "merges.txt").read_text().startswith("#version")
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    assert [e["content"] for e in config["added_tokens_decoder"].values()][0] == ENDOFTEXT


def test_writer_is_deterministic(tmp_path: Path, tiny_dir: Path) -> None:
    again = write_tiny_tokenizer(tmp_path, VOCAB)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes()


def test_every_id_fits_the_embedding(tok: CosyVoice2Tokenizer) -> None:
    assert tok.max_token_id < VOCAB
    for text in SAMPLES:
        assert all(0 <= i < VOCAB for i in tok.encode(text))


def test_writer_rejects_a_vocab_too_small_for_bytes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least"):
        write_tiny_tokenizer(tmp_path, 200)


def test_special_tokens_are_single_ids_in_registration_order(
        tok: CosyVoice2Tokenizer, tiny_dir: Path) -> None:
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    listed = {e["content"]: int(k) for k, e in config["added_tokens_decoder"].items()}
    # Tokens already in the config keep their ids; CosyVoice's new ones follow, in order.
    next_id = max(listed.values()) + 1
    for token in COSYVOICE2_SPECIAL_TOKENS:
        expected = listed.get(token)
        if expected is None:
            expected, next_id = next_id, next_id + 1
        assert tok.special_token_ids[token] == expected, token
        assert tok.encode(token) == [expected], token
    assert tok.special_token_ids[ENDOFTEXT] == listed[ENDOFTEXT]


def test_special_tokens_are_never_split_inside_text(tok: CosyVoice2Tokenizer) -> None:
    for token in COSYVOICE2_SPECIAL_TOKENS:
        special = tok.special_token_ids[token]
        for text in (f"abc{token}def", f"你好{token}世界", f" {token} ", f"{token}{token}"):
            ids = tok.encode(text)
            assert ids.count(special) == text.count(token), (token, text)
            assert tok.decode(ids, skip_special_tokens=False) == text
    instruct = f"用四川话说这句话{ENDOFPROMPT}"
    assert tok.encode(instruct)[-1] == tok.special_token_ids[ENDOFPROMPT]


def test_roundtrip(tok: CosyVoice2Tokenizer) -> None:
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids, text
        assert tok.decode(ids) == text


def test_decode_skips_special_tokens_by_default(tok: CosyVoice2Tokenizer) -> None:
    ids = tok.encode("He said[laughter] hi<|endofprompt|>")
    assert tok.decode(ids) == "He said hi"
    assert tok.decode(ids, skip_special_tokens=False) == "He said[laughter] hi<|endofprompt|>"


def test_language_tags_are_plain_text_in_cosyvoice2(tok: CosyVoice2Tokenizer) -> None:
    """<|zh|>, <|en|>, ... were special in CosyVoice 1's Whisper tokenizer, not in CosyVoice 2:
    the Qwen2 BPE splits them like text, which is what the official model was trained on."""
    specials = set(tok.special_token_ids.values())
    for lang in ("zh", "en", "ja", "ko", "yue"):
        tag = f"<|{lang}|>"
        ids = tok.encode(tag + "Hello")
        assert len(tok.encode(tag)) > 1
        assert not specials & set(ids)
        assert tok.decode(ids) == tag + "Hello"


def test_qwen2_pre_tokenisation(tok: CosyVoice2Tokenizer) -> None:
    # Digits are always split one by one; NFC makes composed and decomposed accents equal.
    assert tok.tokens("2025") == ["2", "0", "2", "5"]
    composed = "café"
    decomposed = unicodedata.normalize("NFD", composed)
    assert decomposed != composed
    assert tok.encode(decomposed) == tok.encode(composed)


def test_added_token_ids_follow_a_longer_config(tmp_path: Path, tiny_dir: Path) -> None:
    """Qwen2.5 configs list more added tokens; CosyVoice's ids must start after the last."""
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((tiny_dir / name).read_bytes())
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    last = max(int(k) for k in config["added_tokens_decoder"])
    for offset, extra in enumerate(("<|object_ref_start|>", "<|object_ref_end|>", "<|box|>"), 1):
        config["added_tokens_decoder"][str(last + offset)] = {
            "content": extra, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    longer = CosyVoice2Tokenizer.from_dir(tmp_path)
    assert longer.token_to_id("<|box|>") == last + 3
    assert longer.special_token_ids[ENDOFPROMPT] == last + 4
    assert longer.encode("<|box|>") == [last + 3]


def test_tokenizer_json_gives_the_same_ids(tmp_path: Path, tok: CosyVoice2Tokenizer) -> None:
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    from_json = CosyVoice2Tokenizer.from_dir(tmp_path)
    assert from_json.special_token_ids == tok.special_token_ids
    for text in SAMPLES + ["x[breath]y<strong>z</strong>"]:
        assert from_json.encode(text) == tok.encode(text)


def test_missing_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        CosyVoice2Tokenizer.from_dir(tmp_path)
