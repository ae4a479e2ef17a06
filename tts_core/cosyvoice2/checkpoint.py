"""Strict state-dict loading whose error names every key that does not fit.

``nn.Module.load_state_dict(strict=True)`` stops at the first shape mismatch with a long
traceback; an operator with the wrong model directory needs the whole picture in one sentence.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

_SHOWN = 6  # keys listed per kind of problem; the rest are counted


def describe_mismatch(file: str, own: Mapping[str, torch.Tensor],
                      state: Mapping[str, torch.Tensor]) -> str | None:
    """None when ``state`` fits ``own`` exactly, else a message naming the missing, unexpected
    and mis-shaped keys."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
                    for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if not (missing or unexpected or shapes):
        return None
    parts = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("mis-shaped keys", shapes)):
        if items:
            more = f", ... ({len(items)} in all)" if len(items) > _SHOWN else ""
            parts.append(f"{title}: {', '.join(items[:_SHOWN])}{more}")
    return (f"{file} does not fit the model its configuration describes — "
            + "; ".join(parts))


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], file: str,
                error: type[Exception] = ValueError) -> None:
    """``module.load_state_dict(state, strict=True)``, raising ``error`` with
    :func:`describe_mismatch`'s message when the keys or shapes differ."""
    problem = describe_mismatch(file, module.state_dict(), state)
    if problem:
        raise error(problem)
    module.load_state_dict(state, strict=True)
