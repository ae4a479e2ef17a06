"""Conditional flow matching sampler of CosyVoice 2 (inference only).

Integrates dx/dt = v(x, t | mu, speaker, cond) from fixed noise at t = 0 to the mel at t = 1
with Euler steps on a cosine time grid, using classifier-free guidance: each step evaluates the
estimator on a batch of [conditional, unconditional] rows and mixes
v = (1 + rate) * v_cond - rate * v_uncond.

The starting noise is the reference's fixed tensor: torch.manual_seed(0) then
torch.randn(1, 80, 15000), of which each call takes the first T frames. We draw it from a local
generator so the global RNG is never re-seeded; it is made once per module and only read.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tts_core import cancellation
from tts_core.cosyvoice2.flow_decoder import (
    CausalConditionalDecoder,
    ChunkInput,
    EstimatorStepCache,
    FlowDecoderConfig,
)

NOISE_SEED = 0
NOISE_FRAMES = 15000


@dataclass
class CFMConfig:
    n_feats: int = 80  # mel bins
    inference_cfg_rate: float = 0.7
    t_scheduler: str = "cosine"
    n_timesteps: int = 10  # fixed by the reference's flow inference
    temperature: float = 1.0
    noise_frames: int = NOISE_FRAMES

    def __post_init__(self) -> None:
        if self.t_scheduler not in ("cosine", "linear"):
            raise ValueError(f"flow matching: t_scheduler {self.t_scheduler!r} is not supported")
        if self.n_timesteps < 1:
            raise ValueError("flow matching: n_timesteps must be at least 1")

    @classmethod
    def from_yaml(cls, cfm_params: dict[str, Any], n_feats: int) -> CFMConfig:
        """``cfm_params``: the dict inside the decoder's ``cfm_params`` node."""
        solver = cfm_params.get("solver", "euler")
        if solver != "euler":
            raise ValueError(f"flow matching: solver {solver!r} is not supported (only 'euler')")
        return cls(n_feats=n_feats,
                   inference_cfg_rate=float(cfm_params.get("inference_cfg_rate", 0.7)),
                   t_scheduler=str(cfm_params.get("t_scheduler", "cosine")))


def fixed_noise(n_feats: int = 80, frames: int = NOISE_FRAMES, seed: int = NOISE_SEED
                ) -> torch.Tensor:
    """The reference's start noise, [1, n_feats, frames] float32 on the CPU.

    Same numbers as torch.manual_seed(seed); torch.randn(1, n_feats, frames), but drawn from a
    private generator, so the global RNG state is left untouched.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(1, n_feats, frames, generator=generator, dtype=torch.float32,
                       device="cpu")


def time_grid(n_timesteps: int, scheduler: str, device: torch.device, dtype: torch.dtype
              ) -> torch.Tensor:
    """n_timesteps + 1 times from 0 to 1 (cosine: t = 1 - cos(pi/2 * s))."""
    t = torch.linspace(0, 1, n_timesteps + 1, device=device, dtype=dtype)
    if scheduler == "cosine":
        t = 1 - torch.cos(t * 0.5 * math.pi)
    return t


class CausalConditionalCFM(nn.Module):
    """``estimator``: the CosyVoice 2 U-Net's config, or any module called as
    ``estimator(x, mask, mu, t, spks, cond, streaming)`` (CosyVoice 3 passes its DiT)."""

    def __init__(self, config: CFMConfig, estimator: FlowDecoderConfig | nn.Module):
        super().__init__()
        self.config = config
        self.estimator = estimator if isinstance(estimator, nn.Module) \
            else CausalConditionalDecoder(estimator)
        # Not learned and not in the checkpoint; follows the module across .to(device/dtype).
        self.register_buffer("noise", fixed_noise(config.n_feats, config.noise_frames),
                             persistent=False)

    def initial_noise(self, frames: int) -> torch.Tensor:
        if frames > self.noise.shape[-1]:
            raise ValueError(f"flow matching: {frames} mel frames requested, the fixed noise "
                             f"covers {self.noise.shape[-1]} (about "
                             f"{self.noise.shape[-1] // 50} s); synthesise shorter segments")
        return self.noise[:, :, :frames] * self.config.temperature

    def forward(self, mu: torch.Tensor, mask: torch.Tensor, spks: torch.Tensor,
                cond: torch.Tensor, streaming: bool = False) -> torch.Tensor:
        """mu, cond [B, 80, T]; mask [B, 1, T]; spks [B, 80] -> float32 mel [B, 80, T].

        The solver state (x, t, dt) is float32 whatever the estimator's dtype: accumulating the
        ten Euler steps in bfloat16 moved the mel ~5x further from the float32 result than the
        bfloat16 estimator alone does.
        """
        x = self.initial_noise(mu.shape[-1]).float().expand(mu.shape[0], -1, -1)
        t_span = time_grid(self.config.n_timesteps, self.config.t_scheduler, mu.device,
                           torch.float32)
        return self.solve_euler(x, t_span, mu, mask, spks, cond, streaming)

    def solve_euler(self, x: torch.Tensor, t_span: torch.Tensor, mu: torch.Tensor,
                    mask: torch.Tensor, spks: torch.Tensor, cond: torch.Tensor,
                    streaming: bool, estimator: Callable[..., torch.Tensor] | None = None
                    ) -> torch.Tensor:
        """``estimator``: called instead of ``self.estimator`` with the same arguments, once
        per step in order (a per-request wrapper can keep per-step state, e.g. a cache)."""
        estimator = self.estimator if estimator is None else estimator
        rate = self.config.inference_cfg_rate
        batch = x.shape[0]
        if rate > 0:  # second half of the batch: no mu, speaker or prompt (unconditional)
            mu_in = torch.cat([mu, torch.zeros_like(mu)])
            spks_in = torch.cat([spks, torch.zeros_like(spks)])
            cond_in = torch.cat([cond, torch.zeros_like(cond)])
            mask_in = torch.cat([mask, mask])
        else:
            mu_in, spks_in, cond_in, mask_in = mu, spks, cond, mask
        # Keep the reference's bookkeeping: t advances by dt and the next dt is measured from
        # that running t, so the rounding matches step for step.
        t = t_span[0].unsqueeze(0)
        dt = t_span[1] - t_span[0]
        steps = len(t_span) - 1
        for step in range(1, steps + 1):
            cancellation.check()  # a hang-up stops the engine within one Euler step
            x_in = (torch.cat([x, x]) if rate > 0 else x).to(mu.dtype)
            t_in = t.expand(x_in.shape[0])
            velocity = estimator(x_in, mask_in, mu_in, t_in, spks_in, cond_in,
                                 streaming).to(x.dtype)
            if rate > 0:
                v_cond, v_uncond = velocity[:batch], velocity[batch:]
                velocity = (1.0 + rate) * v_cond - rate * v_uncond
            x = x + dt * velocity
            t = t + dt
            if step < steps:
                dt = t_span[step + 1] - t
        return x

    @torch.inference_mode()
    def solve_streams(self, solves: list[StreamSolve]) -> None:
        """Euler steps for the next frames of one or more streams, one step at a time over all
        of them; each stream's results go into its :class:`StreamSolve`.

        Within a step, a stream's pieces run in order (each reads the keys/values the one
        before wrote in that step's cache); the k-th pieces of all streams run as one estimator
        call (:meth:`~CausalConditionalDecoder.forward_chunks`), since streams share nothing.
        A lone stream's arithmetic is that of :meth:`solve_euler` on its frames with chunked
        attention, bit for bit; in a batch of streams the packed matrix products may round
        differently. A stream whose ``cancel`` is set leaves at the next step.
        """
        active = [s for s in solves if s.pieces]
        if not active:
            return
        first_mu = active[0].pieces[0][1]
        dtype, device = first_mu.dtype, first_mu.device
        rate = self.config.inference_cfg_rate
        t_span = time_grid(self.config.n_timesteps, self.config.t_scheduler, device,
                           torch.float32)
        steps = len(t_span) - 1
        states: dict[int, list[list[torch.Tensor]]] = {}
        spks_in: dict[int, torch.Tensor] = {}
        for solve in active:
            if solve.caches is not None:
                while len(solve.caches) < steps:
                    solve.caches.append(EstimatorStepCache())
            spks = solve.spks
            spks_in[id(solve)] = torch.cat([spks, torch.zeros_like(spks)]) if rate > 0 else spks
            pieces = states[id(solve)] = []
            for start, mu, cond, _ in solve.pieces:
                x = self.initial_noise(start + mu.shape[-1])[:, :, start:].float()
                if rate > 0:
                    mu, cond = torch.cat([mu, torch.zeros_like(mu)]), \
                        torch.cat([cond, torch.zeros_like(cond)])
                pieces.append([x, mu, cond])
        t = t_span[0].unsqueeze(0)
        dt = t_span[1] - t_span[0]
        for step in range(1, steps + 1):
            cancellation.check()  # a hang-up stops the engine within one Euler step
            for solve in active:
                if solve.cancel is not None and solve.cancel.is_set():
                    solve.cancelled = True
            active = [s for s in active if not s.cancelled]
            if not active:
                return
            caches = {id(s): EstimatorStepCache() if s.caches is None else s.caches[step - 1]
                      for s in active}
            time = self.estimator.time_embedding(t.expand(2 if rate > 0 else 1), dtype)
            for k in range(max(len(s.pieces) for s in active)):
                members = [s for s in active if k < len(s.pieces)]
                parts = []
                for solve in members:
                    start = solve.pieces[k][0]
                    x, mu_in, cond_in = states[id(solve)][k]
                    x_in = (torch.cat([x, x]) if rate > 0 else x).to(dtype)
                    parts.append(ChunkInput(x_in, mu_in, spks_in[id(solve)], cond_in,
                                            caches[id(solve)], start))
                outputs = self.estimator.forward_chunks(parts, time)
                for solve, (velocity, convs) in zip(members, outputs, strict=True):
                    if solve.pieces[k][3]:  # a complete chunk: its conv contexts are final
                        caches[id(solve)].convs = list(convs)
                    state = states[id(solve)][k]
                    velocity = velocity.to(state[0].dtype)
                    if rate > 0:
                        velocity = (1.0 + rate) * velocity[:1] - rate * velocity[1:]
                    state[0] = state[0] + dt * velocity
            t = t + dt
            if step < steps:
                dt = t_span[step + 1] - t
        for solve in active:
            solve.mels = [state[0] for state in states[id(solve)]]


@dataclass
class StreamSolve:
    """One stream's share of :meth:`CausalConditionalCFM.solve_streams`.

    pieces: consecutive (first frame, mu [1, 80, r], cond [1, 80, r], complete) of the stream;
    spks [1, 80]; caches: one per Euler step, kept and extended, or None for a fresh cache per
    step, dropped after it (a tenth of the memory; the stream's earlier frames must then be
    among the pieces). After the solve: ``mels`` (float32 [1, 80, r] per piece), or
    ``cancelled`` when ``cancel`` was set during it.
    """

    pieces: list[tuple[int, torch.Tensor, torch.Tensor, bool]]
    spks: torch.Tensor
    caches: list[EstimatorStepCache] | None
    cancel: threading.Event | None = None
    mels: list[torch.Tensor] = field(default_factory=list)
    cancelled: bool = False
