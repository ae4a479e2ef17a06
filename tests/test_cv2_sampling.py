"""Repetition-aware sampling: the nucleus rule, the repetition fallback, stop-id refusal, seeds."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from tts_core.cosyvoice2.hyperyaml import Tagged
from tts_core.cosyvoice2.sampling import RasSampler, SamplingConfig, nucleus

CFG = SamplingConfig(top_p=0.8, top_k=25, win_size=10, tau_r=0.1)


def logp_of(probs: list[float] | torch.Tensor) -> torch.Tensor:
    p = torch.as_tensor(probs, dtype=torch.float64)
    return (p / p.sum()).log().float()


def sampler(seed: int = 0, config: SamplingConfig = CFG, stop_start: int = 10_000) -> RasSampler:
    return RasSampler.seeded(config, stop_start, seed)


def nucleus_by_loop(probs: torch.Tensor, top_p: float, top_k: int) -> list[int]:
    """The rule spelled out one token at a time (independent of the vectorised version)."""
    order = sorted(range(len(probs)), key=lambda i: (-float(probs[i]), i))
    kept, mass = [], 0.0
    for i in order:
        if mass < top_p and len(kept) < top_k:
            kept.append(i)
            mass += float(probs[i])
        else:
            break
    return kept


def test_nucleus_matches_the_rule_on_random_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        temperature = [0.3, 1.0, 3.0][trial % 3]
        probs = (torch.randn(300, generator=g, dtype=torch.float64) * temperature).softmax(0)
        _, got = nucleus(probs, 0.8, 25)
        assert got.tolist() == nucleus_by_loop(probs, 0.8, 25)


def test_nucleus_includes_the_token_that_crosses_top_p() -> None:
    probs = torch.tensor([0.05, 0.5, 0.2, 0.25], dtype=torch.float64)
    _, got = nucleus(probs, 0.8, 25)
    assert got.tolist() == [1, 3, 2]  # 0.5 + 0.25 < 0.8, so 0.2 joins; 0.05 does not


def test_nucleus_capped_at_top_k_and_ties_keep_low_ids() -> None:
    probs = torch.full((500,), 1 / 500, dtype=torch.float64)
    _, got = nucleus(probs, 0.8, 25)
    assert got.tolist() == list(range(25))


def test_draws_stay_in_nucleus_and_follow_its_probabilities() -> None:
    g = torch.Generator().manual_seed(1)
    probs = (torch.randn(200, generator=g) * 1.5).softmax(0)
    lp = probs.log()
    candidates = nucleus_by_loop(probs, 0.8, 25)
    s = sampler(seed=2)
    n = 4000
    counts = Counter(s(lp, [], False) for _ in range(n))
    assert set(counts) <= set(candidates)
    kept = probs[candidates]
    expected = kept / kept.sum()
    for token, p in zip(candidates, expected.tolist(), strict=True):
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(counts[token] - n * p) < 5 * sigma + 1, (token, counts[token], n * p)


def peaked(vocab: int = 100, top: float = 0.85) -> torch.Tensor:
    """Token 0 holds `top` (alone in the nucleus); the rest is spread evenly."""
    rest = (1 - top) / (vocab - 1)
    return logp_of([top] + [rest] * (vocab - 1))


def test_repetition_falls_back_to_full_distribution() -> None:
    lp = peaked()
    s = sampler(seed=3)
    n = 4000
    # No repetition: the nucleus is {0}, so 0 every time.
    assert {s(lp, [5, 6, 7], False) for _ in range(500)} == {0}
    # 0 already in the window: every draw is redone on the full distribution, so about 15 % of
    # the results are other tokens.
    others = sum(s(lp, [3, 0, 4], False) != 0 for _ in range(n))
    expected, sigma = n * 0.15, math.sqrt(n * 0.15 * 0.85)
    assert abs(others - expected) < 5 * sigma


def test_repetition_only_counts_the_window() -> None:
    lp = peaked()
    s = sampler(seed=4)
    decoded = [0] + list(range(1, 11))  # 0 is 11 tokens back, outside a window of 10
    assert {s(lp, decoded, False) for _ in range(500)} == {0}


def test_repetition_threshold_is_win_size_times_tau_r() -> None:
    lp = peaked()
    s = sampler(seed=5, config=SamplingConfig(top_p=0.8, top_k=25, win_size=10, tau_r=0.3))
    twice = [0, 9, 0, 8]
    assert {s(lp, twice, False) for _ in range(500)} == {0}  # 2 < 3: no fallback
    thrice = [0, 9, 0, 8, 0]
    assert any(s(lp, thrice, False) != 0 for _ in range(500))  # 3 >= 3: fallback


def test_ignore_eos_never_returns_stop_ids() -> None:
    vocab, stop = 40, 37
    probs = [0.3 / stop] * stop + [0.5, 0.1, 0.1]  # stop ids hold 70 %
    lp = logp_of(probs)
    s = sampler(seed=6, stop_start=stop)
    allowed = [s(lp, [], True) for _ in range(2000)]
    assert max(allowed) < stop
    free = [s(lp, [], False) for _ in range(2000)]
    assert sum(t >= stop for t in free) > 1000  # without the flag the stop ids dominate
    assert len(probs) == vocab


def test_ignore_eos_is_bounded_when_the_model_insists_on_stopping() -> None:
    stop = 20
    probs = torch.full((23,), 1e-12, dtype=torch.float64)
    probs[stop:] = 1.0
    s = RasSampler(CFG, stop, torch.Generator().manual_seed(7), max_redraws=5)
    tokens = {s(logp_of(probs), [], True) for _ in range(50)}
    assert tokens and max(tokens) < stop


def test_ignore_eos_with_no_speech_mass_is_an_error() -> None:
    stop = 5
    lp = torch.full((8,), -math.inf)
    lp[stop:] = math.log(1 / 3)
    s = RasSampler(CFG, stop, torch.Generator().manual_seed(8), max_redraws=3)
    with pytest.raises(ValueError, match="no speech token"):
        s(lp, [], True)


def test_non_finite_logp_is_an_error() -> None:
    lp = torch.zeros(10)
    lp[3] = math.nan
    with pytest.raises(ValueError, match="non-finite"):
        sampler()(lp, [], False)


def test_seeds_make_runs_reproducible() -> None:
    lp = logp_of(torch.ones(300, dtype=torch.float64))  # flat: 25 candidates

    def run(seed: int) -> list[int]:
        s, decoded = sampler(seed), []
        for _ in range(60):
            decoded.append(s(lp, decoded, False))
        return decoded

    assert run(11) == run(11)
    assert run(11) != run(12)


def test_config_from_yaml_and_validation() -> None:
    node = Tagged("name", "cosyvoice.utils.common.ras_sampling",
                  {"top_p": 0.7, "top_k": 10, "win_size": 5, "tau_r": 0.2})
    assert SamplingConfig.from_yaml(node) == SamplingConfig(0.7, 10, 5, 0.2)
    assert SamplingConfig.from_yaml(None) == SamplingConfig()
    with pytest.raises(ValueError, match="ras_sampling"):
        SamplingConfig.from_yaml(Tagged("name", "cosyvoice.utils.common.nucleus_sampling", {}))
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        SamplingConfig(top_k=0)


def test_nucleus_is_the_head_of_a_full_stable_sort() -> None:
    """Only the top_k are sorted; the result is what sorting every id stably gives (ties at
    the cut and around it included), as are the prefix sums that decide the cut."""
    g = torch.Generator().manual_seed(1)
    for trial in range(300):
        probs = (torch.randn(6564, generator=g) * [0.3, 1.0, 3.0][trial % 3]).softmax(0)
        if trial % 4 == 0:  # ties: several ids share the 25th value and its neighbours
            top = probs.topk(40).indices
            probs[top[20:35]] = float(probs[top[22]])
            probs = probs / probs.sum()
        full_probs, full_ids = probs.sort(descending=True, stable=True)
        mass_before = full_probs.cumsum(0) - full_probs
        keep = max(int((mass_before[:25] < 0.8).sum()), 1)
        got_probs, got_ids = nucleus(probs, 0.8, 25)
        assert torch.equal(got_ids, full_ids[:keep]) and torch.equal(got_probs, full_probs[:keep])
