"""Speech tokens -> 24 kHz waveform: the flow model then the HiFT vocoder, whole or streamed.

Non-streaming (:meth:`Token2Wav.synthesize`): one flow call over all tokens with full attention,
then one vocoder call.

Streaming (:meth:`Token2Wav.start_stream`): every request gets its own :class:`Token2WavStream`
holding all of its state; the shared :class:`Token2Wav` (and the modules it wraps) is never
written to, so any number of requests can stream at once. A stream cuts the token sequence into
chunks following a :class:`StreamSchedule`. For each chunk the flow sees every token so far
(prompt included) with chunked attention plus ``pre_lookahead_len`` tokens of look-ahead; only
the new mel frames are kept. With a flow that streams chunk by chunk (``CausalFlow``) the stream
keeps a :class:`~tts_core.cosyvoice2.flow.FlowStreamCache`, so each chunk computes only frames
that are not final yet (bit-identical to re-running the flow); a registered speaker's prompt
share can be computed once (:meth:`Token2Wav.prompt_cache`) and handed to every stream.
To hide the seams, the vocoder input of each chunk is prefixed with the
last ``mel_cache_len`` mel frames of the previous one, the start of its excitation is replaced by
the previous chunk's excitation tail (so the harmonics continue in phase), and the first samples of
its output are cross-faded (Hamming, float64) with the previous chunk's held-back tail.
The default schedule is the reference driver's: 25 tokens (plus the padding that aligns prompt +
first chunk to a multiple of 25), then 50, then 100 per chunk.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from tts_core import cancellation

from .hift import HiFTGenerator


class FlowModel(Protocol):
    """What the driver needs from the flow model (``flow.CausalFlow``)."""

    def inference(self, token: torch.Tensor, prompt_token: torch.Tensor,
                  prompt_feat: torch.Tensor, embedding: torch.Tensor, streaming: bool,
                  finalize: bool) -> torch.Tensor: ...


@dataclass(frozen=True)
class StreamSchedule:
    """How many new tokens each streaming chunk takes.

    Chunk 0 takes ``first_hop`` tokens plus ``pad``, where pad tops the prompt length up to a
    multiple of ``prompt_align`` (None: of ``first_hop``, as the reference does; 0: no padding).
    Each later hop is ``min(max_hop, int(previous hop · growth))``. A chunk is cut once its tokens
    and ``pre_lookahead_len`` more exist. Reference: first_hop 25, growth 2, max_hop 100.
    """

    first_hop: int = 25
    growth: float = 2.0
    max_hop: int = 100
    prompt_align: int | None = None
    # The reference runs the last chunk with full attention over everything, which recomputes
    # the whole utterance; False keeps chunk attention there too, so nothing is recomputed.
    full_attention_final: bool = True
    # > 0: lengthen every hop after the first so that prompt + tokens end on a multiple of it
    # (the flow's attention chunk): a chunk that ends inside an attention chunk leaves it
    # unfinished, and the next chunk must compute it again.
    hop_align: int = 0

    def __post_init__(self) -> None:
        if self.first_hop < 1 or self.max_hop < self.first_hop:
            raise ValueError(f"stream schedule: need 1 <= first_hop <= max_hop, got "
                             f"{self.first_hop} / {self.max_hop}")
        if self.growth < 1:
            raise ValueError(f"stream schedule: growth must be >= 1, got {self.growth}")
        if self.prompt_align is not None and self.prompt_align < 0:
            raise ValueError("stream schedule: prompt_align must be >= 0 or None")
        if self.hop_align < 0:
            raise ValueError("stream schedule: hop_align must be >= 0")

    def prompt_pad(self, prompt_len: int) -> int:
        align = self.first_hop if self.prompt_align is None else self.prompt_align
        return (-prompt_len) % align if align > 0 else 0

    def next_hop(self, hop: int) -> int:
        return min(self.max_hop, int(hop * self.growth))


REFERENCE_SCHEDULE = StreamSchedule()


@dataclass
class ChunkTrace:
    """What one driver step did (for tests and diagnostics)."""

    token_len: int  # tokens given to the flow (look-ahead included)
    token_offset: int  # tokens whose frames earlier chunks already produced
    streaming: bool
    finalize: bool
    hift_in_mel: torch.Tensor  # vocoder input, cached frames included
    cache_source: torch.Tensor  # excitation written into the start of the vocoder's source
    hift_out_wav: torch.Tensor  # vocoder output before the cross-fade
    hift_out_source: torch.Tensor
    wav: torch.Tensor  # what the step emitted


@dataclass
class _VocoderCache:
    mel: torch.Tensor  # [1, 80, mel_cache_len]
    source: torch.Tensor  # [1, 1, source_cache_len]
    speech: torch.Tensor  # [1, source_cache_len], held back for the next cross-fade


def _flow_setting(flow: Any, name: str) -> int | None:
    for owner in (getattr(flow, "config", None), flow):
        value = getattr(owner, name, None) if owner is not None else None
        if isinstance(value, int):
            return value
    return None


class Token2Wav:
    """Shared, read-only token-to-waveform driver around a flow model and a HiFT vocoder."""

    def __init__(
        self,
        flow: FlowModel,
        hift: HiFTGenerator,
        *,
        token_mel_ratio: int | None = None,
        pre_lookahead_len: int | None = None,
        mel_cache_len: int = 8,
        schedule: StreamSchedule = REFERENCE_SCHEDULE,
        deterministic: bool = False,
        flow_cache_bytes: int | None = None,
    ):
        ratio = token_mel_ratio or _flow_setting(flow, "token_mel_ratio")
        lookahead = pre_lookahead_len if pre_lookahead_len is not None else _flow_setting(
            flow, "pre_lookahead_len")
        if ratio is None or lookahead is None:
            raise ValueError("Token2Wav: pass token_mel_ratio and pre_lookahead_len (the flow "
                             "model does not expose them)")
        self.flow = flow
        self.hift = hift
        self.token_mel_ratio = int(ratio)
        self.pre_lookahead_len = int(lookahead)
        self.mel_cache_len = mel_cache_len
        self.source_cache_len = mel_cache_len * hift.config.upsample_factor
        self.schedule = schedule
        # True replaces the vocoder's random excitation draws by zeros (parity tests).
        self.deterministic = deterministic
        # Memory budget of each stream's flow cache (None: unlimited); past it the stream
        # recomputes instead (bit-identical, slower): see FlowStreamCache.
        self.flow_cache_bytes = flow_cache_bytes
        self.speech_window = torch.from_numpy(np.hamming(2 * self.source_cache_len))
        self._check_schedule(schedule)

    def _check_schedule(self, schedule: StreamSchedule) -> None:
        # The first chunk must leave samples to emit after holding back the cross-fade tail.
        if schedule.first_hop * self.token_mel_ratio <= self.mel_cache_len:
            raise ValueError(f"stream schedule: first_hop must exceed "
                             f"{self.mel_cache_len // self.token_mel_ratio} tokens "
                             f"(the {self.mel_cache_len}-frame vocoder overlap)")

    @property
    def sample_rate(self) -> int:
        return self.hift.config.sampling_rate

    @property
    def samples_per_token(self) -> int:
        return self.token_mel_ratio * self.hift.config.upsample_factor

    # --- non-streaming -------------------------------------------------------------------

    @torch.inference_mode()
    def synthesize(
        self,
        token: torch.Tensor,
        prompt_token: torch.Tensor,
        prompt_feat: torch.Tensor,
        embedding: torch.Tensor,
        *,
        speed: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """All tokens at once -> wav [1, samples]. ``speed`` != 1 resamples the mel in time."""
        if speed <= 0:
            raise ValueError(f"speed must be positive, got {speed}")
        if token.shape[-1] == 0:
            return torch.zeros(1, 0, device=prompt_feat.device)
        mel = self.flow.inference(token, prompt_token, prompt_feat, embedding,
                                  streaming=False, finalize=True)
        if speed != 1.0:
            mel = F.interpolate(mel, size=max(1, int(mel.shape[2] / speed)), mode="linear")
        wav, _ = self.hift.inference(mel, generator=generator, deterministic=self.deterministic)
        return wav

    # --- streaming -----------------------------------------------------------------------

    def start_stream(
        self,
        prompt_token: torch.Tensor,
        prompt_feat: torch.Tensor,
        embedding: torch.Tensor,
        *,
        schedule: StreamSchedule | None = None,
        generator: torch.Generator | None = None,
        cancel: threading.Event | None = None,
        on_chunk: Callable[[ChunkTrace], None] | None = None,
        prompt_cache: Any = None,
    ) -> Token2WavStream:
        """A new per-request stream; feed it with ``push`` and close it with ``finish``.

        prompt_cache: :meth:`prompt_cache` of this very prompt (shared, never written), so the
        prompt's share of the flow is not computed again.
        """
        schedule = schedule or self.schedule
        self._check_schedule(schedule)
        return Token2WavStream(self, prompt_token, prompt_feat, embedding, schedule,
                               generator, cancel, on_chunk, prompt_cache)

    @property
    def caches_streams(self) -> bool:
        """Whether streams keep a flow cache (the flow computes chunk by chunk)."""
        return bool(getattr(self.flow, "supports_chunk_streaming", False))

    def prompt_cache(self, prompt_token: torch.Tensor, prompt_feat: torch.Tensor,
                     embedding: torch.Tensor) -> Any:
        """The flow's streaming cache of a prompt alone (None when the flow cannot cache), to
        keep with a registered speaker and pass to :meth:`start_stream`."""
        if not self.caches_streams or prompt_token.shape[1] == 0:
            return None
        return self.flow.prompt_cache(prompt_token, prompt_feat, embedding)  # type: ignore

    def stream(
        self,
        tokens: Iterable[int | Sequence[int]],
        prompt_token: torch.Tensor,
        prompt_feat: torch.Tensor,
        embedding: torch.Tensor,
        **options: Any,
    ) -> Iterator[torch.Tensor]:
        """Drive a stream from an iterator of token ids (or lists of them); yield wav chunks."""
        state = self.start_stream(prompt_token, prompt_feat, embedding, **options)
        for item in tokens:
            yield from state.push([item] if isinstance(item, int) else item)
            if state.cancelled:
                return
        last = state.finish()
        if last.shape[-1]:
            yield last

    # used by Token2WavStream; no state of its own is touched
    def _vocode(self, mel: torch.Tensor, cache: _VocoderCache | None, finalize: bool,
                generator: torch.Generator | None
                ) -> tuple[torch.Tensor, _VocoderCache | None, dict[str, torch.Tensor]]:
        cache_source = mel.new_zeros(1, 1, 0)
        if cache is not None:
            mel = torch.cat([cache.mel, mel], dim=2)
            cache_source = cache.source
        wav, source = self.hift.inference(mel, cache_source, generator=generator,
                                          deterministic=self.deterministic)
        trace = {"hift_in_mel": mel, "cache_source": cache_source, "hift_out_wav": wav,
                 "hift_out_source": source}
        if cache is not None:
            wav = self._cross_fade(wav, cache.speech)
        if finalize:
            return wav, None, trace
        n = self.source_cache_len
        new_cache = _VocoderCache(mel[:, :, -self.mel_cache_len:], source[:, :, -n:],
                                  wav[:, -n:])
        return wav[:, :-n], new_cache, trace

    def _cross_fade(self, wav: torch.Tensor, previous_tail: torch.Tensor) -> torch.Tensor:
        n = self.source_cache_len
        # float64 products, rounded once into float32, as the reference's numpy window does
        # (on CPU where the device has no float64, e.g. Apple MPS)
        where = torch.device("cpu") if wav.device.type == "mps" else wav.device
        window = self.speech_window.to(where)
        head = (wav[:, :n].to(where, torch.float64) * window[:n]
                + previous_tail.to(where, torch.float64) * window[n:])
        return torch.cat([head.to(wav.device, wav.dtype), wav[:, n:]], dim=1)


class Token2WavStream:
    """Streaming state of ONE request: tokens so far, chunk position, vocoder caches."""

    def __init__(self, driver: Token2Wav, prompt_token: torch.Tensor, prompt_feat: torch.Tensor,
                 embedding: torch.Tensor, schedule: StreamSchedule,
                 generator: torch.Generator | None, cancel: threading.Event | None,
                 on_chunk: Callable[[ChunkTrace], None] | None, prompt_cache: Any = None):
        if prompt_token.dim() != 2 or prompt_token.shape[0] != 1:
            raise ValueError(f"prompt_token must be [1, P], got {list(prompt_token.shape)}")
        self._driver = driver
        self._prompt_token = prompt_token
        self._prompt_feat = prompt_feat
        self._embedding = embedding
        self._generator = generator
        self._cancel = cancel
        self._on_chunk = on_chunk
        self.schedule = schedule
        self._tokens: list[int] = []
        self.token_offset = 0
        self.chunks = 0
        self._hop = schedule.first_hop
        self._pad = schedule.prompt_pad(prompt_token.shape[1])
        self._cache: _VocoderCache | None = None
        # the flow's per-request cache (its own copy of a speaker's prompt cache)
        self._flow_cache: Any = None
        if driver.caches_streams:
            self._flow_cache = driver.flow.new_stream_cache(  # type: ignore[union-attr]
                driver.flow_cache_bytes, prompt_cache)
        elif prompt_cache is not None:
            raise ValueError("this flow model keeps no stream cache; pass no prompt_cache")
        self.finished = False
        self.cancelled = False
        self._pending: PendingChunk | None = None

    @property
    def num_tokens(self) -> int:
        return len(self._tokens)

    def next_chunk_tokens(self) -> int:
        """Tokens the next chunk needs in all (look-ahead included) before it can be cut."""
        hop = self._hop + (self._pad if self.token_offset == 0 else 0)
        align = self.schedule.hop_align
        if align and self.token_offset > 0:  # end on an attention chunk: nothing to redo
            hop += -(self._prompt_token.shape[1] + self.token_offset + hop) % align
        return self.token_offset + hop + self._driver.pre_lookahead_len

    def _is_cancelled(self) -> bool:
        if self._cancel is not None and self._cancel.is_set():
            self.cancelled = True
        return self.cancelled

    def push(self, tokens: Iterable[int] | torch.Tensor) -> list[torch.Tensor]:
        """Add new speech tokens; return the wav chunks [1, n] that became ready (maybe none)."""
        ready: list[torch.Tensor] = []
        chunk = self.begin_push(tokens)
        while chunk is not None:
            wav = self._run(chunk)
            if self.cancelled:
                break
            ready.append(wav)
            chunk = self.begin_push(())
        return ready

    def finish(self) -> torch.Tensor:
        """No more tokens: vocode everything not yet emitted (full attention) -> wav [1, n]."""
        chunk = self.begin_finish()
        if chunk is None:
            return torch.zeros(1, 0, device=self._prompt_feat.device)
        return self._run(chunk)

    # --- one chunk in three phases, so a scheduler can solve many streams' flow together ---

    def begin_push(self, tokens: Iterable[int] | torch.Tensor) -> PendingChunk | None:
        """Add new speech tokens and start the next chunk if it is due (at most one; call
        again with no tokens for the next). Run the chunk's flow solve (:func:`solve_chunks`,
        alone or with other streams' chunks), then :meth:`complete` it."""
        if self.finished:
            raise RuntimeError("push() after finish()")
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.flatten().tolist()
        self._tokens.extend(int(t) for t in tokens)
        if self._is_cancelled() or self.num_tokens < self.next_chunk_tokens():
            return None
        hop = self.next_chunk_tokens() - self._driver.pre_lookahead_len - self.token_offset
        return self._begin(self.token_offset + hop + self._driver.pre_lookahead_len, False, hop)

    def begin_finish(self) -> PendingChunk | None:
        """No more tokens: start the last chunk (None when there is nothing left to make)."""
        if self.finished:
            raise RuntimeError("finish() called twice")
        self.finished = True
        if self._is_cancelled() or self.num_tokens == 0:
            self._flow_cache = None
            return None
        return self._begin(self.num_tokens, True, 0)

    def complete(self, chunk: PendingChunk) -> torch.Tensor:
        """Vocode a chunk whose flow solve ran -> wav [1, n]; a cancel (before or during it)
        ends the stream: ``cancelled`` is set and the chunk is empty."""
        if chunk.stream is not self or self._pending is not chunk:
            raise RuntimeError("complete() takes this stream's pending chunk")
        self._pending = None
        try:
            with cancellation.watching(self._cancel):
                return self._end(chunk)
        except cancellation.Cancelled:
            return self._cancelled()
        finally:
            if chunk.finalize:
                self._flow_cache = None  # free its memory even if the stream object lives on

    def _run(self, chunk: PendingChunk) -> torch.Tensor:
        solve_chunks([chunk])
        return self.complete(chunk)

    def _cancelled(self) -> torch.Tensor:
        self.cancelled = True
        self._flow_cache = None  # half-updated: worthless, and its memory is freed now
        return torch.zeros(1, 0, device=self._prompt_feat.device)

    @torch.inference_mode()
    def _begin(self, token_len: int, finalize: bool, hop: int) -> PendingChunk | None:
        if self._pending is not None:
            raise RuntimeError("the stream's previous chunk was not completed")
        d = self._driver
        token = torch.tensor([self._tokens[:token_len]], dtype=self._prompt_token.dtype,
                             device=self._prompt_token.device)
        # the reference runs the final call without chunk masks (full_attention_final)
        streaming = not (finalize and self.schedule.full_attention_final)
        skip = self.token_offset * d.token_mel_ratio
        chunk = PendingChunk(self, token_len, finalize, streaming, hop)
        try:
            with cancellation.watching(self._cancel):
                if streaming and self._flow_cache is not None:
                    chunk.flow_call = d.flow.begin_cached(  # type: ignore[attr-defined]
                        token, self._prompt_token, self._prompt_feat, self._embedding,
                        self._flow_cache, finalize=finalize, skip=skip, cancel=self._cancel)
                else:
                    mel = d.flow.inference(token, self._prompt_token, self._prompt_feat,
                                           self._embedding, streaming=streaming,
                                           finalize=finalize)
                    chunk.mel = mel[:, :, skip:]
        except cancellation.Cancelled:
            self._cancelled()
            return None
        self._pending = chunk
        return chunk

    @torch.inference_mode()
    def _end(self, chunk: PendingChunk) -> torch.Tensor:
        d = self._driver
        mel = chunk.mel
        if chunk.flow_call is not None:
            mel = d.flow.end_cached(chunk.flow_call)  # type: ignore[attr-defined]
        assert mel is not None
        wav, self._cache, trace = d._vocode(mel, self._cache, chunk.finalize, self._generator)
        self.chunks += 1
        if self._on_chunk is not None:
            self._on_chunk(ChunkTrace(chunk.token_len, self.token_offset, chunk.streaming,
                                      chunk.finalize, wav=wav, **trace))
        if not chunk.finalize:
            self.token_offset += chunk.hop
            self._hop = self.schedule.next_hop(self._hop)
        return wav


@dataclass(eq=False)
class PendingChunk:
    """One chunk of a stream between its start and :meth:`Token2WavStream.complete`: the flow
    call still waiting for its Euler solve, or the mel when the flow ran whole."""

    stream: Token2WavStream
    token_len: int  # tokens given to the flow (look-ahead included)
    finalize: bool
    streaming: bool
    hop: int  # tokens the chunk moves the stream on by (0 for the last)
    flow_call: Any = None
    mel: torch.Tensor | None = None


@torch.inference_mode()
def solve_chunks(chunks: Sequence[PendingChunk]) -> None:
    """Run the flow solves of pending chunks, those of streams sharing a flow model together
    (one estimator call per Euler step for all of them: far better use of the matrix units
    than one stream at a time). A lone chunk watches its stream's cancel event; in a group
    each stream leaves at its next step once its event is set."""
    groups: dict[int, list[PendingChunk]] = {}
    for chunk in chunks:
        if chunk.flow_call is not None:
            groups.setdefault(id(chunk.stream._driver.flow), []).append(chunk)
    for group in groups.values():
        decoder = group[0].stream._driver.flow.decoder  # type: ignore[attr-defined]
        solves = [chunk.flow_call.solve for chunk in group]
        if len(group) == 1:
            with cancellation.watching(group[0].stream._cancel):
                try:
                    decoder.solve_streams(solves)
                except cancellation.Cancelled:
                    solves[0].cancelled = True
        else:
            decoder.solve_streams(solves)
