"""Speech-token sampling for the CosyVoice 2 language model.

A sampler is any callable ``sampler(logp, decoded, ignore_eos) -> int``: ``logp`` is the 1-D
float32 log-probability vector of one step, ``decoded`` the tokens produced so far in this request
(fill tokens included) and ``ignore_eos`` asks for a token that is not a stop id. The LM calls it
once per sampled step, so a teacher-forcing sampler for tests is just another implementation.

:class:`RasSampler` is repetition-aware sampling (VALL-E 2 / CosyVoice 2): draw from the nucleus
(smallest top-probability prefix reaching ``top_p``, at most ``top_k`` tokens); if that token
already occurs at least ``win_size * tau_r`` times among the last ``win_size`` decoded tokens,
draw again from the full distribution instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .hyperyaml import Tagged


class Sampler(Protocol):
    def __call__(self, logp: torch.Tensor, decoded: list[int], ignore_eos: bool) -> int: ...


@dataclass(frozen=True)
class SamplingConfig:
    top_p: float = 0.8
    top_k: int = 25
    win_size: int = 10
    tau_r: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.win_size < 0 or self.tau_r < 0:
            raise ValueError("win_size and tau_r must be >= 0")

    @classmethod
    def from_yaml(cls, node: Tagged | None) -> SamplingConfig:
        """Read the ``sampling: !name:...ras_sampling`` node of cosyvoice2.yaml."""
        if node is None:
            return cls()
        if not isinstance(node, Tagged) or not node.target.endswith("ras_sampling"):
            target = node.target if isinstance(node, Tagged) else node
            raise ValueError(f"llm.sampling must name ras_sampling, got {target!r}")
        default = cls()
        return cls(top_p=float(node.get("top_p", default.top_p)),
                   top_k=int(node.get("top_k", default.top_k)),
                   win_size=int(node.get("win_size", default.win_size)),
                   tau_r=float(node.get("tau_r", default.tau_r)))


def nucleus(probs: torch.Tensor, top_p: float, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate probabilities and ids of the nucleus, most likely first.

    A token is kept while the mass of the tokens before it is still below ``top_p`` (so the
    token that crosses ``top_p`` is included) and fewer than ``top_k`` are kept. Ties keep the
    lower id first (stable sort), so the set is deterministic.
    """
    # Only the top_k most likely can be kept, so only they are sorted (a stable sort of all
    # 6564 ids took ~330 us a draw, this ~40 us): every id at least as likely as the k-th
    # largest probability, in id order, then stably by probability. That is the head of the
    # full stable sort, ties at the cut included; the prefix sums of that head are the same.
    k = min(top_k, probs.numel())
    threshold = torch.topk(probs, k, sorted=False).values.min()
    ids = (probs >= threshold).nonzero().squeeze(1)
    order = probs[ids].sort(descending=True, stable=True).indices[:k]
    top_probs, top_ids = probs[ids[order]], ids[order]
    mass_before = top_probs.cumsum(0) - top_probs
    keep = max(int((mass_before < top_p).sum()), 1)
    return top_probs[:keep], top_ids[:keep]


class RasSampler:
    """Repetition-aware nucleus sampler with its own random generator (one per request).

    ``stop_start`` is the first non-speech id (the LM's ``speech_token_size``): with
    ``ignore_eos`` every id >= it is refused. The reference redraws until it gets a speech token;
    we redraw the same way up to ``max_redraws`` times and then draw once more with the stop ids
    masked out, so a model that insists on stopping cannot loop forever.
    """

    def __init__(self, config: SamplingConfig, stop_start: int,
                 generator: torch.Generator | None = None, max_redraws: int = 100) -> None:
        self.config = config
        self.stop_start = stop_start
        # Draws happen on the CPU so a seed gives the same tokens on any device.
        self.generator = generator if generator is not None else torch.Generator()
        if self.generator.device.type != "cpu":
            raise ValueError("RasSampler needs a CPU torch.Generator")
        self.max_redraws = max_redraws

    @classmethod
    def seeded(cls, config: SamplingConfig, stop_start: int, seed: int) -> RasSampler:
        generator = torch.Generator()
        generator.manual_seed(seed)
        return cls(config, stop_start, generator)

    def _draw(self, probs: torch.Tensor) -> int:
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def sample(self, probs: torch.Tensor, decoded: list[int],
               candidates: tuple[torch.Tensor, torch.Tensor] | None = None) -> int:
        """One repetition-aware draw from probabilities ``probs`` (1-D, CPU float);
        ``candidates``: their :func:`nucleus`, when the caller has it already."""
        cfg = self.config
        candidate_probs, candidate_ids = candidates if candidates is not None \
            else nucleus(probs, cfg.top_p, cfg.top_k)
        token = int(candidate_ids[self._draw(candidate_probs)])
        window = decoded[-cfg.win_size:] if cfg.win_size > 0 else []
        if window.count(token) >= cfg.win_size * cfg.tau_r:
            token = self._draw(probs)  # too repetitive: fall back to the full distribution
        return token

    def __call__(self, logp: torch.Tensor, decoded: list[int], ignore_eos: bool) -> int:
        probs = logp.detach().float().cpu().softmax(dim=-1)
        if not torch.isfinite(probs).all():
            raise ValueError("the LM produced non-finite log-probabilities")
        candidates = nucleus(probs, self.config.top_p, self.config.top_k)  # once for redraws
        token = self.sample(probs, decoded, candidates)
        if not ignore_eos:
            return token
        for _ in range(self.max_redraws):
            if token < self.stop_start:
                return token
            token = self.sample(probs, decoded, candidates)
        if token < self.stop_start:
            return token
        masked = probs.clone()
        masked[self.stop_start:] = 0.0
        total = float(masked.sum())
        if total <= 0.0:
            raise ValueError("no speech token has non-zero probability while stop ids are refused")
        return self.sample(masked / total, decoded)
