"""Token-to-mel model of CosyVoice 3 (the reference's ``CausalMaskedDiffWithDiT``).

Unlike CosyVoice 2 there is no conformer encoder: speech tokens (prompt tokens first) are
embedded directly at the mel width (80), mixed with the next ``pre_lookahead_len`` tokens by the
look-ahead convolutions, and each token's vector is repeated ``token_mel_ratio`` times; that is
``mu``. Conditional flow matching (shared with CosyVoice 2, with the DiT as its estimator) then
turns the fixed noise into mel frames, conditioned on ``mu``, the projected speaker embedding and
the prompt's mel frames placed at the start of ``cond``; the prompt's frames are cut from the
output.

``CausalFlowDiT.state_dict()`` has exactly the keys of the official ``flow.pt``. The model keeps
no state between calls, so one instance can serve concurrent requests; a streaming request may
pass its own :class:`FlowStreamCache` so that the chunks of earlier calls are not recomputed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tts_core.cosyvoice2.checkpoint import load_strict
from tts_core.cosyvoice2.flow_encoder import PreLookaheadLayer
from tts_core.cosyvoice2.flow_matching import CausalConditionalCFM, CFMConfig, time_grid
from tts_core.cosyvoice2.hyperyaml import Tagged

from .dit import DiT, DiTCache, DiTConfig

_FLOW_DEFAULTS: dict[str, Any] = {  # defaults of the reference constructor
    "input_size": 512, "output_size": 80, "spk_embed_dim": 192, "vocab_size": 4096,
    "token_mel_ratio": 2, "pre_lookahead_len": 3,
}


def node_args(node: Any, role: str, wanted: str) -> dict[str, Any]:
    """Keyword arguments of a ``!new:`` yaml node, checking that it names class ``wanted``."""
    if not isinstance(node, Tagged) or not isinstance(node.args, dict):
        raise ValueError(f"flow yaml: `{role}` must be a !new: node with keyword arguments")
    if node.target.rsplit(".", 1)[-1] != wanted:
        raise ValueError(f"flow yaml: `{role}` is {node.target}; only {wanted} is supported")
    return node.args


@dataclass
class FlowConfig:
    """Defaults are the released Fun-CosyVoice3-0.5B values."""

    input_size: int = 80  # token embedding width (= mel bins: mu needs no projection)
    output_size: int = 80  # mel bins
    spk_embed_dim: int = 192
    vocab_size: int = 6561
    token_mel_ratio: int = 2
    pre_lookahead_len: int = 3
    lookahead_channels: int = 1024  # inner width of the look-ahead convolutions
    estimator: DiTConfig = field(default_factory=DiTConfig)
    cfm: CFMConfig = field(default_factory=CFMConfig)

    def __post_init__(self) -> None:
        est = self.estimator
        if est.mel_dim != self.output_size or est.spk_dim != self.output_size:
            raise ValueError(f"flow: the DiT's mel_dim/spk_dim {est.mel_dim}/{est.spk_dim} must "
                             f"equal output_size {self.output_size}")
        if est.mu_dim != self.input_size:
            raise ValueError(f"flow: the DiT's mu_dim {est.mu_dim} must equal input_size "
                             f"{self.input_size} (mu is the token embedding itself)")
        if est.static_chunk_size % self.token_mel_ratio:
            raise ValueError(f"flow: the DiT chunk ({est.static_chunk_size} frames) must be a "
                             f"whole number of tokens (token_mel_ratio {self.token_mel_ratio})")
        if self.cfm.n_feats != self.output_size:
            raise ValueError("flow: flow-matching feature count must equal output_size")

    @classmethod
    def from_yaml(cls, node: Tagged) -> FlowConfig:
        """Build from the ``flow`` node of ``cosyvoice3.yaml`` as read by ``hyperyaml.load``."""
        args = {**_FLOW_DEFAULTS, **node_args(node, "flow", "CausalMaskedDiffWithDiT")}
        lookahead_args = node_args(args.get("pre_lookahead_layer"), "pre_lookahead_layer",
                                   "PreLookaheadLayer")
        decoder_args = node_args(args.get("decoder"), "decoder", "CausalConditionalCFM")
        estimator_args = node_args(decoder_args.get("estimator"), "estimator", "DiT")
        cfm_node = decoder_args.get("cfm_params")
        cfm_params = cfm_node.get("content", cfm_node.args) if isinstance(cfm_node, Tagged) \
            else cfm_node
        if not isinstance(cfm_params, dict):
            raise ValueError("flow yaml: decoder.cfm_params must be a mapping")
        input_size, lookahead = int(args["input_size"]), int(args["pre_lookahead_len"])
        if int(lookahead_args.get("in_channels", input_size)) != input_size:
            raise ValueError("flow yaml: pre_lookahead_layer.in_channels must equal input_size")
        if int(lookahead_args.get("pre_lookahead_len", 1)) != lookahead:
            raise ValueError("flow yaml: pre_lookahead_layer.pre_lookahead_len must equal the "
                             "flow's pre_lookahead_len")
        if int(decoder_args.get("spk_emb_dim", args["output_size"])) != int(args["output_size"]):
            raise ValueError("flow yaml: decoder.spk_emb_dim must equal output_size")
        output_size = int(args["output_size"])
        return cls(
            input_size=input_size,
            output_size=output_size,
            spk_embed_dim=int(args["spk_embed_dim"]),
            vocab_size=int(args["vocab_size"]),
            token_mel_ratio=int(args["token_mel_ratio"]),
            pre_lookahead_len=lookahead,
            lookahead_channels=int(lookahead_args["channels"]),
            estimator=DiTConfig.from_yaml(estimator_args),
            cfm=CFMConfig.from_yaml(cfm_params, output_size),
        )


@dataclass
class FlowStreamCache:
    """Streaming state of one request's flow calls (chunk-masked, growing token sequence): per
    Euler step the DiT's cache of the complete chunks so far, and the finished mel of those
    frames. Create one per request with :meth:`CausalFlowDiT.new_stream_cache`; it is only valid
    for calls whose tokens extend the earlier ones, with the same prompt and speaker."""

    steps: list[DiTCache]
    mel: torch.Tensor | None = None  # [1, mel, frames] finished frames (prompt included)
    tokens: torch.Tensor | None = None  # prompt + tokens of the last call

    @property
    def frames(self) -> int:
        return self.steps[0].frames


class _SteppingEstimator:
    """Calls the DiT with the cache of the current Euler step (one instance per flow call)."""

    def __init__(self, dit: DiT, caches: list[DiTCache]):
        self.dit, self.caches, self.step = dit, caches, 0

    def __call__(self, x: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, t: torch.Tensor,
                 spks: torch.Tensor, cond: torch.Tensor, streaming: bool) -> torch.Tensor:
        cache = self.caches[self.step]
        self.step += 1
        return self.dit(x, mask, mu, t, spks, cond, streaming, cache=cache)


class CausalFlowDiT(nn.Module):
    def __init__(self, config: FlowConfig):
        super().__init__()
        self.config = config
        self.input_embedding = nn.Embedding(config.vocab_size, config.input_size)
        self.spk_embed_affine_layer = nn.Linear(config.spk_embed_dim, config.output_size)
        self.pre_lookahead_layer = PreLookaheadLayer(config.input_size, config.pre_lookahead_len,
                                                     hidden=config.lookahead_channels)
        self.decoder = CausalConditionalCFM(config.cfm, DiT(config.estimator))

    def project_speaker(self, embedding: torch.Tensor) -> torch.Tensor:
        """[B, spk_embed_dim] speaker embedding -> L2-normalised, projected [B, output_size]."""
        return self.spk_embed_affine_layer(F.normalize(embedding, dim=1))

    def token_features(self, tokens: torch.Tensor, finalize: bool, block: int | None = None
                       ) -> torch.Tensor:
        """[1, L] token ids (prompt + new) -> ``mu`` [1, frames, input_size], frame-major.

        finalize=False: the last ``pre_lookahead_len`` tokens are look-ahead context only, so
        frames = token_mel_ratio * (L - pre_lookahead_len).
        block: compute the look-ahead convolutions in blocks of this many tokens, aligned to
        token 0 (each with its own context), so that a token's features do not depend on how
        many tokens follow its block — which a convolution over the whole sequence does not
        guarantee in float32 (its algorithm depends on the length). Streams need that to reuse
        earlier chunks bit for bit.
        """
        x = self.input_embedding(tokens.long())
        layer, lookahead = self.pre_lookahead_layer, self.config.pre_lookahead_len
        count = x.shape[1] if finalize else x.shape[1] - lookahead
        if block is None:
            h = layer(x, None) if finalize else layer(x[:, :count], x[:, count:])
        else:
            back = layer.conv2.kernel_size[0] - 1  # tokens of left context of the second conv
            parts = []
            for b0 in range(0, count, block):
                b1 = min(b0 + block, count)
                start = max(0, b0 - back)
                context = x[:, b1:b1 + lookahead]
                # past the last token (final call) the look-ahead is zeros, as unblocked
                context = F.pad(context, (0, 0, 0, lookahead - context.shape[1]))
                out = layer(x[:, start:b1], context)
                parts.append(out[:, b0 - start:])
            h = torch.cat(parts, dim=1)
        return h.repeat_interleave(self.config.token_mel_ratio, dim=1)

    def _check_inputs(self, token: torch.Tensor, prompt_token: torch.Tensor,
                      prompt_feat: torch.Tensor, embedding: torch.Tensor, finalize: bool) -> None:
        c = self.config
        for name, ids in (("token", token), ("prompt_token", prompt_token)):
            if ids.dim() != 2 or ids.shape[0] != 1 or ids.dtype.is_floating_point:
                raise ValueError(f"flow: {name} must be an integer tensor [1, length], got "
                                 f"{tuple(ids.shape)} {ids.dtype}")
            if ids.numel():
                low, high = torch.stack(torch.aminmax(ids)).tolist()  # one device sync
                if low < 0 or high >= c.vocab_size:
                    raise ValueError(f"flow: speech token ids must lie in [0, {c.vocab_size}), "
                                     f"got {low}..{high} in {name}")
        if not finalize and token.shape[1] + prompt_token.shape[1] <= c.pre_lookahead_len:
            raise ValueError(f"flow: a non-final call needs more than {c.pre_lookahead_len} "
                             "tokens (the last ones are look-ahead)")
        if prompt_feat.dim() != 3 or prompt_feat.shape[0] != 1 \
                or prompt_feat.shape[2] != c.output_size:
            raise ValueError(f"flow: prompt_feat must be [1, frames, {c.output_size}], "
                             f"got {tuple(prompt_feat.shape)}")
        if embedding.shape != (1, c.spk_embed_dim):
            raise ValueError(f"flow: embedding must be [1, {c.spk_embed_dim}], "
                             f"got {tuple(embedding.shape)}")

    def conditions(self, token: torch.Tensor, prompt_token: torch.Tensor,
                   prompt_feat: torch.Tensor, embedding: torch.Tensor, finalize: bool,
                   streaming: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the flow matching is conditioned on: (mu [1, 80, T], mask [1, 1, T],
        spks [1, 80], cond [1, 80, T]) with the prompt mel in the first frames of cond.
        streaming: token features computed per DiT chunk (see :meth:`token_features`)."""
        self._check_inputs(token, prompt_token, prompt_feat, embedding, finalize)
        weight = self.input_embedding.weight
        device, dtype = weight.device, weight.dtype
        spks = self.project_speaker(embedding.to(device, dtype))
        tokens = torch.cat([prompt_token, token], dim=1).to(device)
        block = self.config.estimator.static_chunk_size // self.config.token_mel_ratio \
            if streaming else None
        mu = self.token_features(tokens, finalize, block).transpose(1, 2).contiguous()
        frames, prompt_frames = mu.shape[2], prompt_feat.shape[1]
        if prompt_frames > frames:
            raise ValueError(f"flow: prompt_feat has {prompt_frames} frames but the tokens give "
                             f"only {frames}")
        cond = torch.zeros(1, self.config.output_size, frames, device=device, dtype=dtype)
        cond[:, :, :prompt_frames] = prompt_feat.to(device, dtype).transpose(1, 2)
        mask = torch.ones(1, 1, frames, device=device, dtype=dtype)
        return mu, mask, spks, cond

    @torch.inference_mode()
    def inference(self, token: torch.Tensor, prompt_token: torch.Tensor,
                  prompt_feat: torch.Tensor, embedding: torch.Tensor, streaming: bool = False,
                  finalize: bool = True, cache: FlowStreamCache | None = None) -> torch.Tensor:
        """Mel frames for ``token`` in the prompt's voice.

        token [1, N] and prompt_token [1, P] ids; prompt_feat [1, F, output_size] (frame-major,
        normally F = token_mel_ratio * P); embedding [1, spk_embed_dim].
        streaming: chunk-masked DiT attention instead of full attention.
        finalize: False when more tokens follow; the last ``pre_lookahead_len`` tokens are then
        look-ahead context only.
        cache (streaming only): the request's :class:`FlowStreamCache`; chunks it holds are not
        recomputed, and it is extended. The result is the same, bit for bit, as without it.
        Returns float32 [1, output_size, frames], the prompt's frames excluded:
        frames = ratio * (P + N) - F, minus ratio * pre_lookahead_len when not finalize.
        """
        mu, mask, spks, cond = self.conditions(token, prompt_token, prompt_feat, embedding,
                                               finalize, streaming)
        if not streaming:
            if cache is not None:
                raise ValueError("flow: a stream cache only applies to chunk-masked calls")
            mel = self.decoder(mu, mask, spks, cond, False)
        else:
            tokens = torch.cat([prompt_token, token], dim=1)
            mel = self._streaming_solve(mu, mask, spks, cond, tokens, finalize,
                                        cache or self.new_stream_cache())
        return mel[:, :, prompt_feat.shape[1]:].float()

    def stream_cache_bytes_per_frame(self, dtype: torch.dtype = torch.float32) -> int:
        """Bytes a stream cache's DiT keys/values take per mel frame (every Euler step, CFG
        row and block)."""
        dit = self.config.estimator
        rows = 2 if self.config.cfm.inference_cfg_rate > 0 else 1
        return self.config.cfm.n_timesteps * rows * dit.depth * 2 * dit.heads * dit.dim_head \
            * torch.finfo(dtype).bits // 8

    def new_stream_cache(self, max_frames: int | None = None) -> FlowStreamCache:
        """An empty cache for one request. ``max_frames``: keep at most this many frames
        (prompt included; memory bound), recompute the later ones at every call."""
        return FlowStreamCache([DiTCache(max_frames=max_frames)
                                for _ in range(self.config.cfm.n_timesteps)])

    def _streaming_solve(self, mu: torch.Tensor, mask: torch.Tensor, spks: torch.Tensor,
                         cond: torch.Tensor, tokens: torch.Tensor, finalize: bool,
                         cache: FlowStreamCache) -> torch.Tensor:
        start = cache.frames
        if any(step.frames != start for step in cache.steps):
            raise ValueError("flow: inconsistent stream cache (an earlier call was interrupted)")
        if start:
            # the cached frames' mu depends on their tokens and the look-ahead after them
            needed = start // self.config.token_mel_ratio + self.config.pre_lookahead_len
            previous = cache.tokens
            if previous is None or previous.shape[1] < needed or tokens.shape[1] < needed \
                    or not torch.equal(previous[:, :needed].cpu(), tokens[:, :needed].cpu()):
                raise ValueError("flow: the stream cache belongs to other tokens; use one cache "
                                 "per request, with tokens that only grow")
        cfm = self.decoder
        frames = mu.shape[2]
        x = cfm.initial_noise(frames)[:, :, start:].float()
        t_span = time_grid(cfm.config.n_timesteps, cfm.config.t_scheduler, mu.device,
                           torch.float32)
        estimator = _SteppingEstimator(cfm.estimator, cache.steps)
        new = cfm.solve_euler(x, t_span, mu[:, :, start:], mask[:, :, start:], spks,
                              cond[:, :, start:], True, estimator=estimator)
        mel = new if cache.mel is None else torch.cat([cache.mel, new], dim=2)
        cache.mel = mel[:, :, :cache.frames]
        cache.tokens = tokens.detach().clone()
        return mel


def build_flow(node: Tagged, state_dict: Mapping[str, torch.Tensor] | None = None
               ) -> CausalFlowDiT:
    """The flow from the yaml ``flow`` node, optionally loaded (strict: the error names every
    missing, unexpected or mis-shaped key); eval mode, float32 on the CPU."""
    model = CausalFlowDiT(FlowConfig.from_yaml(node))
    if state_dict is not None:
        load_strict(model, state_dict, "the flow state dict")
    return model.eval()
