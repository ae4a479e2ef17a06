"""CosyVoice 3 causal HiFT vocoder against the reference vectors (hift, hift_fixed_noise).

Stage by stage from the recorded inputs (f0 from the mel, source from f0, waveform from mel and
source), end to end from the mel, with finalize true and false. This implementation follows the
reference's operation order (float64 f0 predictor, float32 phase arithmetic), and every tensor
matched bit for bit when written; the tolerances leave room only for the thread-count effects the
README measured (conv_post_out 7e-7, wav 2.4e-7; f0 and source did not move).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from tests.cv3_acoustic import checkpoint, parity_hift, parity_yaml
from tests.cv3_parity import metadata, parity_dir, vectors
from tts_core.cosyvoice2.hyperyaml import Tagged
from tts_core.cosyvoice3.hift import (
    SINE_NOISE_ROWS,
    CausalHiFTConfig,
    CausalHiFTGenerator,
    build_hift,
    official_initial_phases,
    sine_noise_table,
)

F0_ATOL = 1e-6  # Hz; README suggests 1e-3
SOURCE_ATOL = 1e-6  # README suggests 1e-4
POST_ATOL = 1e-5  # log-magnitude / phase pre-activation of order 1-10
WAV_ATOL = 1e-5  # README suggests 1e-4 per stage


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


@pytest.fixture(scope="module", autouse=True)
def _threads() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def yaml_hift() -> Tagged:
    return parity_yaml()["hift"]


@pytest.fixture(scope="module")
def hift() -> CausalHiFTGenerator:
    return parity_hift()


@pytest.fixture(scope="module")
def unfolded() -> CausalHiFTGenerator:
    return parity_hift(fold=False)


@pytest.fixture(scope="module")
def vec() -> dict[str, torch.Tensor]:
    return vectors("hift")


# --- configuration, layout, fixed tables ------------------------------------------------------


def test_config_is_read_from_the_yaml(yaml_hift: Tagged) -> None:
    meta = metadata("hift")
    state = checkpoint("hift")
    config = CausalHiFTConfig.from_yaml(yaml_hift)
    assert config.base_channels == state["conv_pre.bias"].shape[0]
    assert config.conv_pre_look_right == int(meta["conv_pre_look_right"])
    assert config.conv_pre_look_right + 1 == \
        state["conv_pre.parametrizations.weight.original1"].shape[2]
    assert state["f0_predictor.condnet.0.parametrizations.weight.original1"].shape[2] == \
        int(meta["f0_look_right"]) + 1
    assert config.f0_cond_channels == state["f0_predictor.condnet.0.bias"].shape[0]
    assert config.upsample_factor == int(meta["upsample_scale"])
    assert (config.istft_n_fft, config.istft_hop_len) == (int(meta["n_fft"]), int(meta["hop_len"]))
    assert config.audio_limit == float(meta["audio_limit"])


def test_state_dict_layout_equals_checkpoint(unfolded: CausalHiFTGenerator) -> None:
    state = checkpoint("hift")
    own = unfolded.state_dict()
    assert {k: tuple(v.shape) for k, v in own.items()} == {k: tuple(v.shape)
                                                           for k, v in state.items()}
    # the f0 predictor is held in float64; its values are the checkpoint's
    assert all(torch.equal(own[k].to(v.dtype), v) for k, v in state.items())
    assert unfolded.f0_predictor.classifier.weight.dtype == torch.float64


def test_official_size_keys_and_shapes() -> None:
    full = json.loads((parity_dir() / "full_size_state_dict_keys.json").read_text())["hift"]
    with torch.device("meta"):
        model = CausalHiFTGenerator(CausalHiFTConfig())
    own = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert own == full["keys"]
    assert sum(v.numel() for v in model.state_dict().values()) == full["num_elements"]


def test_fixed_noise_tables_are_the_official_ones() -> None:
    noise, meta = vectors("hift_fixed_noise"), metadata("hift_fixed_noise")
    before = torch.get_rng_state()
    assert torch.equal(official_initial_phases(), noise["rand_ini"])
    head = noise["sine_noise_head"]
    tail_start = int(meta["tail_start"])
    tail = noise["sine_noise_tail"]
    rows = sine_noise_table().rows(tail_start + tail.shape[1], torch.device("cpu"))
    assert torch.equal(rows[:, :head.shape[1]], head)
    assert torch.equal(rows[:, tail_start:], tail)
    assert torch.equal(torch.get_rng_state(), before), "the global RNG was used"
    assert int(meta["full_shape_sine_waves"].strip("[]").split(",")[1]) == SINE_NOISE_ROWS


def test_noise_table_limit_is_explicit() -> None:
    with pytest.raises(ValueError, match="fixed excitation noise covers"):
        sine_noise_table().rows(SINE_NOISE_ROWS + 1, torch.device("cpu"))


# --- vectors/hift.safetensors, stage by stage -------------------------------------------------


@pytest.mark.parametrize("finalize", [True, False])
def test_f0_in_float64_from_recorded_mel(hift: CausalHiFTGenerator, vec: dict[str, torch.Tensor],
                                         finalize: bool) -> None:
    prefix = "" if finalize else "nf_"
    with torch.inference_mode():
        f0_64 = hift.f0_predictor(vec["mel"].double(), finalize)
        f0 = hift.predict_f0(vec["mel"], finalize)
    assert f0_64.dtype == torch.float64 and f0.dtype == torch.float32
    assert max_abs(f0_64, vec[f"{prefix}f0_float64"]) <= F0_ATOL
    assert max_abs(f0, vec[f"{prefix}f0"]) <= F0_ATOL
    print(f"{prefix}f0 max abs err {max_abs(f0_64, vec[f'{prefix}f0_float64']):.2e} Hz")


@pytest.mark.parametrize("prefix", ["", "nf_"])
def test_source_from_recorded_f0(hift: CausalHiFTGenerator, vec: dict[str, torch.Tensor],
                                 prefix: str) -> None:
    f0 = vec[f"{prefix}f0"]
    with torch.inference_mode():
        source, uv = hift.source_from_f0(f0)
    up = hift.config.upsample_factor
    assert torch.equal(uv[0, ::up, 0], (f0[0] > hift.config.nsf_voiced_threshold).float())
    assert max_abs(source, vec[f"{prefix}source"]) <= SOURCE_ATOL
    # both voiced and unvoiced frames are exercised by this set
    assert 0 < uv.mean().item() < 1
    print(f"{prefix}source max abs err {max_abs(source, vec[f'{prefix}source']):.2e}")


def test_decoder_from_recorded_mel_and_source(hift: CausalHiFTGenerator,
                                              vec: dict[str, torch.Tensor]) -> None:
    with torch.inference_mode():
        post = hift.spectrum(vec["mel"], vec["source"])
        wav = hift.decode(vec["mel"], vec["source"])
    assert max_abs(post, vec["conv_post_out"]) <= POST_ATOL
    assert max_abs(wav, vec["wav"]) <= WAV_ATOL
    print(f"conv_post_out {max_abs(post, vec['conv_post_out']):.2e}, "
          f"wav {max_abs(wav, vec['wav']):.2e}")


def test_non_final_decoder_from_recorded_mel_and_source(hift: CausalHiFTGenerator,
                                                        vec: dict[str, torch.Tensor]) -> None:
    look = int(metadata("hift")["f0_look_right"])
    with torch.inference_mode():
        wav = hift.decode(vec["mel"][:, :, :-look], vec["nf_source"], finalize=False)
    assert max_abs(wav, vec["nf_wav"]) <= WAV_ATOL


@pytest.mark.parametrize("finalize", [True, False])
def test_inference_end_to_end_from_mel(hift: CausalHiFTGenerator, vec: dict[str, torch.Tensor],
                                       finalize: bool) -> None:
    prefix = "" if finalize else "nf_"
    wav, source = hift.inference(vec["mel"], finalize=finalize)
    frames, up = vec["mel"].shape[2], hift.config.upsample_factor
    kept = frames if finalize else frames - hift.config.look_right - 1
    assert wav.shape == vec[f"{prefix}wav"].shape == (1, kept * up)
    assert max_abs(source, vec[f"{prefix}source"]) <= SOURCE_ATOL
    assert max_abs(wav, vec[f"{prefix}wav"]) <= WAV_ATOL
    print(f"{prefix}inference: source {max_abs(source, vec[f'{prefix}source']):.2e}, "
          f"wav {max_abs(wav, vec[f'{prefix}wav']):.2e}")


def test_non_final_output_is_a_prefix_of_the_final_one(hift: CausalHiFTGenerator,
                                                       vec: dict[str, torch.Tensor]) -> None:
    """Causality: vocoding a prefix of the mel (with right context) gives the samples that the
    whole mel gives there, so a stream can re-vocode and cut."""
    full, full_source = hift.inference(vec["mel"])
    cut = vec["mel"].shape[2] // 2
    part, part_source = hift.inference(vec["mel"][:, :, :cut], finalize=False)
    assert torch.equal(part_source, full_source[:, :, :part_source.shape[2]])
    assert max_abs(part, full[:, :part.shape[1]]) <= WAV_ATOL


# --- weights --------------------------------------------------------------------------------


def test_folded_weight_norm_gives_the_same_output(hift: CausalHiFTGenerator,
                                                  unfolded: CausalHiFTGenerator,
                                                  vec: dict[str, torch.Tensor]) -> None:
    keys = hift.state_dict().keys()
    assert not any("parametrizations" in k for k in keys) and "conv_pre.weight" in keys
    expected_wav, expected_source = unfolded.inference(vec["mel"])
    wav, source = hift.inference(vec["mel"])
    assert torch.equal(source, expected_source)
    assert max_abs(wav, expected_wav) <= 1e-6


def _old_spelling(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.replace(".parametrizations.weight.original0", ".weight_g")
            .replace(".parametrizations.weight.original1", ".weight_v"): v
            for k, v in state.items()}


def test_old_weight_norm_spelling_and_generator_prefix_load(yaml_hift: Tagged,
                                                            unfolded: CausalHiFTGenerator,
                                                            vec: dict[str, torch.Tensor]) -> None:
    state = checkpoint("hift")
    old = {f"generator.{k}": v for k, v in _old_spelling(state).items()}
    model = build_hift(yaml_hift, old)
    own = model.state_dict()
    assert all(torch.equal(own[k].to(v.dtype), v) for k, v in state.items())
    expected, _ = unfolded.inference(vec["mel"])
    assert torch.equal(model.inference(vec["mel"])[0], expected)


@pytest.mark.parametrize("change", ["missing", "unexpected", "shape"])
def test_bad_checkpoint_is_refused_naming_the_key(yaml_hift: Tagged, change: str) -> None:
    state = checkpoint("hift")
    if change == "missing":
        name = "f0_predictor.classifier.bias"
        del state[name]
    elif change == "unexpected":
        name = "conv_extra.weight"
        state[name] = torch.zeros(1)
    else:
        name = "source_downs.0.bias"
        state[name] = torch.zeros(state[name].shape[0] + 1)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        build_hift(yaml_hift, state)


def test_f0_predictor_stays_float64_when_the_vocoder_changes_dtype(
        hift: CausalHiFTGenerator, vec: dict[str, torch.Tensor]) -> None:
    model = copy.deepcopy(hift).to(torch.bfloat16)
    assert model.conv_pre.weight.dtype == torch.bfloat16
    assert model.f0_predictor.classifier.weight.dtype == torch.float64
    with torch.inference_mode():
        f0 = model.predict_f0(vec["mel"].bfloat16())
    assert f0.dtype == torch.bfloat16
    wav, _ = model.inference(vec["mel"].bfloat16())
    assert wav.dtype == torch.float32 and torch.isfinite(wav).all()


def test_bad_inputs_are_refused(hift: CausalHiFTGenerator) -> None:
    with pytest.raises(ValueError, match="mel must be"):
        hift.inference(torch.zeros(1, hift.config.in_channels + 1, 10))
    with pytest.raises(ValueError, match="non-final call needs more than"):
        hift.inference(torch.zeros(1, hift.config.in_channels, hift.config.look_right + 1),
                       finalize=False)


def test_unsupported_yaml_targets_are_refused(yaml_hift: Tagged) -> None:
    from dataclasses import replace

    with pytest.raises(ValueError, match="not supported"):
        CausalHiFTConfig.from_yaml(replace(yaml_hift,
                                           target="cosyvoice.hifigan.generator.HiFTGenerator"))
    with pytest.raises(ValueError, match="unknown parameter"):
        CausalHiFTConfig.from_yaml(replace(yaml_hift, args={**yaml_hift.args, "bogus": 1}))
    predictor = replace(yaml_hift.args["f0_predictor"], target="f0_predictor.ConvRNNF0Predictor")
    with pytest.raises(ValueError, match="not supported"):
        CausalHiFTConfig.from_yaml(replace(yaml_hift, args={**yaml_hift.args,
                                                            "f0_predictor": predictor}))
