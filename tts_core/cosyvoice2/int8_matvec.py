"""The native weight-only int8 kernel for decode steps (``int8_matvec.c``), built on first use.

A decode step of the LM multiplies a few rows by every int8 weight of the Qwen2 stack; PyTorch's
``_weight_int8pack_mm`` widens each weight to float32 and on this project's two cores reads
them at about 14 GB/s. The C kernel rounds the activations to int16 (one scale per row) and
multiplies with AVX-512 VNNI integer dot products, reading them at about 22 GB/s (the figures
are in the README). It is compiled with the system's C compiler the first time a process asks
for it, into a cache directory keyed by the source, the compiler and the CPU's flags, and loaded
with ctypes; without a compiler, without AVX-512 VNNI, or with ``TTS_NATIVE_INT8=0`` in the
environment the layers keep PyTorch's kernel.

Accuracy: the int16 activations carry 14 bits against bfloat16's 8 (PyTorch's kernel takes
bfloat16 activations and scales), the sums are exact in int32, and scales and outputs stay
float32, so the products are closer to float32 than the fallback's.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from .precision import cpu_flags

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("int8_matvec.c")
SWITCH = "TTS_NATIVE_INT8"  # "0": PyTorch's kernel only
CACHE_ENV = "TTS_NATIVE_CACHE"  # where built kernels are kept (default ~/.cache/cosyvoice-service)
CPU_FLAGS = ("avx512f", "avx512bw", "avx512_vnni")
COMPILE_FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vnni", "-fopenmp", "-shared",
                 "-fPIC")
ROW_ALIGN = 32  # the kernel takes inputs whose width is a multiple of this
_lock = threading.Lock()


class NativeInt8Kernel:
    """The loaded library: :meth:`matmul` for shapes it takes (:meth:`takes`)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._call = library.tts_int8_matvec
        self._call.restype = ctypes.c_int
        self._call.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                               ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.c_int]
        self.max_k = int(library.tts_int8_matvec_max_k())

    def takes(self, weight: torch.Tensor) -> bool:
        """Whether an int8 weight [out, in] fits the kernel."""
        k = weight.shape[1]
        return (weight.dtype == torch.int8 and weight.device.type == "cpu"
                and weight.is_contiguous() and k % ROW_ALIGN == 0 and k <= self.max_k)

    def matmul(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ (weight * scale[:, None]).T + bias`` in float32: x [rows, in] (any float
        dtype), weight int8 [out, in] (see :meth:`takes`), scale and bias float32 [out]."""
        x = x.to(torch.float32).contiguous()
        rows, k = x.shape
        n = weight.shape[0]
        if scale.dtype != torch.float32 or (bias is not None and bias.dtype != torch.float32):
            raise ValueError("native int8 kernel: scale and bias must be float32")
        y = torch.empty(rows, n, dtype=torch.float32)
        status = self._call(x.data_ptr(), rows, k, weight.data_ptr(), n, scale.data_ptr(),
                            0 if bias is None else bias.data_ptr(), y.data_ptr(),
                            torch.get_num_threads())
        if status:
            raise RuntimeError(f"native int8 kernel refused a [{rows}, {k}] x [{n}, {k}] "
                               f"product (status {status})")
        return y


def _cache_dirs() -> list[Path]:
    """Where to keep the built kernel: TTS_NATIVE_CACHE, else the user's cache directory, then
    a temporary one (a container whose home is read-only still builds it)."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return [Path(configured)]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return [Path(base) / "cosyvoice-service",
            Path(tempfile.gettempdir()) / f"cosyvoice-service-{os.getuid()}"]


def _build(compiler: str, target: Path) -> None:
    """Compile into a temporary file beside ``target``, then move it there in one step (so
    processes starting together never load a half-written library)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *COMPILE_FLAGS, str(SOURCE), "-o", tmp], check=True,
                       capture_output=True, text=True, timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def _load() -> NativeInt8Kernel | None:
    if os.environ.get(SWITCH, "1") == "0":
        log.info("native int8 kernel off (%s=0): PyTorch's weight-only kernel", SWITCH)
        return None
    flags = cpu_flags()
    missing = [f for f in CPU_FLAGS if f not in flags]
    if missing:
        log.info("native int8 kernel not used: the CPU lacks %s", ", ".join(missing))
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        log.info("native int8 kernel not used: no C compiler (cc/gcc) on PATH")
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
        key = hashlib.sha256("\0".join([SOURCE.read_text(), version, *COMPILE_FLAGS,
                                        *sorted(flags)]).encode()).hexdigest()[:16]
    except (OSError, subprocess.SubprocessError) as error:
        log.warning("native int8 kernel not used (PyTorch's kernel instead): %s", error)
        return None
    problem: object = None
    for directory in _cache_dirs():
        target = directory / f"int8_matvec-{key}.so"
        try:
            built = not target.exists()
            if built:
                _build(compiler, target)
            kernel = NativeInt8Kernel(ctypes.CDLL(str(target)))
            log.info("native int8 kernel %s: %s", "built" if built else "loaded", target)
            return kernel
        except (OSError, subprocess.SubprocessError) as error:
            problem = getattr(error, "stderr", "") or error
    log.warning("native int8 kernel not used (PyTorch's kernel instead): %s", problem)
    return None


def native_kernel() -> NativeInt8Kernel | None:
    """The kernel, built and loaded once per process; None where it cannot run (see the module
    docstring)."""
    with _lock:
        return _load()
