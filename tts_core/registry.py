"""Builds the engine an operator asked for by name.

Imports are lazy so that starting the embedded engine never pays for torch, and the CosyVoice
engines never load the Kokoro model. ``auto`` picks CosyVoice 2 or 3 from the model directory.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tts_core.engine import Engine
from tts_core.memory import DEFAULT_FLOW_CACHE_SHARE

log = logging.getLogger(__name__)

ENGINE_NAMES = ("embedded", "cosyvoice2", "cosyvoice3", "auto")
# Numeric precision an operator may ask for ("auto": the engine's choice for the device).
PRECISIONS = ("auto", "float32", "bfloat16", "float16", "int8", "int8w")
# The configuration file that names a model directory's version (as the reference tells them
# apart); early CosyVoice 2 releases named theirs cosyvoice.yaml.
_YAML_ENGINES = (("cosyvoice3.yaml", "cosyvoice3"), ("cosyvoice2.yaml", "cosyvoice2"),
                 ("cosyvoice.yaml", "cosyvoice2"))


def detect_engine(model_dir: Path) -> str:
    """``cosyvoice2`` or ``cosyvoice3`` for a model directory, from its yaml file's name."""
    root = Path(model_dir)
    if not root.is_dir():
        raise ValueError(f"model directory {root} does not exist")
    for file_name, engine in _YAML_ENGINES:
        if (root / file_name).is_file():
            log.info("model directory %s has %s: using the %s engine", root, file_name, engine)
            return engine
    raise ValueError(f"{root} is not a CosyVoice model directory: it has neither "
                     "cosyvoice3.yaml (CosyVoice 3, e.g. Fun-CosyVoice3-0.5B-2512) nor "
                     "cosyvoice2.yaml (CosyVoice 2, e.g. CosyVoice2-0.5B)")


def is_cosyvoice(name: str, model_dir: Path | None) -> bool:
    """Whether engine ``name`` (``auto``: with ``model_dir``) is a CosyVoice engine, the ones
    with a batch scheduler and a GPU path."""
    return name != "embedded" and not (name == "auto" and model_dir is None)


def runs_on_gpu(name: str, model_dir: Path | None, device: str) -> bool:
    """Whether engine ``name`` would run on a GPU for ``device`` ("auto": when torch sees one;
    only the CosyVoice engines use one, and torch is imported only for them)."""
    if not is_cosyvoice(name, model_dir):
        return False
    if device == "auto":
        import torch

        return torch.cuda.is_available()
    return device.startswith("cuda")


def create_engine(name: str, *, model_dir: Path | None = None, threads: int | None = None,
                  device: str = "auto", state_dir: Path | None = None,
                  first_chunk_tokens: int | None = None, precision: str = "auto",
                  max_batch: int = 1, flow_cache_memory: int | None = None,
                  concurrent_streams: int | None = None,
                  flow_cache_share: float | None = None) -> Engine:
    """Return a ready engine.

    ``threads`` bounds the engine's compute threads (None: its default); ``state_dir`` is where an
    engine keeps what must survive a restart (registered speakers); ``first_chunk_tokens`` sets
    the size of the first streamed chunk of the CosyVoice engines (None: their default);
    ``precision`` is one of ``PRECISIONS``. ``auto`` needs ``model_dir`` and picks cosyvoice2 or
    cosyvoice3 from it. ``max_batch`` > 1 gives the cosyvoice2 / cosyvoice3 engine a batch
    scheduler stepping that many requests together (tts_core.batching). ``flow_cache_memory``:
    bytes the cosyvoice2 / cosyvoice3 flow stream caches of all ``concurrent_streams`` requests
    running at once (None: max_batch) may hold together (None: ``flow_cache_share`` of the
    memory free after loading; None: DEFAULT_FLOW_CACHE_SHARE, half).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {max_batch}")
    if flow_cache_memory is not None and flow_cache_memory < 0:
        raise ValueError(f"--flow-cache-memory must be >= 0 bytes, got {flow_cache_memory}")
    if flow_cache_share is not None and not 0 < flow_cache_share <= 1:
        raise ValueError(f"--flow-cache-share must be in (0, 1], got {flow_cache_share}")
    if name == "auto":
        if model_dir is None:
            raise ValueError("--engine auto needs --model-dir (a CosyVoice 2 or 3 model "
                             "directory); without one use --engine embedded")
        name = detect_engine(model_dir)
    if name == "embedded":
        if precision not in ("auto", "int8"):
            raise ValueError(f"the embedded engine runs its int8 model only; precision "
                             f"{precision} is not available (use auto)")
        if max_batch != 1:
            raise ValueError("--max-batch applies to the cosyvoice2 and cosyvoice3 engines "
                             "only")
        if flow_cache_memory is not None or flow_cache_share is not None:
            raise ValueError("--flow-cache-memory and --flow-cache-share apply to the "
                             "cosyvoice2 and cosyvoice3 engines only")
        from tts_core.embedded.engine import EmbeddedEngine

        return EmbeddedEngine(threads=threads)
    if name in ("cosyvoice2", "cosyvoice3"):
        if model_dir is None:
            raise ValueError(f"the {name} engine needs --model-dir pointing at a model directory "
                             "(CosyVoice 2: ModelScope iic/CosyVoice2-0.5B; CosyVoice 3: "
                             "FunAudioLLM/Fun-CosyVoice3-0.5B-2512)")
        if name == "cosyvoice2":
            from tts_core.cosyvoice2.engine import CosyVoice2Engine as engine_class
        else:
            from tts_core.cosyvoice3.engine import CosyVoice3Engine as engine_class

        return engine_class.from_model_dir(Path(model_dir), threads=threads, device=device,
                                           state_dir=state_dir,
                                           first_chunk_tokens=first_chunk_tokens,
                                           precision=precision, max_batch=max_batch,
                                           flow_cache_memory=flow_cache_memory,
                                           concurrent_streams=concurrent_streams,
                                           flow_cache_share=flow_cache_share
                                           or DEFAULT_FLOW_CACHE_SHARE)
    raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(ENGINE_NAMES)}")
