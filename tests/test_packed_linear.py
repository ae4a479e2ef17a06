"""Linear layers on pre-packed weights (tts_core/cosyvoice2/packed_linear.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tts_core.cosyvoice2 import packed_linear


def _layer(dtype: torch.dtype) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(256, 384).to(dtype)


@pytest.mark.parametrize("rows", [1, 26, 52, 300])
def test_bfloat16_matches_plain_linear(rows: int) -> None:
    layer = _layer(torch.bfloat16)
    x = torch.randn(2, rows, 256).to(torch.bfloat16)
    expected = layer(x).float()
    got = packed_linear.module_linear(layer, x)
    assert got.dtype == torch.bfloat16 and got.shape == (2, rows, 384)
    # the same product, accumulated in float32 either way: at most a bfloat16 rounding apart
    assert torch.allclose(got.float(), expected, rtol=2 ** -7, atol=2 ** -7)


def test_bfloat16_weights_are_packed_where_onednn_has_bfloat16() -> None:
    weight = _layer(torch.bfloat16).weight
    assert packed_linear.prepare(weight).is_mkldnn == packed_linear.packs(weight)


def test_float32_stays_on_the_exact_path() -> None:
    layer = _layer(torch.float32)
    assert not packed_linear.packs(layer.weight)
    x = torch.randn(3, 256)
    assert torch.equal(packed_linear.module_linear(layer, x), layer(x))


def test_a_changed_weight_is_prepared_again() -> None:
    layer = _layer(torch.bfloat16)
    x = torch.randn(4, 256).to(torch.bfloat16)
    before = packed_linear.module_linear(layer, x)
    with torch.no_grad():
        layer.weight.mul_(2)  # in place: a new version of the same storage
    after = packed_linear.module_linear(layer, x)
    assert torch.allclose(after.float(), layer(x).float(), rtol=2 ** -7, atol=2 ** -7)
    assert not torch.allclose(after.float(), before.float())
