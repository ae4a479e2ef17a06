"""The CosyVoice 3 parity directory, shared by the ``test_cv3_*_parity.py`` files.

The directory is ``$COSYVOICE3_PARITY_DIR`` or, by default, ``<repo>/../shared/parity/cosyvoice3``
(layout: see the README there). Tests take every size and length from the loaded models and the
vectors (other sets differ in sizes, seeds and lengths). A missing default directory skips the
tests; a directory named in the environment that is missing or incomplete fails them.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from tests.cv2_parity import find_parity_dir

ENV_VAR = "COSYVOICE3_PARITY_DIR"
DEFAULT_PARITY_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "parity" / "cosyvoice3"

VECTOR_NAMES = (
    "frontend_mel80", "llm_teacher_forced", "llm_teacher_forced_crosslingual",
    "llm_bistream_teacher_forced", "llm_bistream_no_prompt_speech", "flow_nonstream",
    "flow_stream", "hift", "hift_fixed_noise", "token2wav_nonstream", "token2wav_stream",
)
REQUIRED_FILES = (
    "cosyvoice3.yaml", "llm.pt", "flow.pt", "hift.pt", "CosyVoice-BlankEN/config.json",
    "full_size_state_dict_keys.json",
    *(f"vectors/{name}.safetensors" for name in VECTOR_NAMES),
)


def parity_dir() -> Path:
    """The parity directory; skips (default location absent) or fails (env var set, incomplete)."""
    return find_parity_dir(ENV_VAR, DEFAULT_PARITY_DIR, REQUIRED_FILES)


@functools.cache
def _load(path: Path, fold_hift: bool):  # -> CosyVoice3Models
    from tts_core.cosyvoice3.model_dir import load_model_dir

    return load_model_dir(path, require_frontend=False, fold_hift=fold_hift)


def parity_models(fold_hift: bool = True):  # -> CosyVoice3Models
    """The directory's LM, flow and HiFT as ``load_model_dir`` builds them (CPU, float32), once
    per session and ``fold_hift`` setting. Shared between test files: do not modify (copy first).

    ``fold_hift=True`` is the engine's setting (weight norm folded into plain weights);
    ``False`` keeps the checkpoint's parametrisation and key names.
    """
    return _load(parity_dir(), fold_hift)


def vector_path(name: str) -> Path:
    return parity_dir() / "vectors" / f"{name}.safetensors"


def vectors(name: str) -> dict[str, torch.Tensor]:
    """All tensors of ``vectors/<name>.safetensors`` (a fresh dict on every call)."""
    from safetensors.torch import load_file

    return load_file(str(vector_path(name)))


def metadata(name: str) -> dict[str, str]:
    """The string metadata in the header of ``vectors/<name>.safetensors``."""
    from safetensors import safe_open

    with safe_open(str(vector_path(name)), "pt") as handle:
        return dict(handle.metadata() or {})
