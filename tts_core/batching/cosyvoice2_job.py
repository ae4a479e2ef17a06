"""A CosyVoice 2 request as a :class:`~tts_core.batching.scheduler.Job`.

It follows the sequential path step for step (``CosyVoice2LM.inference`` then the engine's
``_vocode``), so a request gives the same tokens and audio in a batch as alone: for each text
segment in turn, the LM takes ``[sos] + prompt text + text + [task id] + prompt speech`` and then
one speech-token row per step; the sampler refuses stop ids for the first
``min_token_text_ratio × text tokens`` steps and at most ``max_token_text_ratio × text tokens``
tokens are made. Tokens go to that segment's streaming token-to-waveform state (or are collected
for one whole-segment call when not streaming), whose chunks are cut by the scheduler when due.
The LM may run ahead into the next segment while the vocoder finishes the previous one; chunks
still reach the consumer in order.

The consumer (the request's own thread) iterates :meth:`CosyVoice2Job.chunks`. The LM side only
uses what ``CosyVoice2LM`` and its CosyVoice 3 subclass share (special rows, text and speech
tables, ``config.speech_token_size``), so the job drives CosyVoice 3's LM the same way.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from tts_core.cosyvoice2.llm import SOS_ROW, TASK_ID_ROW, CosyVoice2LM
from tts_core.cosyvoice2.qwen2 import KVCache
from tts_core.cosyvoice2.sampling import Sampler
from tts_core.cosyvoice2.token2wav import (
    PendingChunk,
    Token2Wav,
    Token2WavStream,
    solve_chunks,
)

from .cuda_graphs import DecodeGraphs, graphs_requested
from .lm_batch import BackboneLM
from .scheduler import MAX_OUTPUT_BATCH, BatchScheduler

_END = object()
# Positions of one request's slot in the KV slab of a wide scheduler: prompt text, text,
# prompt speech and speech tokens of one segment (a minute of speech is 1500 tokens). A longer
# request moves to storage of its own and its batch steps one request at a time until it ends.
# 25 MB per slot at the official size in bfloat16.
SLAB_POSITIONS = 2048
log = logging.getLogger(__name__)


@dataclass
class _Failure:
    error: BaseException


@dataclass
class _Segment:
    """Output side of one text segment."""

    stream: Token2WavStream | None  # None: synthesised whole once the LM is done
    tokens: list[int] = field(default_factory=list)  # made by the LM, not yet given to the stream
    lm_done: bool = False


class VoiceInputs(Protocol):
    """What the job needs of a resolved voice (the engine's ``_Voice``)."""

    lm_prompt_text_ids: list[int]
    lm_prompt_tokens: list[int]
    flow_prompt_tokens: torch.Tensor
    flow_prompt_feat: torch.Tensor
    embedding: torch.Tensor


class CosyVoice2Job:
    """One request: LM decoding of its segments, then flow + vocoder chunks."""

    def __init__(self, lm: CosyVoice2LM, token2wav: Token2Wav, voice: VoiceInputs,
                 segments: Sequence[Sequence[int]], make_sampler: Callable[[], Sampler],
                 vocoder_generator: torch.Generator | None, cancel: threading.Event,
                 stream: bool, speed: float = 1.0,
                 forced_tokens: Sequence[Sequence[int]] | None = None,
                 token_filter: Callable[[], Callable[[int], bool]] | None = None,
                 prompt_cache: Any = None,
                 new_cache: Callable[[], KVCache] | None = None) -> None:
        """``segments``: text ids per segment; ``forced_tokens`` instead gives the speech tokens
        of each segment directly (voice conversion: no LM at all). ``token_filter`` makes, per
        segment, a predicate saying which LM tokens go on to the vocoder (CosyVoice 3 thins
        long silences; the LM and its sampler still see every token). ``prompt_cache``: the
        flow's cache of a stored speaker's prompt (``Token2Wav.prompt_cache``), shared by every
        segment's stream so the prompt's share of the flow is not computed again.
        ``new_cache``: makes each segment's empty KV cache (the scheduler's
        ``BackboneLM.new_cache``, which may hand out slab slots); default the backbone's."""
        self.lm, self.token2wav, self.voice = lm, token2wav, voice
        self._make_sampler = make_sampler
        self._token_filter = token_filter
        self._keep: Callable[[int], bool] | None = None
        self._generator = vocoder_generator
        self._prompt_cache = prompt_cache
        self._new_cache = new_cache or lm.llm.model.model.new_cache
        self._cancel = cancel
        self._streaming = stream and speed == 1.0
        self._speed = speed
        self._texts = [list(s) for s in segments]
        self._out: queue.SimpleQueue = queue.SimpleQueue()
        self._abandoned = False
        self._finished = False
        self._first_audio: float | None = None
        self._audio_seconds = 0.0
        # LM state of the segment being decoded
        self._lm_seg = 0
        self._cache: KVCache | None = None
        self._rows: torch.Tensor | None = None
        self._decoded: list[int] = []
        self._sampler: Sampler | None = None
        self._min_len = self._max_len = 0
        # output state
        self._segments: list[_Segment] = []
        self._out_seg = 0
        if forced_tokens is not None:
            for tokens in forced_tokens:
                segment = self._new_segment()
                segment.tokens.extend(int(t) for t in tokens)
                segment.lm_done = True
            self._lm_seg = len(self._texts)

    # ------------------------------------------------------------------ consumer side

    def chunks(self) -> Iterator[np.ndarray]:
        """Audio chunks in order; raises the job's error; closing it abandons the job."""
        try:
            while True:
                try:
                    item = self._out.get(timeout=0.05)
                except queue.Empty:
                    if self._cancel.is_set():
                        return
                    continue
                if item is _END or self._cancel.is_set():
                    return  # a cancelled request yields nothing more, even what was ready
                if isinstance(item, _Failure):
                    raise item.error
                yield item
        finally:
            self._abandoned = True

    # ------------------------------------------------------------------ LM side

    def lm_inputs(self) -> torch.Tensor | None:
        if self._rows is None and self._lm_seg < len(self._texts):
            self._start_segment(self._texts[self._lm_seg])
        return self._rows

    def lm_cache(self) -> KVCache:
        assert self._cache is not None
        return self._cache

    def lm_accept(self, logp: torch.Tensor) -> None:
        assert self._sampler is not None
        size = self.lm.config.speech_token_size
        index = len(self._decoded)
        token = int(self._sampler(logp, self._decoded, index < self._min_len))
        if not 0 <= token < self.lm.config.num_speech_rows:
            raise ValueError(f"sampler returned {token}, outside "
                             f"[0, {self.lm.config.num_speech_rows})")
        segment = self._segments[self._lm_seg]
        if token >= size:
            self._end_segment()
            return
        if self._keep is None or self._keep(token):
            segment.tokens.append(token)
        self._decoded.append(token)
        if len(self._decoded) >= self._max_len:
            self._end_segment()
            return
        self._rows = self.lm.speech_embedding.weight.detach()[token][None]

    def _start_segment(self, text_ids: list[int]) -> None:
        lm, cfg = self.lm, self.lm.config
        if not text_ids:
            raise ValueError("text_ids is empty: nothing to speak")
        lm.check_prompt_ids(self.voice.lm_prompt_text_ids + text_ids)
        # The LM's own special rows: CosyVoice 3's LM (a subclass) keeps them elsewhere.
        parts = [lm._special_row(SOS_ROW)[0],
                 lm.embed_text(self.voice.lm_prompt_text_ids + text_ids)[0],
                 lm._special_row(TASK_ID_ROW)[0]]
        if self.voice.lm_prompt_tokens:
            parts.append(lm.embed_speech(self.voice.lm_prompt_tokens)[0])
        dtype = parts[0].dtype
        self._rows = torch.cat([p.to(dtype) for p in parts], dim=0)
        self._cache = self._new_cache()
        self._decoded = []
        self._sampler = self._make_sampler()
        self._keep = self._token_filter() if self._token_filter is not None else None
        self._min_len = int(len(text_ids) * cfg.min_token_text_ratio)
        self._max_len = int(len(text_ids) * cfg.max_token_text_ratio)
        self._new_segment()
        if self._max_len <= 0:
            self._end_segment()

    def _end_segment(self) -> None:
        self._segments[self._lm_seg].lm_done = True
        self._lm_seg += 1
        self._rows = None
        self._cache = None  # frees the KV memory now, not when the audio is done

    def _new_segment(self) -> _Segment:
        stream = None
        if self._streaming:
            v = self.voice
            stream = self.token2wav.start_stream(v.flow_prompt_tokens, v.flow_prompt_feat,
                                                 v.embedding, generator=self._generator,
                                                 cancel=self._cancel,
                                                 prompt_cache=self._prompt_cache)
        segment = _Segment(stream)
        self._segments.append(segment)
        return segment

    # ------------------------------------------------------------------ output side

    def _current(self) -> _Segment | None:
        if self._out_seg < len(self._segments):
            return self._segments[self._out_seg]
        return None

    def output_due(self) -> bool:
        segment = self._current()
        if segment is None:
            return self._lm_seg >= len(self._texts) and not self._finished
        if segment.lm_done:
            return True
        if segment.stream is None:
            return False
        return segment.stream.num_tokens + len(segment.tokens) >= segment.stream.next_chunk_tokens()

    def tokens_to_output(self) -> int | None:
        segment = self._current()
        if segment is None or segment.stream is None or segment.lm_done \
                or self._rows is None or self._rows.shape[0] != 1:
            return None  # not waiting on decode steps
        stream = segment.stream
        return max(0, stream.next_chunk_tokens() - stream.num_tokens - len(segment.tokens))

    def output_rank(self, now: float) -> tuple[int, float]:
        if self._first_audio is None:
            return (0, 0.0)
        return (1, self._audio_seconds - (now - self._first_audio))

    def run_output(self) -> None:
        """One output step alone (:func:`run_outputs` runs several jobs' together)."""
        chunk = self.begin_output()
        if chunk is not None:
            solve_chunks([chunk])
            self.end_output(chunk)

    def begin_output(self) -> PendingChunk | None:
        """Start the next output step: a streamed chunk whose flow solve is still to run
        (then :meth:`end_output`), or None when the step was done here (a whole segment's
        synthesis, or the end of the job)."""
        segment = self._current()
        if segment is None:  # every segment delivered
            self._finish()
            return None
        stream = segment.stream
        chunk = None
        if stream is None:
            self._out_seg += 1
            if segment.tokens:
                token = torch.tensor([segment.tokens], dtype=torch.int32,
                                     device=self.voice.flow_prompt_tokens.device)
                v = self.voice
                self._deliver(self.token2wav.synthesize(
                    token, v.flow_prompt_tokens, v.flow_prompt_feat, v.embedding,
                    speed=self._speed, generator=self._generator))
        else:
            need = stream.next_chunk_tokens() - stream.num_tokens
            if len(segment.tokens) >= need:  # one chunk's worth
                take, segment.tokens = segment.tokens[:need], segment.tokens[need:]
                chunk = stream.begin_push(take)
            elif segment.lm_done:
                if stream.begin_push(segment.tokens) is not None:  # fewer than a chunk
                    raise RuntimeError("a chunk became due while closing a segment")
                segment.tokens = []
                self._out_seg += 1
                chunk = stream.begin_finish()
        if chunk is None:
            self._check_finished()
        return chunk

    def end_output(self, chunk: PendingChunk) -> None:
        """Vocode and deliver a chunk of :meth:`begin_output` once its flow solve ran."""
        self._deliver(chunk.stream.complete(chunk))
        self._check_finished()

    def _check_finished(self) -> None:
        if self._current() is None and self._lm_seg >= len(self._texts):
            self._finish()

    def _deliver(self, wav: torch.Tensor) -> None:
        if wav.shape[-1] == 0:
            return
        samples = wav.detach().float().cpu().numpy().reshape(-1).astype(np.float32, copy=False)
        if self._first_audio is None:
            self._first_audio = time.monotonic()
        self._audio_seconds += len(samples) / self.token2wav.sample_rate
        self._out.put(samples)

    def _finish(self) -> None:
        if not self._finished:
            self._finished = True
            self._out.put(_END)

    # ------------------------------------------------------------------ lifecycle

    def done(self) -> bool:
        return self._finished

    def stopped(self) -> bool:
        return self._abandoned or self._cancel.is_set()

    def fail(self, error: BaseException) -> None:
        self._finished = True
        self._cache = None
        self._out.put(_Failure(error))


def run_outputs(jobs: Sequence[CosyVoice2Job]) -> list[BaseException | None]:
    """One output step of each job, their flow solves run together (the scheduler's output
    batch). Returns each job's error or None: a job failing before or after the shared solve
    fails alone; a failing shared solve (a bug: inputs are checked when the chunks start)
    fails every job in it, as their caches may hold part of it."""
    errors: list[BaseException | None] = [None] * len(jobs)
    chunks: dict[int, PendingChunk] = {}
    for index, job in enumerate(jobs):
        try:
            chunk = job.begin_output()
        except Exception as error:
            errors[index] = error
            continue
        if chunk is not None:
            chunks[index] = chunk
    try:
        solve_chunks(list(chunks.values()))
    except Exception as error:
        log.exception("batched flow solve failed")
        for index in chunks:
            errors[index] = RuntimeError(f"the batched flow step failed: {error}")
        chunks = {}
    for index, chunk in chunks.items():
        try:
            jobs[index].end_output(chunk)
        except Exception as error:
            errors[index] = error
    return errors


def make_scheduler(lm: CosyVoice2LM, max_batch: int, wide: bool = False) -> BatchScheduler:
    """The scheduler of a CosyVoice 2 engine: its Qwen2 backbone with the speech head.

    ``wide`` (a GPU, where a call costs about the same at any batch): the requests' KV caches
    are slots of one slab, so a decode step covers them all with a few calls per layer
    (``lm_batch``), and an output round solves every due stream's flow chunk together."""
    head = lm.llm_decoder
    backbone = lm.llm.model.model
    slab = backbone.new_slab(max_batch, SLAB_POSITIONS) if wide else None
    backbone_lm = BackboneLM(backbone, head, head.weight.dtype, slab)
    if slab is not None and graphs_requested():
        try:
            backbone_lm.graphs = DecodeGraphs(backbone_lm, slab, max_batch)
        except Exception:  # noqa: BLE001 - an opt-in speed-up: the eager step still works
            log.exception("CUDA graphs of the decode step failed; decoding eagerly")
    return BatchScheduler(backbone_lm, max_batch, name="cosyvoice2-batch",
                          run_outputs=run_outputs,
                          max_output_batch=max_batch if wide else MAX_OUTPUT_BATCH)
