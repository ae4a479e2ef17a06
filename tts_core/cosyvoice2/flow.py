"""Token-to-mel model of CosyVoice 2 (the reference's ``CausalMaskedDiffWithXvec``).

speech tokens -> embedding -> upsampling conformer encoder -> Linear to 80 bins (``mu``) ->
conditional flow matching, conditioned on the projected speaker embedding and on the prompt's
mel frames placed at the start of ``cond``. The prompt tokens are prepended to the new tokens,
and the frames they produce are cut from the output.

``CausalFlow.state_dict()`` has exactly the keys of the official ``flow.pt``. The model keeps no
state between calls, so one instance can serve concurrent requests.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tts_core import cancellation
from tts_core.cosyvoice2.flow_decoder import EstimatorStepCache, FlowDecoderConfig
from tts_core.cosyvoice2.flow_encoder import (
    EncoderStreamCache,
    FlowEncoderConfig,
    UpsampleConformerEncoder,
)
from tts_core.cosyvoice2.flow_matching import CausalConditionalCFM, CFMConfig, StreamSolve
from tts_core.cosyvoice2.hyperyaml import Tagged
from tts_core.cosyvoice2.kv_arena import ArenaLease, ArenaPool

_FLOW_DEFAULTS: dict[str, Any] = {  # defaults of the reference constructor
    "input_size": 512, "output_size": 80, "spk_embed_dim": 192, "vocab_size": 4096,
    "token_mel_ratio": 2, "pre_lookahead_len": 3,
}
_EXPECTED_TARGETS = {
    "flow": "CausalMaskedDiffWithXvec",
    "encoder": "UpsampleConformerEncoder",
    "decoder": "CausalConditionalCFM",
    "estimator": "CausalConditionalDecoder",
}


def _node_args(node: Any, role: str) -> dict[str, Any]:
    """Arguments of a ``!new:`` node, checking it names the class this module implements."""
    if not isinstance(node, Tagged) or not isinstance(node.args, dict):
        raise ValueError(f"flow yaml: `{role}` must be a !new: node with keyword arguments")
    wanted = _EXPECTED_TARGETS[role]
    if node.target.rsplit(".", 1)[-1] != wanted:
        raise ValueError(f"flow yaml: `{role}` is {node.target}; only {wanted} is supported")
    return node.args


@dataclass
class FlowConfig:
    input_size: int = 512  # token embedding width
    output_size: int = 80  # mel bins
    spk_embed_dim: int = 192
    vocab_size: int = 6561
    token_mel_ratio: int = 2
    pre_lookahead_len: int = 3
    spk_proj_dim: int = 80  # width of the projected speaker embedding fed to the estimator
    encoder: FlowEncoderConfig = field(default_factory=FlowEncoderConfig)
    estimator: FlowDecoderConfig = field(default_factory=FlowDecoderConfig)
    cfm: CFMConfig = field(default_factory=CFMConfig)

    def __post_init__(self) -> None:
        if self.encoder.input_size != self.input_size:
            raise ValueError(f"flow: input_size {self.input_size} differs from the encoder's "
                             f"input_size {self.encoder.input_size}")
        if self.spk_proj_dim != self.output_size:
            raise ValueError("flow: the speaker projection width (decoder spk_emb_dim "
                             f"{self.spk_proj_dim}) must equal output_size {self.output_size}")
        wanted_in = 3 * self.output_size + self.spk_proj_dim  # x, mu, cond + speaker
        est = self.estimator
        if est.in_channels != wanted_in or est.out_channels != self.output_size:
            raise ValueError(f"flow: estimator in/out channels {self.estimator.in_channels}/"
                             f"{self.estimator.out_channels} do not fit output_size "
                             f"{self.output_size} (expected {wanted_in}/{self.output_size})")
        if self.cfm.n_feats != self.output_size:
            raise ValueError("flow: flow-matching feature count must equal output_size")

    @classmethod
    def from_yaml(cls, node: Tagged) -> FlowConfig:
        """Build from the ``flow`` node of ``cosyvoice2.yaml`` as read by ``hyperyaml.load``."""
        args = {**_FLOW_DEFAULTS, **_node_args(node, "flow")}
        encoder_args = _node_args(args.get("encoder"), "encoder")
        decoder_args = _node_args(args.get("decoder"), "decoder")
        estimator_args = _node_args(decoder_args.get("estimator"), "estimator")
        cfm_node = decoder_args.get("cfm_params")
        cfm_params = cfm_node.get("content", cfm_node.args) if isinstance(cfm_node, Tagged) \
            else cfm_node
        if not isinstance(cfm_params, dict):
            raise ValueError("flow yaml: decoder.cfm_params must be a mapping")
        output_size = int(args["output_size"])
        return cls(
            input_size=int(args["input_size"]),
            output_size=output_size,
            spk_embed_dim=int(args["spk_embed_dim"]),
            vocab_size=int(args["vocab_size"]),
            token_mel_ratio=int(args["token_mel_ratio"]),
            pre_lookahead_len=int(args["pre_lookahead_len"]),
            spk_proj_dim=int(decoder_args.get("spk_emb_dim", output_size)),
            encoder=FlowEncoderConfig.from_yaml(encoder_args, int(args["pre_lookahead_len"]),
                                                int(args["token_mel_ratio"])),
            estimator=FlowDecoderConfig.from_yaml(estimator_args),
            cfm=CFMConfig.from_yaml(cfm_params, output_size),
        )


@dataclass
class FlowStreamCache:
    """Per-request streaming state of the flow: everything about the finished chunks.

    Finished means a whole attention chunk (``static_chunk_size`` tokens, ``ratio`` times as
    many mel frames) whose look-ahead tokens were seen: its encoder and estimator rows never
    change again, so later calls reuse them (per Euler step and CFG row: conv contexts and
    attention keys/values) and compute only the frames after them. Owned by one stream and
    written in place by :meth:`CausalFlow.inference_cached`; a cache meant to be shared (a
    registered speaker's prompt, :meth:`CausalFlow.prompt_cache`) is handed on by ``clone``
    before use (without copying). ``prompt``: the conditioning it was built for, checked on
    every call.

    Memory budget: the estimator's keys/values take about 4.6 MB per mel frame at the official
    size in float32. With ``max_bytes`` set, a call that would take them past it drops them
    (``lean``) and from then on the stream recomputes the estimator over all its frames on
    every call, one Euler step at a time (holding a tenth of the keys/values, transiently):
    bit-identical, as every piece is computed as before, but each call costs the whole stream.
    """

    prompt: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    encoder: EncoderStreamCache = field(default_factory=EncoderStreamCache)
    estimator: list[EstimatorStepCache] = field(default_factory=list)
    mel: torch.Tensor | None = None  # [1, 80, frames] float32 mel of the finished frames
    # (first frame, mu [1, 80, frames]) of each estimator piece of the finished frames, as it
    # was computed (what a lean recomputation needs; 320 bytes a frame in float32)
    mu: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    max_bytes: int | None = None
    lean: bool = False

    @property
    def frames(self) -> int:
        return 0 if self.mel is None else self.mel.shape[-1]

    def clone(self) -> FlowStreamCache:
        """An independent cache that goes on from this one. It shares the finished rows
        without copying them: every write goes past them, into newly grown buffers, so this
        cache is never changed through the clone (any number of streams may share it)."""
        return FlowStreamCache(self.prompt, self.encoder.clone(),
                               [step.clone(self.frames) for step in self.estimator], self.mel,
                               list(self.mu), self.max_bytes, self.lean)

    def with_budget(self, max_bytes: int | None) -> FlowStreamCache:
        """This cache (itself, not a copy) with the given memory budget; returns self."""
        self.max_bytes = max_bytes
        return self

    def compact(self) -> FlowStreamCache:
        """A copy holding exactly the finished rows (no room to grow), to keep for long."""
        shared = self.clone()

        def copy(items: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
            return [None if t is None else t.clone() for t in items]
        shared.encoder.keys, shared.encoder.values = copy(shared.encoder.keys), \
            copy(shared.encoder.values)
        for step in shared.estimator:
            step.keys, step.values, step.lease = copy(step.keys), copy(step.values), None
        return shared

    def attach(self, lease: ArenaLease, prompt: FlowStreamCache | None = None) -> bool:
        """Give this stream's estimator keys/values the block of ``lease`` to live in, its
        finished rows (those of ``prompt``, the shared cache it was cloned from) copied in
        unless the block holds them already. False (nothing changed) when they do not fit."""
        block = lease.block
        steps, layers, _, rows, capacity, width = block.shape
        frames = self.frames
        if self.lean or len(self.estimator) > steps or frames > capacity or any(
                len(step.keys) > layers or any(
                    t is not None and (t.shape[0] != rows or t.shape[2] != width
                                       or t.dtype != block.dtype)
                    for t in (*step.keys, *step.values))
                for step in self.estimator):
            return False
        reuse = prompt is not None and lease.holds_prompt(prompt, frames)
        if not reuse:
            lease.mark_prompt(None, 0)  # this stream writes its rows from the first one on
        while len(self.estimator) < steps:
            self.estimator.append(EstimatorStepCache())
        for step, room in zip(self.estimator, block, strict=True):
            for kind, items in enumerate((step.keys, step.values)):
                for index, rows_in in enumerate(items):
                    if rows_in is None:
                        continue
                    own = room[index, kind]
                    if not reuse:
                        own[:, :frames] = rows_in[:, :frames]
                    items[index] = own
            step.room, step.lease, step.rows = room, lease, frames
            step.room_views = {}
        if prompt is not None and frames and not reuse:
            lease.mark_prompt(prompt, frames)
        return True

    def nbytes(self) -> int:
        """Memory of its tensors (a stream's buffers are grown ahead of the finished rows;
        a clone counts the rows it shares)."""
        mel = 0 if self.mel is None else self.mel.numel() * self.mel.element_size()
        return self.encoder.nbytes() + sum(s.nbytes() for s in self.estimator) + mel


class CausalFlow(nn.Module):
    # Compute a stream's prompt chunks as one estimator run (see _run_chunks); False computes
    # them chunk by chunk, as before (benchmarks compare the two; outputs differ in rounding).
    group_prompt_chunks = True

    def __init__(self, config: FlowConfig):
        super().__init__()
        self.config = config
        self.input_embedding = nn.Embedding(config.vocab_size, config.input_size)
        self.spk_embed_affine_layer = nn.Linear(config.spk_embed_dim, config.output_size)
        self.encoder = UpsampleConformerEncoder(config.encoder)
        self.encoder_proj = nn.Linear(config.encoder.output_size, config.output_size)
        self.decoder = CausalConditionalCFM(config.cfm, config.estimator)
        self.arenas = ArenaPool()  # streams' key/value blocks, reused (see kv_arena)

    def project_speaker(self, embedding: torch.Tensor) -> torch.Tensor:
        """[B, spk_embed_dim] speaker embedding -> L2-normalised, projected [B, output_size]."""
        return self.spk_embed_affine_layer(F.normalize(embedding, dim=1))

    def encode(self, tokens: torch.Tensor, streaming: bool, finalize: bool) -> torch.Tensor:
        """[B, L] token ids (prompt + new) -> encoder output [B, frames, E].

        finalize=False: the last ``pre_lookahead_len`` tokens are look-ahead context only, so
        frames = token_mel_ratio * (L - pre_lookahead_len).
        """
        self._check_tokens(tokens)
        x = self.input_embedding(tokens.long())
        if streaming and self.supports_chunk_streaming:
            main = tokens.shape[1] - (0 if finalize else self._lookahead_of(tokens))
            return torch.cat(self.encoder.forward_chunks(x, main, EncoderStreamCache()), dim=1)
        if finalize:
            return self.encoder(x, None, streaming)
        lookahead = self.config.pre_lookahead_len
        if tokens.shape[1] <= lookahead:
            raise ValueError(f"flow: a non-final call needs more than {lookahead} tokens "
                             f"(the last {lookahead} are look-ahead), got {tokens.shape[1]}")
        return self.encoder(x[:, :-lookahead], x[:, -lookahead:], streaming)

    def _lookahead_of(self, tokens: torch.Tensor) -> int:
        lookahead = self.config.pre_lookahead_len
        if tokens.shape[1] <= lookahead:
            raise ValueError(f"flow: a non-final call needs more than {lookahead} tokens "
                             f"(the last {lookahead} are look-ahead), got {tokens.shape[1]}")
        return lookahead

    @property
    def supports_chunk_streaming(self) -> bool:
        """Whether streaming calls run chunk by chunk (and can be cached): a single-level
        estimator whose attention chunk is the encoder's, upsampled."""
        config = self.config
        return (self.decoder.estimator.supports_chunks and config.encoder.static_chunk_size > 0
                and config.estimator.static_chunk_size
                == config.encoder.static_chunk_size * config.encoder.upsample_stride)

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if tokens.dim() != 2 or tokens.dtype.is_floating_point:
            raise ValueError(f"flow: tokens must be an integer tensor [batch, length], got "
                             f"{tuple(tokens.shape)} {tokens.dtype}")
        if not tokens.numel():
            return
        vocab = self.config.vocab_size
        low, high = torch.stack(torch.aminmax(tokens)).tolist()  # one device sync, not four
        if low < 0 or high >= vocab:
            raise ValueError(f"flow: speech token ids must lie in [0, {vocab}), "
                             f"got {low}..{high}")

    def _check_inputs(self, token: torch.Tensor, prompt_token: torch.Tensor,
                      prompt_feat: torch.Tensor, embedding: torch.Tensor) -> None:
        if token.dim() != 2 or prompt_token.dim() != 2 or token.shape[0] != 1 \
                or prompt_token.shape[0] != 1:
            raise ValueError("flow: token and prompt_token must be [1, length] tensors")
        if prompt_feat.dim() != 3 or prompt_feat.shape[0] != 1 \
                or prompt_feat.shape[2] != self.config.output_size:
            raise ValueError(f"flow: prompt_feat must be [1, frames, {self.config.output_size}], "
                             f"got {tuple(prompt_feat.shape)}")
        if embedding.shape != (1, self.config.spk_embed_dim):
            raise ValueError(f"flow: embedding must be [1, {self.config.spk_embed_dim}], "
                             f"got {tuple(embedding.shape)}")

    @torch.inference_mode()
    def inference(self, token: torch.Tensor, prompt_token: torch.Tensor,
                  prompt_feat: torch.Tensor, embedding: torch.Tensor, streaming: bool = False,
                  finalize: bool = True) -> torch.Tensor:
        """Mel frames for ``token`` in the prompt's voice.

        token [1, N] and prompt_token [1, P] ids; prompt_feat [1, F, output_size] (frame-major,
        normally F = token_mel_ratio * P); embedding [1, spk_embed_dim].
        streaming: chunk-masked attention (encoder and estimator) instead of full attention.
        finalize: False when more tokens follow; the last ``pre_lookahead_len`` tokens are then
        look-ahead context only.
        Returns float32 [1, output_size, frames], the prompt's frames excluded:
        frames = ratio * (P + N) - F, minus ratio * pre_lookahead_len when not finalize.
        """
        if streaming and self.supports_chunk_streaming:
            return self.inference_cached(token, prompt_token, prompt_feat, embedding,
                                         FlowStreamCache(), finalize)
        self._check_inputs(token, prompt_token, prompt_feat, embedding)
        weight = self.input_embedding.weight
        device, dtype = weight.device, weight.dtype
        spks = self.project_speaker(embedding.to(device, dtype))
        tokens = torch.cat([prompt_token, token], dim=1).to(device)
        h = self.encode(tokens, streaming, finalize)
        frames, prompt_frames = h.shape[1], prompt_feat.shape[1]
        if prompt_frames > frames:
            raise ValueError(f"flow: prompt_feat has {prompt_frames} frames but the tokens give "
                             f"only {frames}")
        mu = self.encoder_proj(h).transpose(1, 2).contiguous()  # [1, 80, frames]

        cond = torch.zeros(1, self.config.output_size, frames, device=device, dtype=dtype)
        cond[:, :, :prompt_frames] = prompt_feat.to(device, dtype).transpose(1, 2)
        mask = torch.ones(1, 1, frames, device=device, dtype=dtype)
        mel = self.decoder(mu, mask, spks, cond, streaming)
        return mel[:, :, prompt_frames:].float()

    # --- streaming, chunk by chunk --------------------------------------------------------

    @torch.inference_mode()
    def inference_cached(self, token: torch.Tensor, prompt_token: torch.Tensor,
                         prompt_feat: torch.Tensor, embedding: torch.Tensor,
                         cache: FlowStreamCache, finalize: bool = False, skip: int = 0
                         ) -> torch.Tensor:
        """``inference(..., streaming=True, finalize)`` computing only what ``cache`` lacks.

        token: all new tokens so far (not only the latest ones); the cache must come from
        earlier calls of the same request (or :meth:`prompt_cache` of the same prompt) and is
        updated in place. skip: mel frames to leave out at the start of the output (those
        already emitted), so the result is frames ``skip`` onwards of what ``inference``
        returns. The output equals ``inference``'s bit for bit: the uncached streaming path is
        this one with an empty cache.
        """
        call = self.begin_cached(token, prompt_token, prompt_feat, embedding, cache, finalize,
                                 skip)
        self.decoder.solve_streams([call.solve])
        return self.end_cached(call)

    @torch.inference_mode()
    def begin_cached(self, token: torch.Tensor, prompt_token: torch.Tensor,
                     prompt_feat: torch.Tensor, embedding: torch.Tensor,
                     cache: FlowStreamCache, finalize: bool = False, skip: int = 0,
                     cancel: threading.Event | None = None) -> CachedFlowCall:
        """:meth:`inference_cached` up to the Euler solve (the encoder's new frames and the
        estimator's inputs). The caller runs ``flow.decoder.solve_streams`` on the call's
        ``solve``, alone or together with other streams' (the batch scheduler does), then
        :meth:`end_cached`. ``cancel``: the solve drops this stream at its next step once set.
        """
        if not self.supports_chunk_streaming:
            raise ValueError("flow: this configuration cannot stream chunk by chunk")
        self._check_inputs(token, prompt_token, prompt_feat, embedding)
        tokens = torch.cat([prompt_token, token.to(prompt_token.device)], dim=1)
        call = self._plan_chunks(tokens, prompt_token, prompt_feat, embedding, cache, finalize,
                                 keep_unfinished=True)
        call.skip, call.solve.cancel = skip, cancel
        return call

    @torch.inference_mode()
    def end_cached(self, call: CachedFlowCall) -> torch.Tensor:
        """The mel of a :meth:`begin_cached` call once its solve ran (frames from ``skip``);
        raises ``cancellation.Cancelled`` if the solve dropped it (the cache is then
        worthless)."""
        mel = self._finish_chunks(call)
        if call.prompt_frames > mel.shape[-1]:
            raise ValueError(f"flow: prompt_feat has {call.prompt_frames} frames but the tokens "
                             f"give only {mel.shape[-1]}")
        return mel[:, :, call.prompt_frames + call.skip:]

    @torch.inference_mode()
    def prompt_cache(self, prompt_token: torch.Tensor, prompt_feat: torch.Tensor,
                     embedding: torch.Tensor) -> FlowStreamCache:
        """The streaming cache of a prompt alone: its finished chunks (those whose look-ahead
        lies inside the prompt), to keep with a registered speaker and hand to each of its
        streams (streams go on from a ``clone``, which shares it and never writes to it). Empty
        when the prompt is shorter than one chunk."""
        if not self.supports_chunk_streaming:
            raise ValueError("flow: this configuration cannot stream chunk by chunk")
        self._check_inputs(prompt_token[:, :0], prompt_token, prompt_feat, embedding)
        cache = FlowStreamCache()
        call = self._plan_chunks(prompt_token, prompt_token, prompt_feat, embedding, cache,
                                 finalize=False, keep_unfinished=False)
        self.decoder.solve_streams([call.solve])
        self._finish_chunks(call)
        return cache.compact()

    def new_stream_cache(self, max_bytes: int | None,
                         prompt_cache: FlowStreamCache | None = None) -> FlowStreamCache:
        """A stream's own cache: empty, or going on from a shared ``prompt_cache``, with the
        memory budget ``max_bytes``. With a budget its keys/values live in a block of the
        arena pool with room for the whole budget (see kv_arena), so they are never copied as
        the stream grows; the output is the same bit for bit either way."""
        cache = (prompt_cache.clone() if prompt_cache is not None
                 else FlowStreamCache()).with_budget(max_bytes)
        dtype = self.input_embedding.weight.dtype
        frame_bytes = self.stream_cache_bytes_per_frame(dtype)
        capacity = 0 if max_bytes is None else max_bytes // frame_bytes
        if capacity < 1 or not self.supports_chunk_streaming:
            return cache
        steps, layers, rows, width = self._stream_cache_shape()
        lease = self.arenas.lease(steps, layers, rows, int(capacity), width, dtype,
                                  self.input_embedding.weight.device, prompt=prompt_cache)
        cache.attach(lease, prompt_cache)
        return cache

    def _stream_cache_shape(self) -> tuple[int, int, int, int]:
        """(Euler steps, attention layers, CFG rows, key width) of a stream's keys/values."""
        est = self.config.estimator
        layers = est.n_blocks * (len(est.channels) * 2 + est.num_mid_blocks)
        rows = 2 if self.config.cfm.inference_cfg_rate > 0 else 1
        return self.config.cfm.n_timesteps, layers, rows, est.num_heads * est.attention_head_dim

    def stream_cache_bytes_per_frame(self, dtype: torch.dtype = torch.float32) -> int:
        """Bytes a stream cache's estimator keys/values take per mel frame (every Euler step,
        CFG row and attention layer)."""
        steps, layers, rows, width = self._stream_cache_shape()
        return steps * rows * layers * 2 * width * torch.finfo(dtype).bits // 8

    def prompt_chunks(self, prompt_tokens: int) -> int:
        """Attention chunks that a prompt of this many tokens finishes on its own (their
        look-ahead lies inside it)."""
        chunk = self.config.encoder.static_chunk_size
        return max(0, prompt_tokens - self.config.pre_lookahead_len) // chunk

    def _plan_chunks(self, tokens: torch.Tensor, prompt_token: torch.Tensor,
                     prompt_feat: torch.Tensor, embedding: torch.Tensor, cache: FlowStreamCache,
                     finalize: bool, keep_unfinished: bool) -> CachedFlowCall:
        """Everything before the Euler solve for frames 0.. of prompt + tokens (the finished
        ones come from the cache); :meth:`_finish_chunks` completes it after the solve."""
        weight = self.input_embedding.weight
        device, dtype = weight.device, weight.dtype
        prompt = (prompt_token, prompt_feat, embedding)
        if cache.prompt is None:
            cache.prompt = tuple(t.detach().clone() for t in prompt)  # type: ignore[assignment]
        elif not all(a.shape == b.shape and torch.equal(a, b.to(a.device))
                     for a, b in zip(cache.prompt, prompt, strict=True)):
            raise ValueError("flow: this stream cache belongs to another prompt")
        self._check_tokens(tokens)
        encoder = self.encoder
        chunk = self.config.encoder.static_chunk_size
        ratio = self.config.encoder.upsample_stride
        main = tokens.shape[1] - (0 if finalize else self._lookahead_of(tokens))
        if not keep_unfinished:
            main = max(cache.encoder.tokens, main // chunk * chunk)
        start_frame = ratio * cache.encoder.tokens
        if cache.frames != start_frame:
            raise ValueError("flow: stream cache is inconsistent (encoder and mel disagree)")
        spks = self.project_speaker(embedding.to(device, dtype))
        feat = prompt_feat.to(device, dtype).transpose(1, 2)  # [1, 80, F]
        hidden = encoder.forward_chunks(self.input_embedding(tokens.long()), main,
                                        cache.encoder)
        # The prompt's chunks (those whose look-ahead lies in the prompt: what prompt_cache
        # computes) go through the estimator as one run when a stream starts from nothing: one
        # call on all their frames uses the cores far better than a call per 50-frame chunk.
        # The rule depends on the prompt length alone, so every path (uncached, zero-shot
        # stream, a speaker's prompt cache) computes them the same way, bit for bit.
        group = self.prompt_chunks(prompt_token.shape[1]) \
            if start_frame == 0 and self.group_prompt_chunks else 0
        if group > 1:
            hidden = [torch.cat(hidden[:group], dim=1), *hidden[group:]]

        def conditioning(frame: int, frames: int) -> torch.Tensor:
            cond = torch.zeros(1, self.config.output_size, frames, device=device, dtype=dtype)
            shown = max(0, min(frames, feat.shape[-1] - frame))
            cond[:, :, :shown] = feat[:, :, frame:frame + shown]
            return cond

        new: list[tuple[int, torch.Tensor, torch.Tensor, bool]] = []
        frame = start_frame
        for h in hidden:
            frames = h.shape[1]
            mu = self.encoder_proj(h).transpose(1, 2).contiguous()  # [1, 80, frames]
            new.append((frame, mu, conditioning(frame, frames), frames % (ratio * chunk) == 0))
            frame += frames
        if not cache.lean and cache.max_bytes is not None \
                and self.stream_cache_bytes_per_frame(dtype) * frame > cache.max_bytes:
            cache.lean, cache.estimator = True, []  # over budget: recompute from now on
        old = [(f, mu, conditioning(f, mu.shape[-1]), True) for f, mu in cache.mu] \
            if cache.lean else []
        if self.decoder.estimator.merges_chunk_runs_exactly():
            old, new = _join_finished(old), _join_finished(new)
        solve = StreamSolve(old + new, spks, None if cache.lean else cache.estimator)
        return CachedFlowCall(solve, cache, len(old), prompt_feat.shape[1], device)

    def _finish_chunks(self, call: CachedFlowCall) -> torch.Tensor:
        """Frames 0.. after the solve (finished ones from the cache), float32 [1, 80, T]; the
        solve's complete pieces join the cache."""
        if call.solve.cancelled:
            raise cancellation.Cancelled
        cache = call.cache
        pieces = [] if cache.mel is None else [cache.mel]
        new = call.solve.pieces[call.recomputed:]
        mels = call.solve.mels[call.recomputed:]
        for (f, mu, _, complete), mel in zip(new, mels, strict=True):
            pieces.append(mel)
            if complete:
                cache.mel = mel if cache.mel is None else torch.cat([cache.mel, mel], dim=2)
                cache.mu.append((f, mu))
        if not pieces:
            return torch.zeros(1, self.config.output_size, 0, device=call.device)
        return torch.cat(pieces, dim=2)


def _join_finished(pieces: list[tuple[int, torch.Tensor, torch.Tensor, bool]]
                   ) -> list[tuple[int, torch.Tensor, torch.Tensor, bool]]:
    """Consecutive finished chunks as one piece (mu and cond joined along time), so the
    estimator runs them together; an unfinished last chunk stays apart, as its conv contexts
    must not be kept."""
    joined: list[tuple[int, torch.Tensor, torch.Tensor, bool]] = []
    for piece in pieces:
        if joined and joined[-1][3] and piece[3]:
            start, mu, cond, _ = joined[-1]
            joined[-1] = (start, torch.cat([mu, piece[1]], dim=2),
                          torch.cat([cond, piece[2]], dim=2), True)
        else:
            joined.append(piece)
    return joined


@dataclass
class CachedFlowCall:
    """A streamed flow call between :meth:`CausalFlow.begin_cached` and
    :meth:`CausalFlow.end_cached`: its Euler solve, and what completing it needs."""

    solve: StreamSolve
    cache: FlowStreamCache
    recomputed: int  # leading pieces of the solve that recompute finished frames (lean cache)
    prompt_frames: int
    device: torch.device
    skip: int = 0
