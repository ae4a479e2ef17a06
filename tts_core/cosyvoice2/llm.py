"""The CosyVoice 2 text-to-speech-token language model (a Qwen2 backbone with speech tables).

Input layout of one request: ``[sos] + text embeddings + [task id] + prompt speech embeddings``,
then one speech-token embedding per generated token. The text table is Qwen2's own token
embedding; the speech side has its own input table (``speech_embedding``) and output layer
(``llm_decoder``), both ``speech_token_size + 3`` wide: speech ids, end of speech, an unused id and
the "fill" marker of bidirectional streaming. Every id from ``speech_token_size`` on stops decoding.

Attribute names reproduce the official ``llm.pt`` keys (``llm_embedding.weight``,
``llm.model.model.layers.N...``, ``llm.model.lm_head.weight``, ``llm_decoder.*``,
``speech_embedding.weight``), so the checkpoint loads with ``strict=True``.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import torch
from torch import nn

from tts_core import cancellation
from tts_core.lru import LruCache

from .hyperyaml import Tagged
from .packed_linear import fuse_and_pack
from .precision import cpu_bf16_support
from .qwen2 import KVCache, Qwen2Config, Qwen2ForCausalLM
from .sampling import Sampler, SamplingConfig
from .weight_quant import fuse_and_quantize

SOS_ROW = 0  # rows of llm_embedding
TASK_ID_ROW = 1


@dataclass(frozen=True)
class LMConfig:
    qwen: Qwen2Config
    speech_token_size: int = 6561
    llm_input_size: int = 896
    llm_output_size: int = 896
    mix_ratio: tuple[int, int] = (5, 15)  # bistream: text rows, speech tokens per segment
    sampling: SamplingConfig = SamplingConfig()
    min_token_text_ratio: float = 2.0
    max_token_text_ratio: float = 20.0

    # The yaml class this config reads (CosyVoice 3's config overrides it).
    yaml_class: ClassVar[str] = "Qwen2LM"
    model_name: ClassVar[str] = "CosyVoice 2"

    def __post_init__(self) -> None:
        if self.llm_input_size != self.qwen.hidden_size:
            raise ValueError(f"llm_input_size ({self.llm_input_size}) must equal the Qwen2 "
                             f"hidden_size ({self.qwen.hidden_size})")
        if self.llm_output_size != self.qwen.hidden_size:
            raise ValueError(f"llm_output_size ({self.llm_output_size}) must equal the Qwen2 "
                             f"hidden_size ({self.qwen.hidden_size})")
        if len(self.mix_ratio) != 2 or min(self.mix_ratio) < 1:
            raise ValueError(f"mix_ratio must be two positive integers, got {self.mix_ratio}")

    @property
    def eos_token(self) -> int:
        return self.speech_token_size

    @property
    def fill_token(self) -> int:
        return self.speech_token_size + 2

    @property
    def num_speech_rows(self) -> int:
        return self.speech_token_size + 3

    @classmethod
    def from_yaml(cls, node: Tagged, qwen: Qwen2Config, **extra: Any) -> Self:
        """Read the ``llm: !new:cosyvoice.llm.llm.Qwen2LM`` node of cosyvoice2.yaml."""
        if not isinstance(node, Tagged) or not node.target.endswith("." + cls.yaml_class):
            target = node.target if isinstance(node, Tagged) else type(node).__name__
            raise ValueError(f"the yaml's llm must be a {cls.model_name} {cls.yaml_class}, "
                             f"got {target!r}")
        args = node.args if isinstance(node.args, dict) else {}
        for key in ("llm_input_size", "llm_output_size", "speech_token_size"):
            if key not in args:
                raise ValueError(f"the yaml's llm node lacks {key}")
        mix = args.get("mix_ratio", [5, 15])
        return cls(qwen=qwen,
                   speech_token_size=int(args["speech_token_size"]),
                   llm_input_size=int(args["llm_input_size"]),
                   llm_output_size=int(args["llm_output_size"]),
                   mix_ratio=(int(mix[0]), int(mix[1])),
                   sampling=SamplingConfig.from_yaml(args.get("sampling")), **extra)


@dataclass
class DecodeStep:
    """What one forward step saw and decided; handed to the optional ``on_step`` observer."""

    index: int
    inputs: torch.Tensor  # [1, L, D] rows fed at this step
    cache_len: int  # positions cached before the step (position of its first row)
    hidden: torch.Tensor  # [D] final hidden state of the last row (llm_decoder input)
    logp: torch.Tensor  # [speech_token_size + 3] float32 log-probabilities
    token: int
    from_sampler: bool  # False when the bistream schedule forced a fill token
    ignore_eos: bool  # whether the sampler was asked for a non-stop token


StepObserver = Callable[[DecodeStep], None]


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


class PrefixCache(LruCache[tuple[int, ...], KVCache]):
    """Keys and values of LM prefixes (sos + prompt text) kept across requests, LRU.

    A registered speaker's requests all start with the same rows, so their KV cache is computed
    once. Entries are keyed by the prompt text ids; ``get`` hands out a copy, so requests never
    share mutable state. Capacity 0 keeps nothing (every request computes its prefix), which is
    the uncached path the cache must reproduce bit for bit.
    """

    def __init__(self, capacity: int = 32) -> None:
        super().__init__(capacity)

    def get(self, key: tuple[int, ...]) -> KVCache | None:
        entry = super().get(key)
        return None if entry is None else entry.clone()

    def put(self, key: tuple[int, ...], cache: KVCache) -> None:
        if self.capacity:
            super().put(key, cache.clone())


class _Backbone(nn.Module):
    """Holder that reproduces the checkpoint nesting ``llm.model.<Qwen2ForCausalLM>``."""

    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.model = Qwen2ForCausalLM(cfg)


class CosyVoice2LM(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.config = cfg
        self.llm = _Backbone(cfg.qwen)
        self._build_speech_tables(cfg)

    def _build_speech_tables(self, cfg: LMConfig) -> None:
        """The speech-side tables around the backbone (CosyVoice 3 lays them out differently)."""
        self.llm_embedding = nn.Embedding(2, cfg.llm_input_size)
        self.llm_decoder = nn.Linear(cfg.llm_output_size, cfg.num_speech_rows)
        self.speech_embedding = nn.Embedding(cfg.num_speech_rows, cfg.llm_input_size)

    # --- weights ----------------------------------------------------------------------------

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        """As :meth:`nn.Module.load_state_dict`, refusing tied tensors that differ.

        With ``tie_word_embeddings`` the text embedding and the (unused) text head are one
        tensor; a checkpoint holding two different ones would silently overwrite the embedding.
        """
        if self.config.qwen.tie_word_embeddings:
            emb, head = "llm.model.model.embed_tokens.weight", "llm.model.lm_head.weight"
            a, b = state_dict.get(emb), state_dict.get(head)
            if (a is not None and b is not None and a.data_ptr() != b.data_ptr()
                    and (a.shape != b.shape or not torch.equal(a, b))):
                raise ValueError(f"{emb} and {head} differ, but the Qwen2 config ties them "
                                 "(tie_word_embeddings=true)")
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if assign and self.config.qwen.tie_word_embeddings:  # assignment breaks the tie
            self.llm.model.lm_head.weight = self.llm.model.model.embed_tokens.weight
        return result

    def set_backbone_dtype(self, dtype: torch.dtype) -> CosyVoice2LM:
        """Run the Qwen2 stack in ``dtype`` (e.g. bfloat16 on CUDA), the speech tables in float32.

        The speech input table and output layer stay float32 so log-probabilities keep full
        precision; norms and softmax inside the stack are float32 anyway. In bfloat16 on a CPU
        whose oneDNN has bfloat16 kernels the stack's Linear layers are fused and packed
        (:func:`packed_linear.fuse_and_pack`; irreversible).
        """
        self.llm.to(dtype)
        if dtype == torch.bfloat16:
            self._packed = fuse_and_pack(self.llm.model.model.layers)
        return self

    def quantize_backbone_int8(self) -> CosyVoice2LM:
        """Replace every Linear of the Qwen2 decoder layers by a dynamic int8 Linear (CPU).

        Weights are int8 per output channel; activations are quantised per call (per tensor)
        and products accumulate in int32, so a decode step reads a quarter of the weight bytes.
        The embeddings, final norm, speech tables and output layer stay float32. Irreversible:
        load the checkpoint again for float32.
        """
        if self._device.type != "cpu":
            raise ValueError("dynamic int8 Linear layers run on CPU only")
        self.llm.to(torch.float32)
        layers = self.llm.model.model.layers
        with warnings.catch_warnings():
            # torch.ao.quantization warns of its planned move to torchao; the eager dynamic
            # quantisation it provides is what this CPU path uses until then.
            warnings.simplefilter("ignore")
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
            quantize_dynamic(layers, {nn.Linear: per_channel_dynamic_qconfig}, inplace=True)
        self._int8 = True
        return self

    def quantize_backbone_weight_int8(self) -> CosyVoice2LM:
        """Replace every Linear of the Qwen2 decoder layers by a weight-only int8 Linear (CPU).

        Weights are int8 per output channel; activations stay floating point (see
        :mod:`weight_quant`). Same scope as :meth:`quantize_backbone_int8`; irreversible.
        """
        if self._device.type != "cpu":
            raise ValueError("weight-only int8 Linear layers run on CPU only")
        self.llm.to(torch.float32)
        # A prefill's GEMM on the widened weights: bfloat16 where AMX makes it ~3x faster.
        gemm_dtype = torch.bfloat16 if cpu_bf16_support() == "amx" else torch.float32
        fuse_and_quantize(self.llm.model.model.layers, gemm_dtype)
        self._int8 = True
        return self

    @property
    def is_int8(self) -> bool:
        return getattr(self, "_int8", False)

    # --- pieces -----------------------------------------------------------------------------

    @property
    def _device(self) -> torch.device:
        return self.speech_embedding.weight.device

    def embed_text(self, ids: Sequence[int]) -> torch.Tensor:
        """Qwen2 token embeddings [1, n, D] of text ids."""
        vocab = self.config.qwen.vocab_size
        bad = [i for i in ids if not 0 <= int(i) < vocab]
        if bad:
            raise ValueError(f"text token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        index = torch.tensor([int(i) for i in ids], dtype=torch.long, device=self._device)
        return self.llm.model.model.embed_tokens(index)[None]

    def embed_speech(self, ids: Sequence[int]) -> torch.Tensor:
        """Speech-token embeddings [1, n, D]; prompts may only hold real speech ids."""
        size = self.config.speech_token_size
        bad = [i for i in ids if not 0 <= int(i) < size]
        if bad:
            raise ValueError(f"speech token ids {bad[:5]} are outside [0, {size})")
        index = torch.tensor([int(i) for i in ids], dtype=torch.long, device=self._device)
        return self.speech_embedding(index)[None]

    # Rows are detached views of the tables: no copy, and no autograd link to the parameters.
    def _special_row(self, row: int) -> torch.Tensor:
        return self.llm_embedding.weight.detach()[row].reshape(1, 1, -1)

    def _token_row(self, token: int) -> torch.Tensor:
        return self.speech_embedding.weight.detach()[token].reshape(1, 1, -1)

    def _bistream_start(self, prompt_text_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Bistream's first input rows and the prompt text rows still to be interleaved."""
        return self._special_row(SOS_ROW), self.embed_text(prompt_text_ids)

    def step(self, inputs: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed rows [1, L, D] after the cache; return (last hidden [D], float32 logp [V])."""
        backbone = self.llm.model.model
        hidden = backbone(inputs.to(backbone.embed_tokens.weight.dtype), cache)[0, -1]
        hidden = hidden.to(self.llm_decoder.weight.dtype)
        return hidden, self.llm_decoder(hidden).float().log_softmax(dim=-1)

    @torch.inference_mode()
    def prefix_kv(self, prompt_text_ids: Sequence[int], prefix_cache: PrefixCache) -> KVCache:
        """A KV cache holding sos + ``prompt_text_ids``: a copy of the cached one, or computed
        (and stored) on a miss."""
        key = tuple(int(i) for i in prompt_text_ids)
        cache = prefix_cache.get(key)
        if cache is None:
            cache = self.llm.model.model.new_cache()
            rows = [self._special_row(SOS_ROW)]
            if key:
                rows.append(self.embed_text(key))
            backbone = self.llm.model.model
            backbone(torch.cat(rows, dim=1).to(backbone.embed_tokens.weight.dtype), cache)
            prefix_cache.put(key, cache)
        return cache

    def check_prompt_ids(self, ids: Sequence[int]) -> None:
        """Raise ValueError if prompt text + text ids lack what the model needs (CosyVoice 2:
        nothing; CosyVoice 3: ``<|endofprompt|>``)."""

    def _check_token(self, token: int) -> int:
        token = int(token)
        if not 0 <= token < self.config.num_speech_rows:
            rows = self.config.num_speech_rows
            raise ValueError(f"sampler returned {token}, outside [0, {rows})")
        return token

    # --- whole-text decoding ----------------------------------------------------------------

    def _cancellable_step(self, inputs: torch.Tensor, cache: KVCache,
                          cancel: threading.Event | None
                          ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``step``, stopped between decoder layers once ``cancel`` is set (None then): the
        first step of a long text, or any step on a busy CPU, is long. The request's KV cache
        is then half-updated and must not be used again."""
        try:
            with cancellation.watching(cancel):
                return self.step(inputs, cache)
        except cancellation.Cancelled:
            return None

    @torch.inference_mode()
    def inference(self, text_ids: Sequence[int], prompt_text_ids: Sequence[int],
                  prompt_speech_tokens: Sequence[int], sampler: Sampler,
                  min_token_text_ratio: float | None = None,
                  max_token_text_ratio: float | None = None,
                  cancel: threading.Event | None = None,
                  on_step: StepObserver | None = None,
                  prefix_cache: PrefixCache | None = None) -> Iterator[int]:
        """Yield speech token ids for ``text_ids`` in the voice of the prompt.

        Generates at most ``int(len(text_ids) * max_ratio)`` tokens and refuses stop ids for the
        first ``int(len(text_ids) * min_ratio)`` steps (the prompt text does not count). Stops at
        any stop id (>= speech_token_size), which is not yielded, or when ``cancel`` is set.
        With ``prefix_cache`` the KV of sos + prompt text is taken from (or stored in) it.
        """
        cfg = self.config
        if not text_ids:
            raise ValueError("text_ids is empty: nothing to speak")
        min_len = int(len(text_ids) * _or(min_token_text_ratio, cfg.min_token_text_ratio))
        max_len = int(len(text_ids) * _or(max_token_text_ratio, cfg.max_token_text_ratio))
        rows = [self._special_row(SOS_ROW), self.embed_text(list(prompt_text_ids) + list(text_ids)),
                self._special_row(TASK_ID_ROW)]
        if prompt_speech_tokens:
            rows.append(self.embed_speech(prompt_speech_tokens))
        inputs = torch.cat(rows, dim=1)
        cache = self.llm.model.model.new_cache()
        prefix_len = 0
        if prefix_cache is not None:
            # The prefix (sos + prompt text) runs as a step of its own, whether its KV comes from
            # the cache or is computed here, so both ways compute the rest identically.
            prefix_len = 1 + len(prompt_text_ids)
            cache = self.prefix_kv(prompt_text_ids, prefix_cache)
        decoded: list[int] = []
        for index in range(max_len):
            if cancel is not None and cancel.is_set():
                return
            cache_len = len(cache) - prefix_len  # the prefix belongs to the first step
            stepped = self._cancellable_step(inputs[:, prefix_len:], cache, cancel)
            if stepped is None:
                return
            hidden, logp = stepped
            prefix_len = 0
            ignore_eos = index < min_len
            token = self._check_token(sampler(logp, decoded, ignore_eos))
            if on_step is not None:
                on_step(DecodeStep(index, inputs, cache_len, hidden, logp, token, True, ignore_eos))
            if token >= cfg.speech_token_size:
                return
            yield token
            decoded.append(token)
            inputs = self._token_row(token)

    # --- bidirectional streaming ------------------------------------------------------------

    @torch.inference_mode()
    def inference_bistream(self, text_id_chunks: Iterable[Sequence[int]],
                           prompt_text_ids: Sequence[int], prompt_speech_tokens: Sequence[int],
                           sampler: Sampler, max_token_text_ratio: float | None = None,
                           cancel: threading.Event | None = None,
                           on_step: StepObserver | None = None) -> Iterator[int]:
        """Yield speech token ids while text ids arrive in chunks (CosyVoice 2 bistream).

        Text and speech are interleaved in segments of ``mix_ratio`` = (5 text rows, 15 speech
        tokens); the model closes each speech segment with the fill token, which the schedule
        inserts at fixed positions and which is never yielded. While text is still arriving the
        sampler is asked for speech tokens only; after the last chunk the model decodes until end
        of speech. As a guard the total number of tokens yielded is capped at
        ``max_ratio * number of streamed text ids``.
        """
        cfg = self.config
        n_text, n_speech = cfg.mix_ratio
        max_ratio = _or(max_token_text_ratio, cfg.max_token_text_ratio)
        fill = cfg.fill_token
        cache = self.llm.model.model.new_cache()
        decoded: list[int] = []  # every decided token, fill tokens included
        yielded = 0
        text_seen = 0
        steps = 0

        # B: rows for the next forward step; X: text rows not yet fed
        inputs, pending_text = self._bistream_start(prompt_text_ids)
        # S: prompt speech rows not yet placed
        pending_speech = (self.embed_speech(prompt_speech_tokens) if prompt_speech_tokens
                          else self.speech_embedding.weight.detach()[:0][None])
        # Position (in `decoded`) of the first fill: the prompt speech already filled part of
        # its last 15-token segment.
        prompt_len = len(prompt_speech_tokens)
        next_fill = (prompt_len // n_speech + 1) * n_speech - prompt_len

        for chunk in text_id_chunks:
            if cancel is not None and cancel.is_set():
                return
            text_seen += len(chunk)
            pending_text = torch.cat([pending_text, self.embed_text(chunk)], dim=1)
            # Place the prompt speech after the text it belongs with, one segment at a time.
            while pending_speech.shape[1] > 0 and pending_text.shape[1] >= n_text:
                inputs = torch.cat([inputs, pending_text[:, :n_text],
                                    pending_speech[:, :n_speech]], dim=1)
                pending_text = pending_text[:, n_text:]
                pending_speech = pending_speech[:, n_speech:]
            if pending_speech.shape[1] > 0:
                continue  # the prompt is not fully placed yet: wait for more text
            after_fill = bool(decoded) and decoded[-1] == fill
            if after_fill or (not decoded and inputs.shape[1] == 1):
                # A new speech segment needs the next 5 text rows in front of it.
                if pending_text.shape[1] < n_text:
                    continue
                segment_text = pending_text[:, :n_text]
                pending_text = pending_text[:, n_text:]
                # After a fill the fill step's rows are already cached; only the text is new.
                inputs = segment_text if after_fill else torch.cat([inputs, segment_text], dim=1)
            while True:
                if cancel is not None and cancel.is_set():
                    return
                index, cache_len = steps, len(cache)
                stepped = self._cancellable_step(inputs, cache, cancel)
                if stepped is None:
                    return
                hidden, logp = stepped
                steps += 1
                if len(decoded) == next_fill:
                    token, from_sampler = fill, False
                else:
                    token = self._check_token(sampler(logp, decoded, True))
                    from_sampler = True
                    if token >= cfg.speech_token_size:
                        raise ValueError(
                            f"sampler returned stop id {token} although speech was required")
                if on_step is not None:  # sampled steps are the ones that refused stop ids
                    on_step(DecodeStep(index, inputs, cache_len, hidden, logp, token,
                                       from_sampler=from_sampler, ignore_eos=from_sampler))
                decoded.append(token)
                if token == fill:
                    next_fill = len(decoded) - 1 + n_speech + 1
                    break  # `inputs` keeps the rows just fed (see the final phase)
                yield token
                yielded += 1
                inputs = self._token_row(token)

        # Text finished: the rest of the text, the task id, then free decoding to end of speech.
        # When the text phase ended on a fill, `inputs` still holds the last speech row, which
        # the reference feeds a second time here; we do the same to stay on its distribution.
        limit = int(max_ratio * max(text_seen, 1))
        inputs = torch.cat([inputs, pending_text, self._special_row(TASK_ID_ROW)], dim=1)
        while yielded < limit:
            if cancel is not None and cancel.is_set():
                return
            index, cache_len = steps, len(cache)
            stepped = self._cancellable_step(inputs, cache, cancel)
            if stepped is None:
                return
            hidden, logp = stepped
            steps += 1
            token = self._check_token(sampler(logp, decoded, False))
            if on_step is not None:
                on_step(DecodeStep(index, inputs, cache_len, hidden, logp, token, True, False))
            decoded.append(token)
            if token >= cfg.speech_token_size:
                return  # end of speech (any stop id ends the utterance)
            yield token
            yielded += 1
            inputs = self._token_row(token)
