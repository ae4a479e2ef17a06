"""The CosyVoice 2 parity directory, shared by the ``test_cv2_*_parity.py`` files.

The directory is ``$COSYVOICE2_PARITY_DIR`` or, by default, ``<repo>/../shared/parity/cosyvoice2``
(layout: see the README there). Any directory in that layout must work — other sets differ in
model sizes, seeds and lengths — so tests take every size and length from the models loaded here,
the vectors' tensors and their metadata, never from this particular set.

* A missing default directory skips the tests (a checkout without the shared material); a
  directory named in the environment that is missing or incomplete fails them, because then the
  caller asked for a check that cannot run.
* :func:`parity_models` loads the directory through our model-directory loader, the same route
  the engine takes, once per test session (per ``fold_hift`` setting). The returned modules are
  shared between test files: tests must not modify them (copy first).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tts_core.cosyvoice2.model_dir import CosyVoice2Models, load_model_dir

ENV_VAR = "COSYVOICE2_PARITY_DIR"
DEFAULT_PARITY_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "parity" / "cosyvoice2"

VECTOR_NAMES = (
    "frontend_mel80", "frontend_whisper_mel128", "llm_teacher_forced",
    "llm_bistream_teacher_forced", "flow_nonstream", "flow_stream", "hift",
    "token2wav_nonstream", "token2wav_stream",
)
REQUIRED_FILES = (
    "cosyvoice2.yaml", "llm.pt", "flow.pt", "hift.pt", "CosyVoice-BlankEN/config.json",
    "full_size_state_dict_keys.json",
    *(f"vectors/{name}.safetensors" for name in VECTOR_NAMES),
)


def parity_dir() -> Path:
    """The parity directory; skips (default location absent) or fails (env var set, incomplete)."""
    return find_parity_dir(ENV_VAR, DEFAULT_PARITY_DIR, REQUIRED_FILES)


def find_parity_dir(env_var: str, default: Path, required: tuple[str, ...]) -> Path:
    """``$env_var`` or ``default``, holding every file of ``required``; skips (default location
    absent) or fails (env var set, incomplete). Shared with the CosyVoice 3 parity helpers."""
    env = os.environ.get(env_var)
    path = Path(env) if env else default
    missing = [name for name in required if not (path / name).is_file()]
    if not missing:
        return path
    if env:
        shown = ", ".join(missing[:6]) + (f", ... ({len(missing)} in all)" if len(missing) > 6
                                          else "")
        pytest.fail(f"{env_var}={env} is not a complete parity directory; it lacks {shown}",
                    pytrace=False)
    pytest.skip(f"parity data not found at {path} (set {env_var} to use another directory)")


@functools.cache
def _load(path: Path, fold_hift: bool) -> CosyVoice2Models:
    return load_model_dir(path, require_frontend=False, fold_hift=fold_hift)


def parity_models(fold_hift: bool = True) -> CosyVoice2Models:
    """The directory's LM, flow and HiFT as ``load_model_dir`` builds them (CPU, float32).

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


def reference_stream_schedule(prompt_len: int, n_tokens: int, hop: int, max_hop: int,
                              scale: int, lookahead: int) -> list[tuple[int, int, bool, bool]]:
    """The reference streaming driver's flow calls, recomputed from the README's rule.

    Returns (token_len, token_offset, streaming, finalize) per call: pad = ceil(P/hop)·hop − P;
    while N − offset >= h + lookahead (h = hop + pad on the first chunk, hop afterwards) call on
    tokens[:offset + h + lookahead] streaming, not finalizing; offset += h;
    hop = min(max_hop, scale·hop). Finally one call on all N tokens, full attention, finalize.
    """
    pad = -(-prompt_len // hop) * hop - prompt_len
    calls, offset, first = [], 0, True
    while True:
        step = hop + pad if first else hop
        if n_tokens - offset < step + lookahead:
            break
        calls.append((offset + step + lookahead, offset, True, False))
        offset += step
        hop = min(max_hop, scale * hop)
        first = False
    calls.append((n_tokens, offset, False, True))
    return calls


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """CUDA float32 matmuls and cuDNN convolutions in TF32 (a 10-bit mantissa) or not, for the
    block; torch's defaults are TF32 off for matmuls, on for convolutions."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
