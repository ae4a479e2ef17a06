"""Decode steps of the int8-weight Qwen2 stack on one native call per layer
(tts_core/cosyvoice2/native_decode.py, ``tts_int8_decoder_layer`` in int8_matvec.c): against the
PyTorch path on the same int8 weights, step after step, for requests of different cache
lengths decoding together; the keys and values it caches; where it applies and where not."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tts_core.batching import lm_batch
from tts_core.batching.lm_batch import packed_forward
from tts_core.cosyvoice2.int8_matvec import native_kernel
from tts_core.cosyvoice2.native_decode import native_decoder
from tts_core.cosyvoice2.qwen2 import Qwen2Config, Qwen2Model
from tts_core.cosyvoice2.testing.make_model_dir import randomize
from tts_core.cosyvoice2.weight_quant import NATIVE_ROWS, fuse_and_quantize

ROOT = Path(__file__).resolve().parents[1]
needs_kernel = pytest.mark.skipif(native_kernel() is None, reason="the native int8 kernel does "
                                  "not run here (no AVX-512 VNNI or no C compiler)")
# Per-row relative difference to the PyTorch path allowed on a step's hidden state. Both paths
# quantise each row's activations to int16 before every product, so a float32 rounding
# difference upstream can move an activation by one int16 step (1/16383 of the row's peak);
# measured here: at most ~2e-4. A wrong rotation, cache slot or softmax is off by 0.1 or more.
TOLERANCE = 2e-3


def _backbone(seed: int = 0) -> Qwen2Model:
    cfg = Qwen2Config(vocab_size=64, hidden_size=128, intermediate_size=224,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=32)
    model = Qwen2Model(cfg).eval()
    randomize(model, torch.Generator().manual_seed(seed))
    fuse_and_quantize(model.layers)
    return model


def _without_native(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lm_batch, "native_decoder", lambda backbone, rows: None)


def _relative(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).norm(dim=-1) / b.norm(dim=-1)


@needs_kernel
def test_decode_steps_match_the_pytorch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three requests with caches of 5, 17 and 60 positions decode eight steps together
    (teacher forced: the same input rows on both sides; the third cache outgrows its first
    64 positions on the way, so its storage moves); every step's hidden states and every
    cached key and value stay within the tolerance of the PyTorch path's."""
    backbone = _backbone()
    assert native_decoder(backbone, 3) is not None
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randn(n, 128, generator=g) for n in (5, 17, 60)]
    steps = [torch.randn(3, 1, 128, generator=g) for _ in range(8)]

    def run() -> tuple[list[torch.Tensor], list]:
        caches = [backbone.new_cache() for _ in prompts]
        with torch.inference_mode(), monkeypatch.context() as patch:
            _without_native(patch)  # the prompts on the PyTorch path on both sides
            packed_forward(backbone, prompts, caches)
        with torch.inference_mode():
            outs = [packed_forward(backbone, list(rows), caches) for rows in steps]
        return outs, caches

    native, native_caches = run()
    with monkeypatch.context() as patch:
        _without_native(patch)
        plain, plain_caches = run()
    worst = max(float(_relative(a, b).max()) for a, b in zip(native, plain, strict=True))
    print(f"worst per-row relative difference over 8 steps: {worst:.2e}")
    assert worst < TOLERANCE
    for mine, theirs in zip(native_caches, plain_caches, strict=True):
        assert len(mine) == len(theirs)
        for layer in range(3):
            for a, b in ((mine._keys[layer], theirs._keys[layer]),
                         (mine._values[layer], theirs._values[layer])):
                a, b = a[:, :, :len(mine)], b[:, :, :len(theirs)]
                assert float(_relative(a, b).max()) < TOLERANCE


@needs_kernel
def test_a_request_decodes_the_same_alone_and_in_a_batch() -> None:
    """Every native operation works row by row, so a request's numbers in a batch are its
    numbers alone, bit for bit."""
    backbone = _backbone(seed=2)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randn(n, 128, generator=g) for n in (9, 30)]
    rows = [torch.randn(1, 128, generator=g) for _ in prompts]
    with torch.inference_mode():
        caches = [backbone.new_cache() for _ in prompts]
        packed_forward(backbone, prompts, caches)
        alone = [c.clone() for c in caches]
        together = packed_forward(backbone, rows, caches)
        for i, cache in enumerate(alone):
            assert torch.equal(packed_forward(backbone, [rows[i]], [cache])[0], together[i])


@needs_kernel
def test_applies_only_to_int8_decode_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    backbone = _backbone()
    assert native_decoder(backbone, NATIVE_ROWS) is not None
    assert native_decoder(backbone, NATIVE_ROWS + 1) is None  # the packed bfloat16 copy's turn
    assert native_decoder(backbone, 0) is None
    plain = Qwen2Model(backbone.config).eval()  # float32 Linear layers
    assert native_decoder(plain, 1) is None
    calls = []
    forward = type(native_decoder(backbone, 1)).forward

    def counted(self: object, *args: object) -> torch.Tensor:
        calls.append(1)
        return forward(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(type(native_decoder(backbone, 1)), "forward", counted)
    with torch.inference_mode():
        caches = [backbone.new_cache()]
        packed_forward(backbone, [torch.randn(6, 128)], caches)  # a prompt: PyTorch's path
        assert not calls
        packed_forward(backbone, [torch.randn(1, 128)], caches)
        assert len(calls) == 1
        backbone(torch.randn(1, 1, 128), caches[0])  # one request's step (CosyVoice2LM.step)
        assert len(calls) == 2
        backbone(torch.randn(1, 2, 128), caches[0])
        assert len(calls) == 2


def test_switch_turns_it_off() -> None:
    code = ("from tts_core.cosyvoice2.native_decode import native_decoder; "
            "import tests.test_native_decode as t; print(native_decoder(t._backbone(), 1))")
    env = {**os.environ, "TTS_NATIVE_INT8": "0", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=120, cwd=ROOT)
    assert out.stdout.strip() == "None"
