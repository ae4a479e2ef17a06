"""Speech tokens -> 24 kHz waveform for CosyVoice 3: the DiT flow, then the causal vocoder.

The API and the token side of streaming are CosyVoice 2's (:mod:`tts_core.cosyvoice2.token2wav`:
:class:`StreamSchedule`, per-request :class:`Token2WavStream` objects that cut the tokens into
chunks of 25, 50, 100... tokens and re-run the flow on everything so far). What differs is the
vocoder side, because the CosyVoice 3 vocoder is causal:

* each chunk's new mel frames are appended to the stream's accumulated mel (frames of earlier
  chunks are kept, not replaced by the recomputed ones), the vocoder re-runs on the whole
  accumulated mel (``finalize=False`` until the last chunk: its last 8 frames are only right
  context), and the samples not emitted yet are cut out and emitted;
* there is no cross-fade and no excitation cache: causality makes the overlap consistent;
* the flow is not recomputed over the whole past at every chunk: each stream keeps a DiT cache
  (:class:`~tts_core.cosyvoice3.flow.FlowStreamCache`: per Euler step and CFG row, the keys and
  values of every complete 50-frame chunk), so a chunk costs the DiT only its new frames and the
  partial chunk before them; the result is bit-identical to recomputing (``dit_cache=False``).
  The last call attends over all frames, as the reference's does, so it recomputes everything.
  Memory: depth · steps · 2 rows · 2 (keys, values) · heads · dim_head floats per mel frame,
  3.6 MB per frame (180 MB per second of prompt + speech) for the released model in float32,
  released when the stream finishes.

All streaming state lives in the per-request stream (the hop length included: the reference keeps
it on the shared model object across requests, a defect not reproduced); the shared
:class:`Token2Wav` and its modules are only read, so requests can stream concurrently.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tts_core.cosyvoice2 import token2wav as cv2_token2wav
from tts_core.cosyvoice2.token2wav import (
    REFERENCE_SCHEDULE,
    ChunkTrace,
    FlowModel,
    StreamSchedule,
    Token2WavStream,
)

from .flow import FlowStreamCache
from .hift import CausalHiFTGenerator

__all__ = ["REFERENCE_SCHEDULE", "ChunkTrace", "StreamSchedule", "Token2Wav", "Token2WavStream"]


@dataclass
class _StreamVocoderState:
    mel: torch.Tensor  # every mel frame of the request so far, [1, 80, frames]
    speech_offset: int  # waveform samples already emitted


class _StreamFlow:
    """The flow as one stream sees it: its chunk-masked calls share the stream's DiT cache,
    dropped after the final call."""

    def __init__(self, flow: Any):
        self.flow = flow
        self.config = flow.config
        self.cache: FlowStreamCache | None = flow.new_stream_cache()

    def inference(self, token: torch.Tensor, prompt_token: torch.Tensor,
                  prompt_feat: torch.Tensor, embedding: torch.Tensor, streaming: bool,
                  finalize: bool) -> torch.Tensor:
        cache = self.cache if streaming else None
        if finalize:
            self.cache = None
        return self.flow.inference(token, prompt_token, prompt_feat, embedding,
                                   streaming=streaming, finalize=finalize, cache=cache)


class Token2Wav(cv2_token2wav.Token2Wav):
    """Shared, read-only token-to-waveform driver around the DiT flow and the causal vocoder."""

    def __init__(
        self,
        flow: FlowModel,
        hift: CausalHiFTGenerator,
        *,
        token_mel_ratio: int | None = None,
        pre_lookahead_len: int | None = None,
        schedule: StreamSchedule = REFERENCE_SCHEDULE,
        dit_cache: bool = True,
    ):
        """``dit_cache``: streams keep the DiT's per-chunk cache (see the module docstring);
        False recomputes every chunk from the first frame (same output, more work)."""
        self.hift: CausalHiFTGenerator
        self.dit_cache = dit_cache
        # mel_cache_len: the vocoder's right context, which the first chunk must exceed
        super().__init__(flow, hift, token_mel_ratio=token_mel_ratio,
                         pre_lookahead_len=pre_lookahead_len,
                         mel_cache_len=hift.config.look_right + 1, schedule=schedule)

    def _check_schedule(self, schedule: StreamSchedule) -> None:
        # A non-final vocoder call needs more mel than its right context.
        needed = self.mel_cache_len // self.token_mel_ratio + 1
        if schedule.first_hop < needed:
            raise ValueError(f"stream schedule: first_hop must be at least {needed} tokens (the "
                             f"vocoder looks {self.mel_cache_len - 1} mel frames ahead)")

    def start_stream(self, prompt_token: torch.Tensor, prompt_feat: torch.Tensor,
                     embedding: torch.Tensor, **options: Any) -> Token2WavStream:
        """A new per-request stream (options as for CosyVoice 2: schedule, cancel, on_chunk);
        feed it with ``push`` and close it with ``finish``."""
        driver = self
        if self.dit_cache and hasattr(self.flow, "new_stream_cache"):
            # a per-stream view of this driver whose flow carries the stream's DiT cache
            driver = copy.copy(self)
            driver.flow = _StreamFlow(self.flow)
        return super(Token2Wav, driver).start_stream(prompt_token, prompt_feat, embedding,
                                                     **options)

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
        """All tokens at once -> wav [1, samples]. ``speed`` != 1 resamples the mel in time
        (linear interpolation to ⌊frames / speed⌋ frames). ``generator`` is unused: the
        CosyVoice 3 vocoder draws no random numbers."""
        if speed <= 0:
            raise ValueError(f"speed must be positive, got {speed}")
        if token.shape[-1] == 0:
            return torch.zeros(1, 0, device=prompt_feat.device)
        mel = self.flow.inference(token, prompt_token, prompt_feat, embedding,
                                  streaming=False, finalize=True)
        if speed != 1.0:
            mel = F.interpolate(mel, size=max(1, int(mel.shape[2] / speed)), mode="linear")
        wav, _ = self.hift.inference(mel, finalize=True)
        return wav

    # called by Token2WavStream with the new mel frames of a chunk; returns what to emit
    def _vocode(self, mel: torch.Tensor, cache: Any, finalize: bool,
                generator: torch.Generator | None
                ) -> tuple[torch.Tensor, _StreamVocoderState | None, dict[str, torch.Tensor]]:
        state: _StreamVocoderState | None = cache
        if state is not None:
            mel = torch.cat([state.mel, mel], dim=2)
        offset = 0 if state is None else state.speech_offset
        wav_all, source = self.hift.inference(mel, finalize=finalize)
        wav = wav_all[:, offset:]
        trace = {"hift_in_mel": mel, "cache_source": source[:, :, :0], "hift_out_wav": wav_all,
                 "hift_out_source": source}
        new_state = None if finalize else _StreamVocoderState(mel, offset + wav.shape[1])
        return wav, new_state, trace
