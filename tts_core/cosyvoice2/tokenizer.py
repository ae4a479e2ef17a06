"""The CosyVoice 2 text tokenizer: Qwen2's byte-level BPE plus CosyVoice's added special tokens.

The official model directory ships the Qwen2 files in ``CosyVoice-BlankEN/`` (``vocab.json``,
``merges.txt``, ``tokenizer_config.json``; some copies also ``tokenizer.json``). We rebuild the
same pipeline with the ``tokenizers`` library: NFC normalisation, Qwen2's pre-tokenisation regex,
byte-level mapping, BPE, and then the added tokens. CosyVoice 2 registers its markers after the
ones already in the config, in a fixed order, and the model learned embeddings for exactly those
ids — so the list and its order below must not change.

Language tags such as ``<|en|>`` are *not* added tokens in CosyVoice 2 (they were special in the
CosyVoice 1 Whisper tokenizer); the Qwen2 BPE splits them like any other text, as the official
model saw them in training.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)

# Qwen2's pre-tokenisation: contractions, letter runs (with one leading non-letter), single
# digits, punctuation runs, newlines and spaces.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

ENDOFTEXT = "<|endoftext|>"
# Added by CosyVoice 2 on top of the Qwen2 tokenizer, in registration order (ids follow it).
COSYVOICE2_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|im_start|>", "<|im_end|>", "<|endofprompt|>",
    "[breath]", "<strong>", "</strong>", "[noise]",
    "[laughter]", "[cough]", "[clucking]", "[accent]",
    "[quick_breath]",
    "<laughter>", "</laughter>",
    "[hissing]", "[sigh]", "[vocalized-noise]",
    "[lipsmack]", "[mn]",
)
ENDOFPROMPT = "<|endofprompt|>"  # separates an instruction from the text in instruct mode

# Qwen2's own added tokens, as its tokenizer_config.json lists them (used by the tiny writer).
_QWEN2_BASE_ADDED = (ENDOFTEXT, "<|im_start|>", "<|im_end|>")


def _pipeline(tok: Tokenizer) -> Tokenizer:
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _config_added_tokens(config: dict[str, Any]) -> list[tuple[int, AddedToken]]:
    """Added tokens of a HF ``tokenizer_config.json`` (``added_tokens_decoder``), by id."""
    entries = config.get("added_tokens_decoder") or {}
    out = []
    for key, entry in entries.items():
        content = entry["content"] if isinstance(entry, dict) else str(entry)
        flags = entry if isinstance(entry, dict) else {}
        out.append((int(key), AddedToken(
            content, single_word=bool(flags.get("single_word", False)),
            lstrip=bool(flags.get("lstrip", False)), rstrip=bool(flags.get("rstrip", False)),
            normalized=bool(flags.get("normalized", False)),
            special=bool(flags.get("special", True)))))
    return sorted(out, key=lambda item: item[0])


class CosyVoice2Tokenizer:
    """Text -> Qwen2 ids with CosyVoice 2's special tokens kept whole. Safe to share."""

    # The added tokens, in registration order (CosyVoice 3's tokenizer extends the list).
    SPECIAL_TOKENS: tuple[str, ...] = COSYVOICE2_SPECIAL_TOKENS

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        specials = [AddedToken(t, normalized=False, special=True)
                    for t in (ENDOFTEXT, *self.SPECIAL_TOKENS)]
        self._tok.add_special_tokens(specials)  # tokens already present keep their ids
        self.special_token_ids: dict[str, int] = {}
        for token in (ENDOFTEXT, *self.SPECIAL_TOKENS):
            token_id = self._tok.token_to_id(token)
            if token_id is None:  # pragma: no cover - add_special_tokens guarantees it
                raise RuntimeError(f"special token {token} was not registered")
            self.special_token_ids[token] = token_id
        self.max_token_id = max(self._tok.get_vocab(with_added_tokens=True).values())

    @classmethod
    def from_dir(cls, blank_en_dir: Path) -> Self:
        """Load from a ``CosyVoice-BlankEN`` directory (``tokenizer.json`` or vocab + merges)."""
        root = Path(blank_en_dir)
        config_path = root / "tokenizer_config.json"
        try:
            config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() \
                else {}
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read {config_path}: {error}") from error
        if (root / "tokenizer.json").is_file():
            try:
                tok = Tokenizer.from_file(str(root / "tokenizer.json"))
            except Exception as error:  # the Rust side raises a bare Exception
                raise ValueError(f"cannot read {root / 'tokenizer.json'}: {error}") from error
            return cls(tok)
        vocab_path, merges_path = root / "vocab.json", root / "merges.txt"
        missing = [p.name for p in (vocab_path, merges_path) if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"tokenizer files missing in {root}: {', '.join(missing)} (a CosyVoice model "
                "directory needs CosyVoice-BlankEN/vocab.json and merges.txt, or tokenizer.json)")
        try:
            vocab, merges = models.BPE.read_file(str(vocab_path), str(merges_path))
        except Exception as error:
            raise ValueError(f"cannot read the BPE files in {root}: {error}") from error
        added = _config_added_tokens(config)
        # Give the config's added tokens their listed ids: putting them in the model vocabulary
        # makes the added-token registration below reuse those ids instead of counting on.
        for token_id, token in added:
            vocab.setdefault(token.content, token_id)
        tok = _pipeline(Tokenizer(models.BPE(vocab, merges, unk_token=None, fuse_unk=False,
                                             byte_fallback=False)))
        if added:
            tok.add_special_tokens([t for _, t in added if t.special])
            tok.add_tokens([t for _, t in added if not t.special])
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def tokens(self, text: str) -> list[str]:
        """The pieces ``text`` splits into (byte-level spelling), for debugging."""
        return self._tok.encode(text).tokens

    @property
    def backend(self) -> Tokenizer:
        return self._tok


# --- a tiny stand-in for tests and random model directories ------------------------------------

_TINY_CORPUS = """\
The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore.
Hello world, this is a small text-to-speech test: numbers 0 1 2 3 4 5 6 7 8 9, 2025 and 3.14!
How are you today? I'm fine, thanks. We'll see what they've done; it's what you'd expect.
Streaming speech synthesis turns text into audio while the text is still arriving.
今天天气很好，我们一起去公园散步吧。你好，世界！这是一个语音合成的测试。
希望你以后做的比我还好呦。收到好友从远方寄来的生日礼物，那份意外的惊喜让我心中充满了甜蜜。
こんにちは、元気ですか。안녕하세요, 반갑습니다. Bonjour, ça va? Grüß Gott, schöne Grüße.
"""


def write_tiny_tokenizer(dir: Path, vocab_size: int,
                         special_tokens: Sequence[str] = COSYVOICE2_SPECIAL_TOKENS) -> Path:
    """Write a small Qwen2-style tokenizer (vocab.json, merges.txt, tokenizer_config.json).

    Byte-level BPE trained on a built-in multilingual paragraph with Qwen2's pre-tokeniser, so any
    text encodes. Every id — Qwen2's three added tokens and the model's ``special_tokens``
    included — is below ``vocab_size``, so the result fits a Qwen2 embedding of that many rows.
    """
    n_added = len(set(_QWEN2_BASE_ADDED) | set(special_tokens))
    base = vocab_size - n_added
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    if base < len(byte_alphabet):
        raise ValueError(f"vocab_size must be at least {len(byte_alphabet) + n_added} "
                         f"(256 byte symbols + {n_added} added tokens), got {vocab_size}")
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _pipeline(Tokenizer(models.BPE(unk_token=None)))
    trainer = trainers.BpeTrainer(vocab_size=base, min_frequency=1, show_progress=False,
                                  initial_alphabet=byte_alphabet, special_tokens=[])
    tok.train_from_iterator(_TINY_CORPUS.splitlines(), trainer=trainer)
    tok.model.save(str(out))  # vocab.json + merges.txt
    first = tok.get_vocab_size(with_added_tokens=False)
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": {
            str(first + i): {"content": t, "lstrip": False, "normalized": False,
                             "rstrip": False, "single_word": False, "special": True}
            for i, t in enumerate(_QWEN2_BASE_ADDED)},
        "bos_token": None, "eos_token": ENDOFTEXT, "pad_token": ENDOFTEXT,
        "clean_up_tokenization_spaces": False, "errors": "replace", "model_max_length": 32768,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out
