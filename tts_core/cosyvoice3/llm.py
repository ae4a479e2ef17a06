"""The CosyVoice 3 text-to-speech-token language model.

The same Qwen2 backbone and decoding loops as CosyVoice 2 (:mod:`tts_core.cosyvoice2.llm`, which
this module extends rather than repeats); what differs is the speech side:

* There is no ``llm_embedding``. The start-of-sequence and task-id input rows live in
  ``speech_embedding``, which has ``speech_token_size + 200`` rows: speech ids 0…6560, then 6561
  start, 6562 end of speech, 6563 task id, 6564 fill, 6565…6760 unused.
* ``llm_decoder`` has no bias and ``speech_token_size + 200`` outputs; every id from 6561 on ends
  speech.
* The prompt must contain ``<|endofprompt|>`` (id 151646 in the official vocabulary): the model
  was trained with a system text (``You are a helpful assistant.``) or an instruction ending in
  it. In bidirectional streaming the prompt up to that token is fed at once with the start row,
  so decoding starts as soon as the prompt speech is placed.

Before ``min_len`` tokens the sampler is asked for a speech token (``ignore_eos``). Our sampler
then refuses every stop id (6561…6760). The reference masks only id 6561 there — CosyVoice 2's
end-of-speech id, which in CosyVoice 3 is the start row — so its sampler can still stop early
with 6562; we do not copy that defect (the recorded log-probabilities are raw, before any mask,
so parity is unaffected; ``tests/test_cv3_llm_parity.py`` checks both). The same refusal holds
in the text phase of bidirectional streaming, where the reference could sample 6562 (and raise)
or 6564 (an early fill); fills come only from the 15-token schedule here. In the final phase any
stop id ends the utterance (the reference raises on ids other than 6562).

The reference driver also thins out silence: in a run of consecutive "silent" speech tokens only
the first five go on to the vocoder (:func:`drop_long_silences`); the LM itself still sees all.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..cosyvoice2.hyperyaml import Tagged
from ..cosyvoice2.llm import (
    SOS_ROW,
    TASK_ID_ROW,
    CosyVoice2LM,
    LMConfig,
    PrefixCache,
    StepObserver,
)
from ..cosyvoice2.qwen2 import Qwen2Config
from ..cosyvoice2.sampling import Sampler

OFFICIAL_END_OF_PROMPT_ID = 151646  # `<|endofprompt|>` in the official Qwen2 vocabulary
EXTRA_SPEECH_ROWS = 200  # rows after the speech ids: start, end, task, fill, 196 unused

# Speech-tokenizer v3 ids of silence and breath; runs longer than MAX_SILENT_RUN are thinned.
SILENT_TOKENS: frozenset[int] = frozenset({1, 2, 28, 29, 55, 248, 494, 2241, 2242, 2322, 2323})
MAX_SILENT_RUN = 5


@dataclass(frozen=True)
class CosyVoice3LMConfig(LMConfig):
    # The id of `<|endofprompt|>` in the text vocabulary; taken from the tokenizer when the model
    # directory has one (a reduced vocabulary puts it elsewhere).
    end_of_prompt_id: int = OFFICIAL_END_OF_PROMPT_ID

    yaml_class = "CosyVoice3LM"
    model_name = "CosyVoice 3"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.end_of_prompt_id < self.qwen.vocab_size:
            raise ValueError(f"end_of_prompt_id {self.end_of_prompt_id} is outside the text "
                             f"vocabulary [0, {self.qwen.vocab_size})")

    @property
    def sos_token(self) -> int:
        return self.speech_token_size

    @property
    def eos_token(self) -> int:
        return self.speech_token_size + 1

    @property
    def task_token(self) -> int:
        return self.speech_token_size + 2

    @property
    def fill_token(self) -> int:
        return self.speech_token_size + 3

    @property
    def num_speech_rows(self) -> int:
        return self.speech_token_size + EXTRA_SPEECH_ROWS

    @classmethod
    def from_yaml(cls, node: Tagged, qwen: Qwen2Config,
                  end_of_prompt_id: int = OFFICIAL_END_OF_PROMPT_ID) -> CosyVoice3LMConfig:
        """Read the ``llm: !new:cosyvoice.llm.llm.CosyVoice3LM`` node of cosyvoice3.yaml."""
        return super().from_yaml(node, qwen, end_of_prompt_id=end_of_prompt_id)


class CosyVoice3LM(CosyVoice2LM):
    """Attribute names reproduce the official ``llm.pt`` keys (``speech_embedding.weight``,
    ``llm_decoder.weight``, ``llm.model.model.*``, ``llm.model.lm_head.weight``)."""

    config: CosyVoice3LMConfig

    def __init__(self, cfg: CosyVoice3LMConfig) -> None:
        if not isinstance(cfg, CosyVoice3LMConfig):
            raise TypeError("CosyVoice3LM needs a CosyVoice3LMConfig")
        super().__init__(cfg)

    def _build_speech_tables(self, cfg: LMConfig) -> None:
        self.llm_decoder = nn.Linear(cfg.llm_output_size, cfg.num_speech_rows, bias=False)
        self.speech_embedding = nn.Embedding(cfg.num_speech_rows, cfg.llm_input_size)

    def _special_row(self, row: int) -> torch.Tensor:
        token = {SOS_ROW: self.config.sos_token, TASK_ID_ROW: self.config.task_token}[row]
        return self._token_row(token)

    def _split_at_end_of_prompt(self, prompt_text_ids: Sequence[int]) -> int:
        """Index just after the first `<|endofprompt|>` in the prompt text (ValueError if none)."""
        ids = [int(i) for i in prompt_text_ids]
        marker = self.config.end_of_prompt_id
        if marker not in ids:
            raise ValueError(f"the prompt text must contain <|endofprompt|> (id {marker}): "
                             "CosyVoice 3 expects e.g. 'You are a helpful assistant."
                             "<|endofprompt|>' before the transcript, or an instruction "
                             "ending in it")
        return ids.index(marker) + 1

    def check_prompt_ids(self, ids: Sequence[int]) -> None:
        self._split_at_end_of_prompt(ids)

    def _bistream_start(self, prompt_text_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # The system part (up to `<|endofprompt|>`) goes in with the start row; only the
        # transcript after it is interleaved with the prompt speech.
        cut = self._split_at_end_of_prompt(prompt_text_ids)
        head = self.embed_text(prompt_text_ids[:cut])
        return (torch.cat([self._special_row(SOS_ROW), head], dim=1),
                self.embed_text(prompt_text_ids[cut:]))

    def inference(self, text_ids: Sequence[int], prompt_text_ids: Sequence[int],
                  prompt_speech_tokens: Sequence[int], sampler: Sampler,
                  min_token_text_ratio: float | None = None,
                  max_token_text_ratio: float | None = None,
                  cancel: threading.Event | None = None,
                  on_step: StepObserver | None = None,
                  prefix_cache: PrefixCache | None = None) -> Iterator[int]:
        """As CosyVoice 2's; ``<|endofprompt|>`` must be in the prompt text or the text (in
        cross-lingual use the text itself starts with the system part)."""
        self.check_prompt_ids(list(prompt_text_ids) + list(text_ids))
        return super().inference(text_ids, prompt_text_ids, prompt_speech_tokens, sampler,
                                 min_token_text_ratio, max_token_text_ratio, cancel, on_step,
                                 prefix_cache)

    def inference_bistream(self, text_id_chunks: Iterable[Sequence[int]],
                           prompt_text_ids: Sequence[int], prompt_speech_tokens: Sequence[int],
                           sampler: Sampler, max_token_text_ratio: float | None = None,
                           cancel: threading.Event | None = None,
                           on_step: StepObserver | None = None) -> Iterator[int]:
        """As CosyVoice 2's; ``<|endofprompt|>`` must be in the prompt text, which therefore
        always holds at least the system part (cross-lingual: ``You are a helpful
        assistant.<|endofprompt|>``)."""
        self._split_at_end_of_prompt(prompt_text_ids)
        return super().inference_bistream(text_id_chunks, prompt_text_ids, prompt_speech_tokens,
                                          sampler, max_token_text_ratio, cancel, on_step)


class SilenceThinner:
    """Says whether each next speech token goes on to the vocoder: only the first ``max_run``
    of each run of silent tokens do. One per utterance segment (it counts the current run)."""

    def __init__(self, silent: frozenset[int] = SILENT_TOKENS,
                 max_run: int = MAX_SILENT_RUN) -> None:
        self.silent, self.max_run = silent, max_run
        self.run = 0

    def __call__(self, token: int) -> bool:
        if token not in self.silent:
            self.run = 0
            return True
        self.run += 1
        return self.run <= self.max_run


def drop_long_silences(tokens: Iterable[int], silent: frozenset[int] = SILENT_TOKENS,
                       max_run: int = MAX_SILENT_RUN) -> Iterator[int]:
    """Pass ``tokens`` on, keeping only the first ``max_run`` of each run of silent tokens.

    The LM sometimes produces long stretches of silence (pauses, breaths); the reference driver
    cuts them short before the vocoder, and so do we.
    """
    keep = SilenceThinner(silent, max_run)
    return (token for token in tokens if keep(token))
