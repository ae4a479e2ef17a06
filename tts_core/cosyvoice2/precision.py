"""Numeric precision of the CosyVoice 2 modules, chosen per module.

One option name (``--precision``) resolves to a :class:`Precision` plan:

==========  ==============================================  ==================================
option      LM (Qwen2 stack)                                flow
==========  ==============================================  ==================================
float32     float32 (exact: the parity tests' path)         float32
bfloat16    bfloat16                                        bfloat16
float16     float16 (CUDA only)                             float16 (CUDA only)
int8        float32 activations, int8 Linear weights,       bfloat16 where the CPU has fast
            dynamic int8 activations (CPU only)             bf16 matmul (AMX), else float32
int8w       int8 Linear weights only (per output channel),  as int8
            floating-point activations (CPU only)
auto        CPU: int8w (its flow bfloat16 with AMX); CUDA: bfloat16 (float16 without bf16)
==========  ==============================================  ==================================

The LM's speech tables and output layer, the flow's Euler solver and the vocoder stay float32
in every plan. Why these choices (measured by ``scripts/bench_cv2_speed.py``): decoding one token
reads every Linear weight of the Qwen2 stack once, so it is memory bound; int8 weights read a
quarter of the bytes and fbgemm's int8 kernels ran about 3x faster than float32 on 1-2 threads,
while bfloat16 without AMX was no faster than float32. The error each plan adds is measured
against float32 on the parity set (tests) and printed by the benchmark; the tolerances are in
the README. "auto" takes the fastest plan within them: int8 is 3x faster at decoding but on the
full-size generated directory its next-token distributions moved by a total variation distance
of 0.16 (tolerance 0.1), so it is an explicit choice, not the CPU default. int8w keeps the int8
weights but not the rounding of the activations (whose outliers are int8's error): TV 0.065 on
that directory, at nearly int8's decoding speed (``scripts/bench_cv2_lm_quant.py``), so it is
the CPU default. Even with AMX it beats a bfloat16 LM (packed for oneDNN), which reads twice
its bytes per token: on a 2-core AMX machine (full-size directory,
``scripts/bench_cv2_speed.py``) int8w decoded 29.7 tokens/s against 22.3 and gave first audio
1.12 s against 1.29 s, both with the flow in bfloat16; there int8w's calls of more than a few
rows (prompts, decode steps of many requests) take a packed bfloat16 copy of each weight
(``weight_quant.PACKED_ROWS``). int4 weights (group-wise) were faster still
but moved the distributions by TV 0.45, far outside.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "float32", "bfloat16", "float16", "int8", "int8w")


@dataclass(frozen=True)
class Precision:
    """What each module runs in; ``name`` is the resolved option (never "auto")."""

    name: str
    lm_dtype: torch.dtype  # weights and activations of the Qwen2 stack
    lm_int8: bool  # Linear layers of the Qwen2 stack as dynamic int8 (lm_dtype is then float32)
    flow_dtype: torch.dtype
    lm_weight_int8: bool = False  # Linear layers of the stack as weight-only int8 (CPU)

    @property
    def exact(self) -> bool:
        """True for the float32 path that the parity tests check."""
        return (not self.lm_int8 and not self.lm_weight_int8 and self.lm_dtype == torch.float32
                and self.flow_dtype == torch.float32)

    @property
    def lm_description(self) -> str:
        """The LM stack's numerics in words, for logs and benchmark tables."""
        if self.lm_int8:
            return "int8 Linear (dynamic int8 activations)"
        if self.lm_weight_int8:
            return "int8-weight Linear (float activations)"
        return str(self.lm_dtype).removeprefix("torch.")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where that file does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_bf16_support() -> str:
    """"amx" (bf16 matrix tiles), "avx512" (avx512_bf16 dot products) or "none".

    torch's own capability string names AVX512 / AMX builds of its kernels; the cpuinfo flags
    say what this CPU (or this VM's view of it) really has.
    """
    flags = cpu_flags()
    capability = torch.backends.cpu.get_cpu_capability()
    if "amx_bf16" in flags or "AMX" in capability:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512"
    return "none"


def resolve_precision(name: str, device: torch.device | str) -> Precision:
    """The plan for option ``name`` on ``device``; refuses what the device cannot run."""
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; use one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    cuda = device.type == "cuda"

    def bf16() -> str:
        if cuda:
            return "cuda" if torch.cuda.is_bf16_supported() else "none"
        return cpu_bf16_support()

    if name == "auto":
        if cuda:
            name = "bfloat16" if bf16() != "none" else "float16"
        else:
            name = "int8w"  # the flow in bfloat16 where the CPU has AMX, see below
    if name == "float32":
        return Precision("float32", torch.float32, False, torch.float32)
    if name == "float16":
        if not cuda:
            raise ValueError("precision float16 needs CUDA (CPUs have no fast float16 matmul); "
                             "on CPU use int8, bfloat16 or float32")
        return Precision("float16", torch.float16, False, torch.float16)
    if name == "bfloat16":
        if bf16() == "none":
            raise ValueError("precision bfloat16 needs a GPU or a CPU with avx512_bf16 or AMX, "
                             "which this one lacks; use int8 or float32")
        return Precision("bfloat16", torch.bfloat16, False, torch.bfloat16)
    # int8, int8w
    if cuda:
        raise ValueError(f"precision {name} (int8 Linear kernels) runs on CPU only; on CUDA use "
                         "bfloat16 or float16")
    flow_dtype = torch.bfloat16 if bf16() == "amx" else torch.float32
    if name == "int8w":
        return Precision("int8w", torch.float32, False, flow_dtype, lm_weight_int8=True)
    return Precision("int8", torch.float32, True, flow_dtype)
