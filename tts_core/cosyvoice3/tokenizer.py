"""The CosyVoice 3 text tokenizer: CosyVoice 2's, with CosyVoice 3's extra special tokens.

CosyVoice 3 registers, after CosyVoice 2's markers, ``<|endofsystem|>`` and 260 pronunciation
tokens — the model learned an embedding for each, at ids that follow from this order (151663 for
``<|endofsystem|>``, then 151664 … 151923 in the official vocabulary):

* English phones in ARPAbet, vowels with stress 0/1/2 or none: ``[AA]`` ``[AA0]`` ``[AA1]`` …
  ``[ZH]`` (84 tokens);
* Mandarin pinyin initials and tone-marked finals: ``[b]`` ``[zh]`` ``[ián]`` ``[ǐ]`` …
  (176 tokens).

Pronunciation inpainting: write the phones of a word in place of the word to force its
reading, e.g. ``报道[j][ǐ]予好评`` (给 read jǐ) or ``I [R][EH1][D] it yesterday``. The text
front end passes every one of these tokens through untouched; the tokenizer keeps each whole.
"""

from __future__ import annotations

from ..cosyvoice2.tokenizer import COSYVOICE2_SPECIAL_TOKENS, CosyVoice2Tokenizer

END_OF_SYSTEM = "<|endofsystem|>"

_ARPABET_VOWELS = "AA AE AH AO AW AY EH ER EY IH IY OW OY UH UW".split()
_ARPABET_CONSONANTS = "B CH D DH F G HH JH K L M N NG P R S SH T TH V W Y Z ZH".split()
# Pinyin pieces the model knows (initials, and finals with their tone mark), in the official
# (sorted) order.
_PINYIN = """
a ai an ang ao b c ch d e ei en eng f g h i ian in ing iu ià iàn iàng iào iá ián iáng iáo iè ié
iòng ióng iù iú iā iān iāng iāo iē iě iōng iū iǎ iǎn iǎng iǎo iǒng iǔ j k l m n o ong ou p q r s
sh t u uang ue un uo uà uài uàn uàng uá uái uán uáng uè ué uì uí uò uó uā uāi uān uāng uē uě uī
uō uǎ uǎi uǎn uǎng uǐ uǒ vè w x y z zh à ài àn àng ào á ái án áng áo è èi èn èng èr é éi én éng ér
ì ìn ìng í ín íng ò òng òu ó óng óu ù ùn ú ún ā āi ān āng āo ē ēi ēn ēng ě ěi ěn ěng ěr ī īn īng
ō ōng ōu ū ūn ǎ ǎi ǎn ǎng ǎo ǐ ǐn ǐng ǒ ǒng ǒu ǔ ǔn ǘ ǚ ǜ
""".split()

ENGLISH_PHONE_TOKENS: tuple[str, ...] = tuple(f"[{phone}]" for phone in sorted(
    [v + stress for v in _ARPABET_VOWELS for stress in ("", "0", "1", "2")]
    + _ARPABET_CONSONANTS))  # sorted by the phone name: [AA] [AA0] [AA1] [AA2] [AE] ...
PINYIN_TOKENS: tuple[str, ...] = tuple(f"[{p}]" for p in _PINYIN)
PRONUNCIATION_TOKENS: tuple[str, ...] = ENGLISH_PHONE_TOKENS + PINYIN_TOKENS

# Registration order matters: ids follow it.
COSYVOICE3_SPECIAL_TOKENS: tuple[str, ...] = (
    *COSYVOICE2_SPECIAL_TOKENS, END_OF_SYSTEM, *PRONUNCIATION_TOKENS)


class CosyVoice3Tokenizer(CosyVoice2Tokenizer):
    """Text -> Qwen2 ids with CosyVoice 3's special and pronunciation tokens kept whole."""

    SPECIAL_TOKENS = COSYVOICE3_SPECIAL_TOKENS
