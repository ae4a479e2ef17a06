"""HiFT vocoder against the reference vectors (vectors/hift.safetensors) and hift.pt's layout.

The numbers are checked on the vocoder the model-directory loader builds for the engine (weight
norm folded); the layout tests use the loader's unfolded one (the checkpoint's parametrisation)
or build the module themselves (both weight-norm spellings, damaged checkpoints).
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.cv2_parity import metadata, parity_dir, parity_models, vectors
from tts_core.cosyvoice2 import hyperyaml
from tts_core.cosyvoice2.hift import HiFTConfig, HiFTGenerator, build_hift, normalize_state_dict

# README "Reproduction tolerance": stage by stage fed the recorded tensors, and end to end.
F0_RTOL = 1e-5
STAGE_ATOL = 1e-4
E2E_ATOL = 5e-2
E2E_RMS = 1e-2


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


@pytest.fixture(scope="module", autouse=True)
def _threads() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def yaml_hift():
    return hyperyaml.load(parity_dir() / "cosyvoice2.yaml")["hift"]


@pytest.fixture(scope="module")
def checkpoint() -> dict[str, torch.Tensor]:
    return torch.load(parity_dir() / "hift.pt", weights_only=True, map_location="cpu")


@pytest.fixture(scope="module")
def hift() -> HiFTGenerator:
    """The engine's vocoder: loaded by the model-directory loader, weight norm folded (shared)."""
    return parity_models().hift


@pytest.fixture(scope="module")
def unfolded() -> HiFTGenerator:
    """The loader's vocoder with the checkpoint's weight-norm parametrisation kept (shared)."""
    return parity_models(fold_hift=False).hift


@pytest.fixture(scope="module")
def vec() -> dict[str, torch.Tensor]:
    return vectors("hift")


def test_config_is_read_from_the_yaml(yaml_hift, checkpoint) -> None:
    meta = metadata("hift")
    config = HiFTConfig.from_yaml(yaml_hift)
    assert config.base_channels == checkpoint["conv_pre.bias"].shape[0]
    assert config.f0_cond_channels == checkpoint["f0_predictor.condnet.0.bias"].shape[0]
    assert config.nb_harmonics + 1 == checkpoint["m_source.l_linear.weight"].shape[1]
    assert config.upsample_factor == int(meta["upsample_scale"])
    assert (config.istft_n_fft, config.istft_hop_len) == (int(meta["n_fft"]),
                                                          int(meta["hop_len"]))
    assert config.audio_limit == float(meta["audio_limit"])


def test_state_dict_layout_equals_checkpoint(unfolded, checkpoint) -> None:
    own = {k: tuple(v.shape) for k, v in unfolded.state_dict().items()}
    assert own == {k: tuple(v.shape) for k, v in checkpoint.items()}
    assert all(torch.equal(unfolded.state_dict()[k], v) for k, v in checkpoint.items())


def test_default_config_has_the_official_full_size_layout() -> None:
    full = json.loads((parity_dir() / "full_size_state_dict_keys.json").read_text())["hift"]
    with torch.device("meta"):
        model = HiFTGenerator(HiFTConfig())
    own = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert own == full["keys"]
    assert sum(v.numel() for v in model.state_dict().values()) == full["num_elements"]


def test_f0_from_recorded_mel(hift, vec) -> None:
    with torch.inference_mode():
        f0 = hift.predict_f0(vec["mel"])
    torch.testing.assert_close(f0, vec["f0"], rtol=F0_RTOL, atol=1e-6)
    print(f"f0 max abs err {max_abs(f0, vec['f0']):.2e} Hz")


def test_source_from_recorded_f0(hift, vec) -> None:
    with torch.inference_mode():
        source, uv = hift.source_from_f0(vec["f0"], deterministic=True)
    assert torch.equal(uv, vec["uv"])
    assert max_abs(source, vec["source"]) <= STAGE_ATOL
    print(f"source max abs err {max_abs(source, vec['source']):.2e}")


def test_decoder_from_recorded_mel_and_source(hift, vec) -> None:
    with torch.inference_mode():
        post = hift.spectrum(vec["mel"], vec["source"])
        wav = hift.decode(vec["mel"], vec["source"])
    # conv_post_out is a log-magnitude / phase pre-activation of order 1-10
    assert max_abs(post, vec["conv_post_out"]) <= 1e-3
    assert max_abs(wav, vec["wav"]) <= STAGE_ATOL
    print(f"conv_post_out {max_abs(post, vec['conv_post_out']):.2e}, "
          f"wav {max_abs(wav, vec['wav']):.2e}")


def test_inference_end_to_end_from_mel(hift, vec) -> None:
    wav, source = hift.inference(vec["mel"], deterministic=True)
    assert wav.shape == vec["wav"].shape == (1, vec["mel"].shape[2] * hift.config.upsample_factor)
    assert max_abs(source, vec["source"]) <= E2E_ATOL
    assert max_abs(wav, vec["wav"]) <= E2E_ATOL
    assert (wav - vec["wav"]).pow(2).mean().sqrt().item() <= E2E_RMS
    print(f"inference: source {max_abs(source, vec['source']):.2e}, "
          f"wav {max_abs(wav, vec['wav']):.2e}")


def _old_spelling(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        key = key.replace(".parametrizations.weight.original0", ".weight_g")
        key = key.replace(".parametrizations.weight.original1", ".weight_v")
        out[key] = value
    return out


def test_old_weight_norm_spelling_loads_to_the_same_model(yaml_hift, checkpoint, unfolded,
                                                          vec) -> None:
    old = _old_spelling(checkpoint)
    assert any(k.endswith(".weight_g") for k in old) and not any("parametrizations" in k
                                                                  for k in old)
    assert normalize_state_dict(old).keys() == checkpoint.keys()
    via_ours = build_hift(yaml_hift, old)
    via_torch = HiFTGenerator(HiFTConfig.from_yaml(yaml_hift)).eval()
    via_torch.load_state_dict(old, strict=True)  # torch maps weight_g/_v itself as well
    expected, _ = unfolded.inference(vec["mel"], deterministic=True)
    for model in (via_ours, via_torch):
        for key, value in model.state_dict().items():
            assert torch.equal(value, checkpoint[key]), key
        wav, _ = model.inference(vec["mel"], deterministic=True)
        assert torch.equal(wav, expected)


def test_checkpoint_with_generator_prefix_loads(yaml_hift, checkpoint) -> None:
    model = build_hift(yaml_hift, {f"generator.{k}": v for k, v in checkpoint.items()})
    assert torch.equal(model.conv_pre.bias, checkpoint["conv_pre.bias"])


@pytest.mark.parametrize("route", ["loader", "build_hift"])
def test_folded_weight_norm_gives_the_same_output(yaml_hift, checkpoint, hift, unfolded, vec,
                                                  route) -> None:
    folded = hift if route == "loader" else build_hift(yaml_hift, checkpoint, fold=True)
    keys = folded.state_dict().keys()
    assert not any("parametrizations" in k for k in keys) and "conv_pre.weight" in keys
    expected_wav, expected_source = unfolded.inference(vec["mel"], deterministic=True)
    wav, source = folded.inference(vec["mel"], deterministic=True)
    assert torch.equal(source, expected_source)
    assert max_abs(wav, expected_wav) <= 1e-6
    print(f"folded vs unfolded wav {max_abs(wav, expected_wav):.2e}")


@pytest.mark.parametrize("change", ["missing", "unexpected", "shape"])
def test_bad_checkpoint_is_refused_naming_the_key(yaml_hift, checkpoint, change) -> None:
    state = dict(checkpoint)
    if change == "missing":
        del state["conv_post.bias"]
        name = "conv_post.bias"
    elif change == "unexpected":
        state["conv_extra.weight"] = torch.zeros(1)
        name = "conv_extra.weight"
    else:
        name = "ups.0.bias"
        state[name] = torch.zeros(state[name].shape[0] + 1)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        build_hift(yaml_hift, state)


def test_cache_source_overwrites_the_start_of_the_excitation(hift, vec) -> None:
    mel = vec["mel"]
    up = hift.config.upsample_factor
    n = min(8, mel.shape[2] // 2) * up  # the streaming driver caches 8 frames' worth
    _, plain = hift.inference(mel, deterministic=True)
    cache = torch.linspace(-0.5, 0.5, n).reshape(1, 1, -1)
    wav, source = hift.inference(mel, cache, deterministic=True)
    assert torch.equal(source[:, :, :n], cache)
    assert torch.equal(source[:, :, n:], plain[:, :, n:])
    assert wav.shape == (1, mel.shape[2] * up)
    with pytest.raises(ValueError, match="cache_source"):
        hift.inference(mel[:, :, :n // up - 1], cache, deterministic=True)


def test_random_excitation_follows_the_generator(hift, vec) -> None:
    mel = vec["mel"]
    before = torch.random.get_rng_state()
    runs = [hift.inference(mel, generator=torch.Generator().manual_seed(seed))
            for seed in (7, 7, 8)]
    assert torch.equal(torch.random.get_rng_state(), before), "global RNG was used"
    (wav_a, src_a), (wav_b, src_b), (wav_c, src_c) = runs
    assert torch.equal(wav_a, wav_b) and torch.equal(src_a, src_b)
    assert not torch.equal(src_a, src_c)
    zero_wav, zero_src = hift.inference(mel, deterministic=True)
    # noise std is 0.003 (voiced) / 0.033 (unvoiced) before the merge: small but present
    diff = (src_a - zero_src).abs().max().item()
    assert 1e-4 < diff < 0.5
    assert wav_a.abs().max().item() <= 0.99 and torch.isfinite(wav_a).all()


def test_wrong_mel_shape_is_refused(hift) -> None:
    with pytest.raises(ValueError, match="mel must be"):
        hift.inference(torch.zeros(1, hift.config.in_channels + 1, 10))
    with pytest.raises(ValueError, match="mel must be"):
        hift.inference(torch.zeros(80, 10))


def test_unsupported_yaml_targets_are_refused(yaml_hift) -> None:
    from dataclasses import replace

    with pytest.raises(ValueError, match="not supported"):
        HiFTConfig.from_yaml(replace(yaml_hift, target="cosyvoice.hifigan.generator.CausalHiFT"))
    with pytest.raises(ValueError, match="unknown parameter"):
        HiFTConfig.from_yaml(replace(yaml_hift, args={**yaml_hift.args, "bogus": 1}))
