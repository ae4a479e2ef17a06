"""Builds the engine an operator asked for by name.

Imports are lazy so that starting the embedded engine never pays for torch, and the CosyVoice 2
engine never loads the Kokoro model.
"""

from __future__ import annotations

from pathlib import Path

from tts_core.engine import Engine

ENGINE_NAMES = ("embedded", "cosyvoice2")
# Numeric precision an operator may ask for ("auto": the engine's choice for the device).
PRECISIONS = ("auto", "float32", "bfloat16", "float16", "int8")


def create_engine(name: str, *, model_dir: Path | None = None, threads: int | None = None,
                  device: str = "auto", state_dir: Path | None = None,
                  first_chunk_tokens: int | None = None, precision: str = "auto") -> Engine:
    """Return a ready engine.

    ``threads`` bounds the engine's compute threads (None: its default); ``state_dir`` is where an
    engine keeps what must survive a restart (registered speakers); ``first_chunk_tokens`` sets
    the size of the first streamed chunk of the cosyvoice2 engine (None: its default);
    ``precision`` is one of ``PRECISIONS``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if name == "embedded":
        if precision not in ("auto", "int8"):
            raise ValueError(f"the embedded engine runs its int8 model only; precision "
                             f"{precision} is not available (use auto)")
        from tts_core.embedded.engine import EmbeddedEngine

        return EmbeddedEngine(threads=threads)
    if name == "cosyvoice2":
        if model_dir is None:
            raise ValueError("the cosyvoice2 engine needs --model-dir pointing at a CosyVoice2 "
                             "model directory (ModelScope iic/CosyVoice2-0.5B)")
        from tts_core.cosyvoice2.engine import CosyVoice2Engine

        return CosyVoice2Engine.from_model_dir(Path(model_dir), threads=threads, device=device,
                                               state_dir=state_dir,
                                               first_chunk_tokens=first_chunk_tokens,
                                               precision=precision)
    raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(ENGINE_NAMES)}")
