"""CosyVoice 3 model-directory loader and random-directory generator.

The loader reads ``cosyvoice3.yaml`` as data and the checkpoints with ``weights_only=True`` and
strict key checks; a directory that does not fit must be refused with a message that names the
file and the key. The generator writes a complete directory (tiny here) that the loader accepts,
and its full preset has exactly the reference's full-size keys and shapes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tts_core.cosyvoice2.model_dir import MissingModelFile, ModelDirError
from tts_core.cosyvoice3.llm import CosyVoice3LM
from tts_core.cosyvoice3.model_dir import load_model_dir
from tts_core.cosyvoice3.testing.make_model_dir import PRESETS, build_modules
from tts_core.cosyvoice3.tokenizer import CosyVoice3Tokenizer
from tts_core.registry import detect_engine

PARITY = Path(__file__).resolve().parents[1].parent / "shared" / "parity" / "cosyvoice3"


@pytest.fixture(scope="session")
def cv3_tiny_dir(cv3_model_dir: Path) -> Path:
    """The session's tiny CosyVoice 3 directory (conftest: made with make_model_dir)."""
    return cv3_model_dir


@pytest.fixture
def broken_dir(cv3_tiny_dir: Path, tmp_path: Path) -> Path:
    """A copy of the tiny directory a test may damage."""
    return Path(shutil.copytree(cv3_tiny_dir, tmp_path / "model"))


def test_generated_directory_loads_with_its_front_end(cv3_tiny_dir: Path) -> None:
    names = {p.name for p in cv3_tiny_dir.iterdir()}
    assert {"cosyvoice3.yaml", "llm.pt", "flow.pt", "hift.pt", "campplus.onnx",
            "speech_tokenizer_v3.onnx", "CosyVoice-BlankEN", "spk2info.pt"} <= names
    models = load_model_dir(cv3_tiny_dir)
    assert isinstance(models.lm, CosyVoice3LM)
    assert isinstance(models.tokenizer, CosyVoice3Tokenizer)
    # The LM's <|endofprompt|> is the tokenizer's (a small vocabulary puts it below 151646).
    assert models.lm.config.end_of_prompt_id == models.tokenizer.token_to_id("<|endofprompt|>")
    assert models.mel_config.fmax is None  # 12 kHz: the CosyVoice 3 front end
    assert models.sample_rate == 24000 and models.token_mel_ratio == 2
    assert set(models.spk2info) == {"中文女", "英文男"}
    assert not any(m.training for m in (models.lm, models.flow, models.hift))


def test_parity_directory_loads_without_front_end() -> None:
    if not (PARITY / "cosyvoice3.yaml").is_file():
        pytest.skip("parity data not found")
    models = load_model_dir(PARITY, require_frontend=False)
    assert models.tokenizer is None and models.onnx is None
    assert models.lm.config.end_of_prompt_id == 151646
    with pytest.raises(MissingModelFile, match="speech_tokenizer_v3.onnx|campplus.onnx"):
        load_model_dir(PARITY)


def test_full_preset_has_the_reference_keys_and_shapes() -> None:
    if not (PARITY / "full_size_state_dict_keys.json").is_file():
        pytest.skip("parity data not found")
    full = json.loads((PARITY / "full_size_state_dict_keys.json").read_text())
    with torch.device("meta"):
        lm, flow, hift = build_modules(PRESETS["full"])
    for name, module in (("llm", lm), ("flow", flow), ("hift", hift)):
        ours = {k: list(t.shape) for k, t in module.state_dict().items()}
        assert ours == full[name]["keys"], name


@pytest.mark.parametrize("file, damage, key", [
    ("llm.pt", "missing", "llm_decoder.weight"),
    ("llm.pt", "unexpected", "llm_embedding.weight"),  # a CosyVoice 2 table
    ("flow.pt", "shape", "input_embedding.weight"),
    ("hift.pt", "missing", "conv_post.bias"),
])
def test_checkpoint_mismatch_names_file_and_key(broken_dir: Path, file: str, damage: str,
                                                key: str) -> None:
    state = torch.load(broken_dir / file, weights_only=True)
    if damage == "missing":
        del state[key]
    elif damage == "unexpected":
        state[key] = torch.zeros(2, 4)
    else:
        state[key] = state[key][:-1]
    torch.save(state, broken_dir / file)
    with pytest.raises(ModelDirError) as caught:
        load_model_dir(broken_dir)
    message = str(caught.value)
    assert file in message and key in message
    assert {"missing": "missing keys", "unexpected": "unexpected keys",
            "shape": "mis-shaped keys"}[damage] in message


def test_pickled_code_is_refused(broken_dir: Path) -> None:
    torch.save({"weights": [print]}, broken_dir / "llm.pt")  # not loadable weights-only
    with pytest.raises(ModelDirError, match="llm.pt"):
        load_model_dir(broken_dir)


@pytest.mark.parametrize("name, what", [
    ("cosyvoice3.yaml", "cosyvoice3.yaml"), ("flow.pt", "flow.pt"),
    ("speech_tokenizer_v3.onnx", "speech tokenizer"),
    ("CosyVoice-BlankEN/config.json", "config.json"),
])
def test_missing_file_is_named(broken_dir: Path, name: str, what: str) -> None:
    (broken_dir / name).unlink()
    with pytest.raises(MissingModelFile, match=what) as caught:
        load_model_dir(broken_dir)
    assert "Fun-CosyVoice3" in str(caught.value)


def test_cosyvoice2_yaml_is_refused(broken_dir: Path) -> None:
    text = (broken_dir / "cosyvoice3.yaml").read_text()
    (broken_dir / "cosyvoice3.yaml").write_text(
        text.replace("cosyvoice.llm.llm.CosyVoice3LM", "cosyvoice.llm.llm.Qwen2LM"))
    with pytest.raises(ModelDirError, match="CosyVoice3LM"):
        load_model_dir(broken_dir)


def test_yaml_inconsistency_is_refused(broken_dir: Path) -> None:
    text = (broken_dir / "cosyvoice3.yaml").read_text()
    (broken_dir / "cosyvoice3.yaml").write_text(text.replace("num_mels: 80", "num_mels: 64"))
    with pytest.raises(ModelDirError, match="mel bins differ"):
        load_model_dir(broken_dir)


def test_auto_engine_detection(cv3_tiny_dir: Path, tmp_path: Path) -> None:
    assert detect_engine(cv3_tiny_dir) == "cosyvoice3"
    cv2 = tmp_path / "cv2"
    cv2.mkdir()
    (cv2 / "cosyvoice2.yaml").write_text("sample_rate: 24000\n")
    assert detect_engine(cv2) == "cosyvoice2"
    with pytest.raises(ValueError, match="neither cosyvoice3.yaml"):
        detect_engine(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        detect_engine(tmp_path / "nowhere")
