"""Loading CosyVoice 2 model directories: the parity set, generated ones, and broken ones."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

from tts_core.cosyvoice2.features import MelConfig
from tts_core.cosyvoice2.model_dir import MissingModelFile, ModelDirError, load_model_dir
from tts_core.cosyvoice2.onnx_frontend import (
    OnnxFrontend,
    PromptAudioError,
    PromptEncoder,
    check_audio,
    trim_silence,
)
from tts_core.cosyvoice2.testing.make_model_dir import (
    PRESETS,
    build_modules,
    make_model_dir,
    scaled,
    synthetic_voice,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PARITY_DIR = Path(os.environ.get("COSYVOICE2_PARITY_DIR", SHARED / "parity" / "cosyvoice2"))

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("cv2") / "tiny", "tiny", seed=3, spk2info=True)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for path in dst.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return dst


# ----------------------------------------------------------------------------- parity set


def test_parity_dir_loads_neural_parts_only() -> None:
    if not (PARITY_DIR / "cosyvoice2.yaml").is_file():
        pytest.skip(f"no parity directory at {PARITY_DIR}")
    models = load_model_dir(PARITY_DIR, require_frontend=False)
    assert models.tokenizer is None and models.onnx is None
    assert (models.sample_rate, models.token_frame_rate, models.token_mel_ratio) == (24000, 25, 2)
    assert models.chunk_size == 25
    assert models.sampling.top_k == 25 and models.sampling.top_p == pytest.approx(0.8)
    # Sizes come from the files: the parity set's reduced widths.
    config = json.loads((PARITY_DIR / "CosyVoice-BlankEN" / "config.json").read_text())
    assert models.lm.config.qwen.hidden_size == config["hidden_size"]
    assert models.lm.config.qwen.vocab_size == config["vocab_size"]
    # The weights are the files' (strict load), bit for bit.
    llm = torch.load(PARITY_DIR / "llm.pt", weights_only=True)
    for key in ("llm_decoder.weight", "speech_embedding.weight", "llm_embedding.weight"):
        assert torch.equal(models.lm.state_dict()[key], llm[key])
    assert not models.lm.training and not models.flow.training and not models.hift.training


def test_parity_dir_through_the_loader_reproduces_the_reference() -> None:
    """The loaded (weight-norm folded) models give the recorded LM log-probs and waveform."""
    vectors = PARITY_DIR / "vectors"
    if not (vectors / "token2wav_nonstream.safetensors").is_file():
        pytest.skip(f"no parity vectors at {vectors}")
    from safetensors.torch import load_file

    from tts_core.cosyvoice2.token2wav import Token2Wav

    models = load_model_dir(PARITY_DIR, require_frontend=False)
    vec = load_file(str(vectors / "token2wav_nonstream.safetensors"))
    wav = Token2Wav(models.flow, models.hift, deterministic=True).synthesize(
        vec["token"], vec["prompt_token"], vec["prompt_feat"], vec["embedding"])
    assert wav.shape == vec["wav"].shape
    assert float((wav - vec["wav"]).pow(2).mean().sqrt()) < 1e-2  # README's end-to-end bound

    lm_vec = load_file(str(vectors / "llm_teacher_forced.safetensors"))
    forced = lm_vec["forced_speech_token"].tolist()
    rows = []

    def teacher(logp: torch.Tensor, decoded: list[int], ignore_eos: bool) -> int:
        rows.append(logp)
        return forced[len(decoded)] if len(decoded) < len(forced) else 6561

    tokens = list(models.lm.inference(lm_vec["text"][0].tolist(),
                                      lm_vec["prompt_text"][0].tolist(),
                                      lm_vec["prompt_speech_token"][0].tolist(), teacher))
    assert tokens == forced
    torch.testing.assert_close(torch.stack(rows), lm_vec["logp"], atol=1e-4, rtol=0)


def test_unfolded_vocoder_keeps_the_checkpoint_keys(tiny_dir: Path) -> None:
    models = load_model_dir(tiny_dir, require_frontend=False, fold_hift=False)
    state = torch.load(tiny_dir / "hift.pt", weights_only=True)
    loaded = models.hift.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_parity_dir_with_frontend_names_the_missing_file(tmp_path: Path) -> None:
    if not (PARITY_DIR / "cosyvoice2.yaml").is_file():
        pytest.skip(f"no parity directory at {PARITY_DIR}")
    with pytest.raises(MissingModelFile) as info:
        load_model_dir(PARITY_DIR)
    message = str(info.value)
    assert "campplus.onnx" in message
    assert "iic/CosyVoice2-0.5B" in message and "FunAudioLLM/CosyVoice2-0.5B" in message


# ----------------------------------------------------------------------------- generated dirs


def test_generated_tiny_dir_loads_completely(tiny_dir: Path) -> None:
    names = {p.name for p in tiny_dir.iterdir()}
    assert {"cosyvoice2.yaml", "llm.pt", "flow.pt", "hift.pt", "campplus.onnx",
            "speech_tokenizer_v2.onnx", "spk2info.pt", "CosyVoice-BlankEN"} <= names
    assert {"config.json", "vocab.json", "merges.txt", "tokenizer_config.json"} <= {
        p.name for p in (tiny_dir / "CosyVoice-BlankEN").iterdir()}
    models = load_model_dir(tiny_dir)
    assert models.tokenizer is not None and models.onnx is not None
    ids = models.tokenizer.encode("你好[breath]hello")
    assert models.tokenizer.special_token_ids["[breath]"] in ids
    assert max(ids) < models.lm.config.qwen.vocab_size
    assert set(models.spk2info) == {"中文女", "英文男"}
    entry = models.spk2info["中文女"]
    assert entry["embedding"].shape == (1, 192)
    assert entry["speech_feat"].shape[1] == 2 * entry["speech_token"].shape[1]


def test_full_size_keys_and_shapes_match_the_official_checkpoints() -> None:
    reference = json.loads((PARITY_DIR / "full_size_state_dict_keys.json").read_text())
    with torch.device("meta"):
        modules = build_modules(PRESETS["full"])
    for name, module in zip(("llm", "flow", "hift"), modules, strict=True):
        keys = {k: list(v.shape) for k, v in module.state_dict().items()}
        assert keys == reference[name]["keys"], name
        assert sum(v.numel() for v in module.state_dict().values()) == \
            reference[name]["num_elements"]


def test_other_sizes_are_read_from_the_files(tmp_path: Path) -> None:
    sizes = scaled("tiny", hidden_size=48, num_heads=3, num_kv_heads=1, num_layers=1,
                   flow_width=32, estimator_channels=48, hift_channels=32, f0_channels=16)
    out = make_model_dir(tmp_path / "odd", sizes=sizes, seed=1)
    models = load_model_dir(out)
    assert models.lm.config.qwen.hidden_size == 48
    assert models.lm.config.qwen.num_hidden_layers == 1
    assert models.flow.config.input_size == 32
    assert models.hift.config.base_channels == 32


def test_onnx_stand_ins_have_the_official_interfaces(tiny_dir: Path) -> None:
    campplus = onnxruntime.InferenceSession(str(tiny_dir / "campplus.onnx"))
    (feature,) = campplus.get_inputs()
    assert feature.type == "tensor(float)" and feature.shape[2] == 80 and len(feature.shape) == 3
    out = campplus.run(None, {feature.name: np.random.randn(1, 123, 80).astype(np.float32)})[0]
    assert out.shape == (1, 192) and out.dtype == np.float32

    tokenizer = onnxruntime.InferenceSession(str(tiny_dir / "speech_tokenizer_v2.onnx"))
    feats, length = tokenizer.get_inputs()
    assert (feats.name, length.name) == ("feats", "feats_length")
    assert feats.type == "tensor(float)" and feats.shape[1] == 128
    assert length.type == "tensor(int32)"
    mel = np.random.randn(1, 128, 203).astype(np.float32)
    ids = tokenizer.run(None, {"feats": mel, "feats_length": np.array([203], np.int32)})[0]
    assert ids.shape == (1, 50)
    assert ids.min() >= 0 and ids.max() < 6561
    assert len(np.unique(ids)) > 10  # not a constant


def test_prompt_encoder_aligns_mel_and_tokens(tiny_dir: Path) -> None:
    onnx = OnnxFrontend(tiny_dir / "campplus.onnx", tiny_dir / "speech_tokenizer_v2.onnx")
    encoder = PromptEncoder(onnx, MelConfig(), token_mel_ratio=2)
    voice = synthetic_voice(2.0, 150.0, 22050, seed=2)
    features = encoder.encode(voice, 22050)
    assert features.embedding.shape == (1, 192)
    assert features.speech_tokens.dtype == torch.int32
    # 2 s at 25 tokens/s, less what trimming and the 4-frame stacking drop
    assert 45 <= features.num_tokens <= 50
    assert features.speech_feat.shape == (1, 2 * features.num_tokens, 80)
    other = encoder.encode(synthetic_voice(2.0, 300.0, 22050, seed=5), 22050)
    assert not torch.allclose(features.embedding, other.embedding)


def test_prompt_audio_checks() -> None:
    ok = synthetic_voice(1.0, 150.0, 16000, seed=0)
    assert check_audio(ok, 16000).dtype == np.float32
    with pytest.raises(PromptAudioError, match="at most 30 s"):
        check_audio(np.tile(ok, 31), 16000)
    with pytest.raises(PromptAudioError, match="at least 0.5 s"):
        check_audio(ok[:4000], 16000)
    with pytest.raises(PromptAudioError, match="mono"):
        check_audio(np.stack([ok, ok], axis=1), 16000)
    with pytest.raises(PromptAudioError, match="float"):
        check_audio((ok * 32767).astype(np.int16), 16000)
    with pytest.raises(PromptAudioError, match="silent"):
        check_audio(np.zeros(16000, np.float32), 16000)
    with pytest.raises(PromptAudioError, match="NaN"):
        check_audio(np.full(16000, np.nan, np.float32), 16000)


def test_trim_silence_keeps_speech_and_a_margin() -> None:
    voice = synthetic_voice(1.0, 150.0, 16000, seed=0)
    padded = np.concatenate([np.zeros(16000, np.float32), voice, np.zeros(8000, np.float32)])
    trimmed = trim_silence(padded, 16000)
    assert 16000 <= len(trimmed) <= 16000 + 2 * 1600 + 640
    assert np.abs(trimmed).max() == pytest.approx(np.abs(voice).max())


# ----------------------------------------------------------------------------- broken dirs


def test_missing_directory_and_files(tiny_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(MissingModelFile, match="does not exist.*iic/CosyVoice2-0.5B"):
        load_model_dir(tmp_path / "nowhere")
    for name in ("llm.pt", "flow.pt", "hift.pt", "cosyvoice2.yaml", "speech_tokenizer_v2.onnx"):
        broken = _copy(tiny_dir, tmp_path / f"no-{name}")
        (broken / name).unlink()
        with pytest.raises(MissingModelFile) as info:
            load_model_dir(broken)
        assert name in str(info.value)
        assert "FunAudioLLM/CosyVoice2-0.5B" in str(info.value)
    broken = _copy(tiny_dir, tmp_path / "no-vocab")
    (broken / "CosyVoice-BlankEN" / "vocab.json").unlink()
    with pytest.raises(MissingModelFile, match="vocab.json"):
        load_model_dir(broken)


def test_state_dict_mismatch_names_the_keys(tiny_dir: Path, tmp_path: Path) -> None:
    broken = _copy(tiny_dir, tmp_path / "mismatch")
    state = torch.load(broken / "flow.pt", weights_only=True)
    del state["encoder_proj.bias"]
    state["extra.weight"] = torch.zeros(3)
    state["spk_embed_affine_layer.weight"] = torch.zeros(80, 100)
    torch.save(state, broken / "flow.pt")
    with pytest.raises(ModelDirError) as info:
        load_model_dir(broken)
    message = str(info.value)
    assert "flow.pt" in message
    assert "missing keys: encoder_proj.bias" in message
    assert "unexpected keys: extra.weight" in message
    assert "spk_embed_affine_layer.weight (file (80, 100), model (80, 192))" in message


def test_config_and_checkpoint_sizes_must_agree(tiny_dir: Path, tmp_path: Path) -> None:
    broken = _copy(tiny_dir, tmp_path / "wrong-config")
    config_path = broken / "CosyVoice-BlankEN" / "config.json"
    config = json.loads(config_path.read_text())
    config["intermediate_size"] = 96
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelDirError, match=r"llm.pt does not fit.*mis-shaped keys: .*mlp"):
        load_model_dir(broken)


def test_old_weight_norm_spelling_loads(tiny_dir: Path, tmp_path: Path) -> None:
    renamed = _copy(tiny_dir, tmp_path / "old-hift")
    state = torch.load(renamed / "hift.pt", weights_only=True)
    old = {}
    for key, value in state.items():
        key = key.replace(".parametrizations.weight.original0", ".weight_g")
        old[key.replace(".parametrizations.weight.original1", ".weight_v")] = value
    torch.save(old, renamed / "hift.pt")
    reference = load_model_dir(tiny_dir, require_frontend=False).hift.state_dict()
    loaded = load_model_dir(renamed, require_frontend=False).hift.state_dict()
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)


@pytest.mark.parametrize("line, message", [
    ("evil: !!python/object/apply:os.system ['echo hi']\n", "not valid YAML"),
    ("evil: !include other.yaml\n", "unsupported tag !include"),
    ("evil: !ref <sample_rate>.__class__\n", "only numbers, references"),
])
def test_yaml_with_refused_constructs(tiny_dir: Path, tmp_path: Path, line: str,
                                      message: str) -> None:
    broken = _copy(tiny_dir, tmp_path / "yaml")
    path = broken / "cosyvoice2.yaml"
    path.write_text(path.read_text() + line)
    with pytest.raises(ModelDirError, match=message) as info:
        load_model_dir(broken)
    assert "cosyvoice2.yaml" in str(info.value)


def test_yaml_of_another_model_family(tiny_dir: Path, tmp_path: Path) -> None:
    broken = _copy(tiny_dir, tmp_path / "cv1")
    path = broken / "cosyvoice2.yaml"
    path.write_text(path.read_text().replace("cosyvoice.llm.llm.Qwen2LM",
                                             "cosyvoice.llm.llm.TransformerLM"))
    with pytest.raises(ModelDirError, match="Qwen2LM"):
        load_model_dir(broken)


def test_checkpoints_are_loaded_as_weights_only(tiny_dir: Path, tmp_path: Path) -> None:
    broken = _copy(tiny_dir, tmp_path / "pickle")
    # A pickle that would call a function when unpickled is refused, not run.
    torch.save({"weights": torch.zeros(1), "code": shutil.rmtree}, broken / "llm.pt")
    with pytest.raises(ModelDirError, match="weights only"):
        load_model_dir(broken)
    torch.save([torch.zeros(1)], broken / "llm.pt")
    with pytest.raises(ModelDirError, match="not a state dict"):
        load_model_dir(broken)
    (broken / "llm.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelDirError, match="cannot read llm.pt"):
        load_model_dir(broken)
