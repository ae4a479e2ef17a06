"""Builds and loads this project's C kernels (``*.c`` beside this file) on first use.

Each kernel is compiled with the system's C compiler the first time a process asks for it, into
a cache directory keyed by the source (and the headers beside it), the compiler's version, the
flags and the CPU's flags, and loaded with ctypes. A kernel is not used (the caller keeps
PyTorch's path) when its switch is set to ``0`` in the environment, the CPU lacks a flag it
needs, or there is no compiler; the log says which.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .precision import cpu_flags

log = logging.getLogger(__name__)

CACHE_ENV = "TTS_NATIVE_CACHE"  # where built kernels are kept (default ~/.cache/cosyvoice-service)


@dataclass(frozen=True)
class NativeSource:
    """One C kernel: ``name``.c beside this module, the environment switch that turns it off
    ("0"), the CPU flags (as /proc/cpuinfo names them) it needs and its compiler flags."""

    name: str
    switch: str
    needs: tuple[str, ...]
    compile_flags: tuple[str, ...]

    @property
    def source(self) -> Path:
        return Path(__file__).with_name(f"{self.name}.c")


def _cache_dirs() -> list[Path]:
    """Where to keep built kernels: TTS_NATIVE_CACHE, else the user's cache directory, then a
    temporary one (a container whose home is read-only still builds them)."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return [Path(configured)]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return [Path(base) / "cosyvoice-service",
            Path(tempfile.gettempdir()) / f"cosyvoice-service-{os.getuid()}"]


def _build(compiler: str, spec: NativeSource, target: Path) -> None:
    """Compile into a temporary file beside ``target``, then move it there in one step (so
    processes starting together never load a half-written library)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *spec.compile_flags, "-shared", "-fPIC", str(spec.source),
                        "-o", tmp], check=True, capture_output=True, text=True, timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_library(spec: NativeSource) -> ctypes.CDLL | None:
    """The built kernel, or None where it cannot run (see the module docstring)."""
    label = f"native kernel {spec.name}"
    if os.environ.get(spec.switch, "1") == "0":
        log.info("%s off (%s=0): PyTorch's path", label, spec.switch)
        return None
    flags = cpu_flags()
    missing = [f for f in spec.needs if f not in flags]
    if missing:
        log.info("%s not used: the CPU lacks %s", label, ", ".join(missing))
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        log.info("%s not used: no C compiler (cc/gcc) on PATH", label)
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
        headers = [h.read_text() for h in sorted(spec.source.parent.glob("*.h"))]
        key = hashlib.sha256("\0".join([spec.source.read_text(), *headers, version,
                                        *spec.compile_flags, *sorted(flags)]).encode()
                             ).hexdigest()[:16]
    except (OSError, subprocess.SubprocessError) as error:
        log.warning("%s not used (PyTorch's path instead): %s", label, error)
        return None
    problem: object = None
    for directory in _cache_dirs():
        target = directory / f"{spec.name}-{key}.so"
        try:
            built = not target.exists()
            if built:
                _build(compiler, spec, target)
            library = ctypes.CDLL(str(target))
            log.info("%s %s: %s", label, "built" if built else "loaded", target)
            return library
        except (OSError, subprocess.SubprocessError) as error:
            problem = getattr(error, "stderr", "") or error
    log.warning("%s not used (PyTorch's path instead): %s", label, problem)
    return None
