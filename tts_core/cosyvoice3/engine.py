"""The CosyVoice 3 engine: the CosyVoice 2 engine's modes and request handling on CosyVoice 3 parts.

Everything a request goes through — validation, text normalisation and segmentation, prompt
features, registered speakers, streaming of text and audio, cancellation — is the CosyVoice 2
engine's (:class:`~tts_core.cosyvoice2.engine.CosyVoice2Engine`, which this class extends). What
differs is the model directory (:mod:`.model_dir`), the vocoder driver (:mod:`.token2wav`), the
tokenizer's extra tokens (:mod:`.tokenizer`), and how the LM prompt is laid out, since CosyVoice 3
was trained with a system text that ends in ``<|endofprompt|>``:

==================  ============================================================================
mode                LM prompt text (prompt speech tokens only in zero_shot)
==================  ============================================================================
zero_shot           ``You are a helpful assistant.<|endofprompt|>`` + transcript of the prompt
cross_lingual       ``You are a helpful assistant.<|endofprompt|>`` (no transcript, no tokens)
instruct            ``You are a helpful assistant. <instruction><|endofprompt|>`` ("instruct2")
sft                 a stored speaker: as zero_shot with its transcript, else as cross_lingual
voice_conversion    no LM: the source speech's tokens (speech tokenizer v3) with the prompt voice
==================  ============================================================================

A transcript or instruction that already contains ``<|endofprompt|>`` is used as given, so the
reference's own prompt strings (``You are a helpful assistant. 请用广东话表达。<|endofprompt|>``)
work unchanged. Unlike CosyVoice 2 there are no ``<|lang|>`` tags.

Instructions the model was trained on are listed in :data:`TRAINED_INSTRUCTIONS` (dialects,
volume, speed, emotions, role play); others may work less well.

Fine-grained control and pronunciation inpainting go in the text to speak: markers such as
``[breath]``, ``[laughter]``, ``<strong>…</strong>``, and phone tokens such as ``[j][ǐ]`` (pinyin)
or ``[R][EH1][D]`` (ARPAbet) in place of a word (see :mod:`.tokenizer`).

The LM's long runs of silent tokens are thinned before the vocoder (see
:func:`.llm.drop_long_silences`).
Registered speakers are stored with the tag ``cosyvoice3``: speakers registered by the
CosyVoice 2 engine (other speech tokenizer, other mel range) are refused with a message that says
to register them again, never silently reused.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from ..cosyvoice2.engine import CosyVoice2Engine
from ..cosyvoice2.token2wav import StreamSchedule
from ..cosyvoice2.tokenizer import ENDOFPROMPT
from .llm import SilenceThinner, drop_long_silences
from .model_dir import load_model_dir
from .token2wav import DIT_CACHE_MAX_FRAMES, Token2Wav

SYSTEM_PROMPT = "You are a helpful assistant."

# The instructions of the reference's training list (instruct mode wraps each as
# "You are a helpful assistant. <instruction><|endofprompt|>").
TRAINED_INSTRUCTIONS: tuple[str, ...] = (
    # dialects
    *(f"请用{dialect}话表达。" for dialect in (
        "广东", "东北", "甘肃", "贵州", "河南", "湖北", "湖南", "江西", "闽南", "宁夏", "山西",
        "陕西", "山东", "上海", "四川", "天津", "云南")),
    # volume
    "Please say a sentence as loudly as possible.",
    "Please say a sentence in a very soft voice.",
    # speed
    "请用尽可能慢地语速说一句话。",
    "请用尽可能快地语速说一句话。",
    # emotion
    "请非常开心地说一句话。",
    "请非常伤心地说一句话。",
    "请非常生气地说一句话。",
    # role play
    "我想体验一下小猪佩奇风格，可以吗？",
    "你可以尝试用机器人的方式解答吗？",
)


class CosyVoice3Engine(CosyVoice2Engine):
    """CosyVoice 3 synthesis engine (see the module docstring for the prompt layouts)."""

    name = "cosyvoice3"
    display_name = "CosyVoice 3"
    speaker_features = "cosyvoice3"
    uses_language_tags = False
    load_models = staticmethod(load_model_dir)
    # batch scheduler: the silence thinning of _lm_tokens, token by token
    _vocoder_token_filter = SilenceThinner

    def _make_token2wav(self, schedule: StreamSchedule, flow_cache_bytes: int) -> Token2Wav:
        # the DiT cache is bounded in frames (the budget is computed from bytes per frame)
        frame_bytes = self._flow_cache_frame_bytes() or 1
        return Token2Wav(self.models.flow, self.models.hift,
                         token_mel_ratio=self.models.token_mel_ratio, schedule=schedule,
                         dit_cache_max_frames=flow_cache_bytes // frame_bytes)

    # Streams keep the DiT's cache (cosyvoice3/token2wav.py) instead of CosyVoice 2's flow
    # cache. Its tensors hold exactly their frames, but each chunk concatenates one Euler
    # step's keys/values into new tensors before dropping the old: a tenth more at 10 steps.
    _flow_cache_slack = 1.1

    def _flow_cache_frame_bytes(self) -> int | None:
        return int(self.models.flow.stream_cache_bytes_per_frame(self.models.dtype))

    def _flow_cache_limit(self, frame_bytes: int) -> int:
        return DIT_CACHE_MAX_FRAMES * frame_bytes

    def _system_ids(self) -> list[int]:
        return self.tokenizer.encode(SYSTEM_PROMPT + ENDOFPROMPT)

    # Prompt texts that carry their own system part are used verbatim, as the reference does
    # (normalising would e.g. drop the space in "assistant. 请用…", which the model was trained
    # with); instructions are never normalised (the trained ones are written out already).

    def _normalize_prompt_text(self, text: str) -> str:
        return text.strip() if ENDOFPROMPT in text else super()._normalize_prompt_text(text)

    def _lm_instruction(self, instruct_text: str) -> str:
        instruction = instruct_text.strip()
        if ENDOFPROMPT in instruction:
            return instruction
        return f"{SYSTEM_PROMPT} {instruction}{ENDOFPROMPT}"

    def _lm_transcript_ids(self, transcript_ids: list[int]) -> list[int]:
        if self.models.lm.config.end_of_prompt_id in transcript_ids:
            return transcript_ids
        return self._system_ids() + transcript_ids

    def _lm_no_prompt_ids(self) -> list[int]:
        return self._system_ids()

    def _lm_tokens(self, tokens: Iterator[int]) -> Iterable[int]:
        return drop_long_silences(tokens)
