"""Precision options, the LM prefix KV cache and the LM/vocoder pipeline of the CosyVoice 2 engine.

* Every precision option resolves, loads and runs (tiny generated directory); what a device
  cannot run is refused with a message that names the alternatives.
* The reduced-precision plans stay within the README's tolerances against the reference's
  float32 vectors of the parity set (LM under teacher forcing, flow mel).
* The prefix cache and the pipeline change nothing: outputs are compared with ``torch.equal`` /
  ``np.array_equal`` against the uncached and sequential paths in float32.
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.cv2_parity import parity_dir, vectors
from tts_core.cosyvoice2 import precision as precision_module
from tts_core.cosyvoice2.engine import CosyVoice2Engine
from tts_core.cosyvoice2.int8_matvec import native_kernel
from tts_core.cosyvoice2.llm import CosyVoice2LM, DecodeStep, PrefixCache
from tts_core.cosyvoice2.model_dir import load_model_dir
from tts_core.cosyvoice2.packed_linear import PackedLinear, packs_bfloat16
from tts_core.cosyvoice2.precision import PRECISIONS, cpu_bf16_support, resolve_precision
from tts_core.cosyvoice2.qwen2 import Qwen2Config, Qwen2Model
from tts_core.cosyvoice2.testing.make_model_dir import make_model_dir
from tts_core.cosyvoice2.weight_quant import (
    ATTENTION_LINEARS,
    GEMM_ROWS,
    MLP_LINEARS,
    NATIVE_ROWS,
    PACKED_ROWS,
    WeightOnlyLinear,
    fuse_and_quantize,
)
from tts_core.engine import Audio, Mode, SynthesisRequest

PROMPT_TEXT = "希望你以后能够做的比我还好呦。"

# Tolerances against float32 (README, "Precision"), LM under teacher forcing: the total
# variation distance between the next-token distributions (the sampler draws from them: with the
# same random numbers, the two pick the same token with probability >= 1 - TV at every step),
# plus bounds on the log-prob error over the reference's top-25 candidates (the ids the sampler
# can draw) and on top-1 agreement, loose because random weights give near-flat distributions
# whose top ids are close to ties. Flow: mel relative L1.
LM_TV_MAX = 0.1
LM_LOGP_TOL = 0.5
LM_TOP1_MIN = 0.8
FLOW_MEL_REL_L1_TOL = 0.02
TOP_CANDIDATES = 25

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("cv2-precision") / "tiny", "tiny", seed=21)


def collect(engine: CosyVoice2Engine, request: SynthesisRequest) -> list[np.ndarray]:
    return list(engine.synthesize(request, threading.Event()))


# --- resolving the option ---------------------------------------------------------------------


def test_float32_is_exact_and_auto_stays_within_tolerance_on_cpu() -> None:
    plan = resolve_precision("float32", "cpu")
    assert plan.exact and plan.lm_dtype == plan.flow_dtype == torch.float32
    # int8 exceeded the LM tolerance on the full-size directory: never the default; weight-only
    # int8 stayed within it and decodes fastest, with or without AMX (whose bf16 flow it takes)
    auto = resolve_precision("auto", "cpu")
    amx = cpu_bf16_support() == "amx"
    assert auto.name == "int8w" and auto.lm_weight_int8 and not auto.lm_int8 and not auto.exact
    assert auto.flow_dtype == (torch.bfloat16 if amx else torch.float32)
    assert resolve_precision("int8", "cpu").lm_int8
    int8w = resolve_precision("int8w", "cpu")
    assert int8w.lm_weight_int8 and not int8w.lm_int8 and int8w.lm_dtype == torch.float32
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        resolve_precision("fp8", "cpu")
    with pytest.raises(ValueError, match="needs CUDA"):
        resolve_precision("float16", "cpu")
    for name in ("int8", "int8w"):
        with pytest.raises(ValueError, match="CPU only"):
            resolve_precision(name, "cuda")


@pytest.mark.parametrize("flags, support", [
    ({"avx2"}, "none"), ({"avx512f", "avx512_bf16"}, "avx512"), ({"amx_tile", "amx_bf16"}, "amx")])
def test_bf16_detection_and_fallback(monkeypatch: pytest.MonkeyPatch, flags: set[str],
                                     support: str) -> None:
    monkeypatch.setattr(precision_module, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert cpu_bf16_support() == support
    int8 = resolve_precision("int8", "cpu")
    # The flow goes bfloat16 only where bf16 matmul is fast (AMX); else it stays float32.
    assert int8.flow_dtype == (torch.bfloat16 if support == "amx" else torch.float32)
    if support == "none":
        with pytest.raises(ValueError, match="avx512_bf16 or AMX"):
            resolve_precision("bfloat16", "cpu")
    else:
        assert resolve_precision("bfloat16", "cpu").lm_dtype == torch.bfloat16


# --- weight-only quantised Linear -------------------------------------------------------------


_GEMM_DTYPES = [torch.float32] + ([torch.bfloat16] if cpu_bf16_support() == "amx" else [])


@pytest.mark.parametrize("gemm_dtype", _GEMM_DTYPES)
@pytest.mark.parametrize("bits, group, bound", [(8, 0, 0.012), (4, 32, 0.1), (4, 128, 0.12)])
def test_weight_only_linear_tracks_the_float_layer(bits: int, group: int, bound: float,
                                                   gemm_dtype: torch.dtype) -> None:
    """Relative error against the float32 layer within what the rounding step allows (int8 per
    channel: max|w|/127 steps, about 0.8 % for Gaussian weights; int4 per group: about 8 %),
    in the decode path (few rows) and the prefill path (a GEMM on widened weights, float32 or,
    on CPUs with AMX, bfloat16, whose rounding of inputs and outputs adds about 0.3 %)."""
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(256, 96)
    with torch.no_grad():
        linear.weight.normal_(0, 0.02, generator=g)
        linear.bias.normal_(0, 0.02, generator=g)
    quant = WeightOnlyLinear.from_linear(linear, bits, group, gemm_dtype=gemm_dtype)
    for rows in (1, 3, GEMM_ROWS + 5):
        x = torch.randn(2, rows, 256, generator=g)
        with torch.inference_mode():
            ref, out = linear(x), quant(x)
        assert out.shape == ref.shape and out.dtype == torch.float32
        relative = float((out - ref).norm() / ref.norm())
        assert 0 < relative < bound, (rows, relative)
    with pytest.raises(ValueError, match="group size"):
        WeightOnlyLinear.from_linear(linear, 4, 48)
    with pytest.raises(ValueError, match="weight bits"):
        WeightOnlyLinear.from_linear(linear, 2)


def test_fused_projections_compute_what_separate_layers_do() -> None:
    """q/k/v and gate/up fused into one int8 layer each (the int8w plan) give the outputs of the
    same layers quantised one by one: per-output-channel scales make the fused rows the same
    rows. Decode rows go through the int8 kernel, a prefill through the widened GEMM; the only
    allowed difference is the GEMM's blocking over a wider output."""
    cfg = Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    torch.manual_seed(5)
    separate = Qwen2Model(cfg).eval()
    for module in separate.modules():
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            torch.nn.init.normal_(module.bias, 0, 0.1)
    fused = copy.deepcopy(separate)
    for layer in separate.layers:
        for name in ATTENTION_LINEARS + MLP_LINEARS:
            parent_name, _, child = name.rpartition(".")
            parent = layer.get_submodule(parent_name)
            setattr(parent, child, WeightOnlyLinear.from_linear(getattr(parent, child), 8))
    fuse_and_quantize(fused.layers)
    attn = fused.layers[0].self_attn
    assert attn.qkv_proj is not None and not hasattr(attn, "q_proj")
    assert fused.layers[0].mlp.gate_up_proj is not None
    for module in fused.modules():  # the int8 arithmetic alone (packed copies: test below)
        if isinstance(module, WeightOnlyLinear):
            module.prefill = None
    caches = separate.new_cache(), fused.new_cache()
    with torch.inference_mode():
        for rows in (GEMM_ROWS + 8, 1, 1):  # a prefill, then two decode steps
            x = torch.randn(1, rows, cfg.hidden_size)
            want, got = separate(x, caches[0]), fused(x, caches[1])
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
            assert not torch.equal(want, torch.zeros_like(want))


def test_many_rows_take_the_packed_bfloat16_copy() -> None:
    """Where oneDNN has bfloat16, an int8 layer also keeps a packed bfloat16 copy for calls of
    more than PACKED_ROWS rows (prefills, large decode batches); fewer rows take an int8
    kernel (the native one up to NATIVE_ROWS where it runs). Each approximates the float32
    layer to well within 1 %."""
    torch.manual_seed(6)
    layer = torch.nn.Linear(128, 96)
    if not packs_bfloat16(layer.weight.device):
        pytest.skip("oneDNN has no bfloat16 kernels on this CPU")
    quantized = WeightOnlyLinear.from_linear(layer, 8)
    hybrid = copy.deepcopy(quantized)
    packed = PackedLinear(layer, torch.bfloat16)
    hybrid.prefill, hybrid.prefill_rows = packed, PACKED_ROWS
    with torch.inference_mode():
        native = native_kernel() is not None
        for rows in (1, PACKED_ROWS, PACKED_ROWS + 1, NATIVE_ROWS + 1, 40):
            x = torch.randn(rows, 128)
            got = hybrid(x)
            assert got.dtype == x.dtype
            int8_rows = NATIVE_ROWS if native else PACKED_ROWS
            path = packed if rows > int8_rows else quantized
            assert torch.equal(got, path(x)), rows
            exact = layer(x)
            relative = (got - exact).norm() / exact.norm()
            assert relative < 0.01, (rows, relative)


# --- every CPU option loads and runs ----------------------------------------------------------


def _cpu_options() -> list[str]:
    runnable = []
    for name in PRECISIONS:
        try:
            resolve_precision(name, "cpu")
        except ValueError:
            continue
        runnable.append(name)
    return runnable


@pytest.mark.parametrize("name", _cpu_options())
def test_precision_options_load_and_run(tiny_dir: Path, prompt: Audio, name: str) -> None:
    engine = CosyVoice2Engine.from_model_dir(tiny_dir, threads=1, device="cpu", precision=name,
                                             seed=3)
    plan = engine.models.precision
    assert plan is not None and plan.name == (resolve_precision(name, "cpu").name)
    linears = [m for m in engine.models.lm.llm.model.model.layers.modules()
               if "Linear" in type(m).__name__]
    assert linears
    if plan.lm_int8:
        assert all(type(m).__module__.startswith("torch.ao.nn.quantized") for m in linears)
    elif plan.lm_weight_int8:
        quantized = [m for m in linears if type(m) is not PackedLinear]
        assert all(type(m) is WeightOnlyLinear and m.bits == 8 for m in quantized)
        # with a packed bfloat16 copy each for many rows where oneDNN has bfloat16
        bf16 = packs_bfloat16(torch.device("cpu"))
        assert all((type(m.prefill) is PackedLinear) == bf16 for m in quantized)
    elif plan.lm_dtype == torch.bfloat16 and packs_bfloat16(torch.device("cpu")):
        assert all(type(m) is PackedLinear for m in linears)
    else:
        assert all(type(m) is torch.nn.Linear for m in linears)
    assert next(engine.models.flow.parameters()).dtype == plan.flow_dtype
    for stream in (True, False):
        chunks = collect(engine, SynthesisRequest(Mode.ZERO_SHOT, text="今天天气很好。",
                                                  prompt=prompt, prompt_text=PROMPT_TEXT,
                                                  stream=stream))
        audio = np.concatenate(chunks)
        assert audio.size > 0 and np.isfinite(audio).all() and np.abs(audio).max() <= 1.0


def test_old_dtype_spelling_still_works(tiny_dir: Path) -> None:
    engine = CosyVoice2Engine.from_model_dir(tiny_dir, threads=1, device="cpu", dtype="float32")
    assert engine.models.precision is not None and engine.models.precision.exact
    with pytest.raises(ValueError, match="contradicts"):
        CosyVoice2Engine.from_model_dir(tiny_dir, threads=1, device="cpu", dtype="float32",
                                        precision="int8")


# --- error against float32 on the parity set -------------------------------------------------


class Replay:
    def __init__(self, tokens: list[int], eos: int) -> None:
        self.tokens, self.eos = tokens, eos

    def __call__(self, logp: torch.Tensor, decoded: list[int], ignore_eos: bool) -> int:
        return self.tokens[len(decoded)] if len(decoded) < len(self.tokens) else self.eos


def lm_errors(lm: CosyVoice2LM) -> tuple[float, float, float]:
    """(max |log-prob error| over the reference's top-25 of each step, top-1 agreement, max
    total variation distance of a step's distribution)."""
    v = vectors("llm_teacher_forced")
    forced = v["forced_speech_token"].reshape(-1).tolist()
    steps: list[DecodeStep] = []
    list(lm.inference(v["text"].reshape(-1).tolist(), v["prompt_text"].reshape(-1).tolist(),
                      v["prompt_speech_token"].reshape(-1).tolist(),
                      Replay(forced, lm.config.eos_token), on_step=steps.append))
    ours, ref = torch.stack([s.logp for s in steps]), v["logp"]
    top = ref.topk(TOP_CANDIDATES, dim=-1).indices
    error = float((ours.gather(1, top) - ref.gather(1, top)).abs().max())
    agreement = float((ours.argmax(-1) == ref.argmax(-1)).float().mean())
    tv = float((ours.exp() - ref.exp()).abs().sum(-1).max() / 2)
    return error, agreement, tv


def _plans_to_check() -> list[str]:
    return [name for name in ("int8", "int8w", "bfloat16") if name in _cpu_options()]


@pytest.mark.parametrize("name", _plans_to_check())
def test_reduced_precision_lm_within_tolerance(name: str) -> None:
    models = load_model_dir(parity_dir(), require_frontend=False, precision=name)
    error, agreement, tv = lm_errors(models.lm)
    print(f"{name}: LM max |dlogp| (top-{TOP_CANDIDATES}) {error:.4f}, top-1 {agreement:.3f}, "
          f"max TV {tv:.4f}")
    assert tv <= LM_TV_MAX
    assert error <= LM_LOGP_TOL
    assert agreement >= LM_TOP1_MIN


@pytest.mark.skipif(cpu_bf16_support() == "none", reason="this CPU has no bfloat16 support")
def test_bfloat16_flow_within_tolerance() -> None:
    models = load_model_dir(parity_dir(), require_frontend=False, precision="bfloat16")
    v = vectors("flow_nonstream")
    with torch.inference_mode():
        mel = models.flow.inference(v["token"], v["prompt_token"], v["prompt_feat"],
                                    v["embedding"], streaming=False, finalize=True)
    relative = float((mel.float() - v["mel"]).abs().sum() / v["mel"].abs().sum())
    print(f"bfloat16: flow mel relative L1 {relative:.4f}")
    assert relative <= FLOW_MEL_REL_L1_TOL


# --- the prefix cache changes nothing ---------------------------------------------------------


def test_prefix_cache_is_bit_identical_to_the_uncached_path() -> None:
    models = load_model_dir(parity_dir(), require_frontend=False)  # float32, own copy
    lm = models.lm
    v = vectors("llm_teacher_forced")
    text, prompt_text = v["text"].reshape(-1).tolist(), v["prompt_text"].reshape(-1).tolist()
    speech = v["prompt_speech_token"].reshape(-1).tolist()
    forced = v["forced_speech_token"].reshape(-1).tolist()

    def run(cache: PrefixCache) -> tuple[list[int], list[DecodeStep]]:
        steps: list[DecodeStep] = []
        out = list(lm.inference(text, prompt_text, speech, Replay(forced, lm.config.eos_token),
                                on_step=steps.append, prefix_cache=cache))
        return out, steps

    uncached = run(PrefixCache(0))
    cache = PrefixCache(4)
    miss = run(cache)
    hit = run(cache)
    assert (cache.misses, cache.hits, len(cache)) == (1, 1, 1)
    for tokens, steps in (miss, hit):
        assert tokens == uncached[0] == forced
        assert len(steps) == len(uncached[1])
        for a, b in zip(steps, uncached[1], strict=True):
            assert torch.equal(a.logp, b.logp) and torch.equal(a.hidden, b.hidden)
            assert (a.cache_len, a.inputs.shape) == (b.cache_len, b.inputs.shape)
    # The split prefill reports the same steps as the reference's single prefill.
    assert uncached[1][0].cache_len == 0
    assert uncached[1][0].inputs.shape[1] == 2 + len(prompt_text) + len(text) + len(speech)
    # A hit hands out a copy: using it leaves the stored entry as it was.
    again = run(cache)
    assert all(torch.equal(a.logp, b.logp) for a, b in zip(again[1], uncached[1], strict=True))


def test_engine_prefix_cache_and_pipeline_change_nothing(tiny_dir: Path, prompt: Audio) -> None:
    """Registered speaker, float32: cache off / on (miss, hit) and pipeline off / on give the
    same samples, and equal the prompt-audio request the speaker was made from."""
    engines = {
        (cache, pipeline): CosyVoice2Engine.from_model_dir(
            tiny_dir, threads=1, device="cpu", precision="float32", seed=9, pipeline=pipeline,
            prefix_cache_size=cache)
        for cache in (0, 8) for pipeline in (False, True)}
    outputs = []
    for engine in engines.values():
        engine.register_speaker("eve", prompt, PROMPT_TEXT)
        for _ in range(2):
            for stream in (True, False):
                request = SynthesisRequest(Mode.ZERO_SHOT, text="今天天气很好，我们去公园散步吧。",
                                           speaker_id="eve", stream=stream)
                outputs.append((stream, np.concatenate(collect(engine, request))))
    assert engines[(8, True)].prefix_cache.hits >= 3
    assert engines[(0, True)].prefix_cache.hits == 0
    streamed = [audio for stream, audio in outputs if stream]
    whole = [audio for stream, audio in outputs if not stream]
    assert all(np.array_equal(streamed[0], a) for a in streamed[1:])
    assert all(np.array_equal(whole[0], a) for a in whole[1:])
    by_prompt = np.concatenate(collect(engines[(0, True)], SynthesisRequest(
        Mode.ZERO_SHOT, text="今天天气很好，我们去公园散步吧。", prompt=prompt,
        prompt_text=PROMPT_TEXT)))
    np.testing.assert_allclose(by_prompt, streamed[0], atol=1e-5)
    assert by_prompt.shape == streamed[0].shape


def test_pipeline_stops_when_cancelled_and_forwards_errors(tiny_dir: Path, prompt: Audio) -> None:
    engine = CosyVoice2Engine.from_model_dir(tiny_dir, threads=1, device="cpu",
                                             precision="float32", seed=4, pipeline=True)
    request = SynthesisRequest(Mode.ZERO_SHOT, text="今天天气很好，我们去公园散步吧。" * 2,
                               prompt=prompt, prompt_text=PROMPT_TEXT)
    cancel = threading.Event()
    chunks = engine.synthesize(request, cancel)
    first = next(chunks)
    cancel.set()
    assert first.size > 0
    assert len(list(chunks)) <= 1  # at most the chunk already being vocoded

    def broken_pieces():
        yield "今天天气很好，"
        raise RuntimeError("text source failed")

    with pytest.raises(RuntimeError, match="text source failed"):
        list(engine.synthesize_text_stream(request, broken_pieces(), threading.Event()))
