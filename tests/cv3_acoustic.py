"""The parity directory's CosyVoice 3 flow and vocoder, loaded once per test session.

Loaded through the model-directory loader (:func:`tests.cv3_parity.parity_models`: the
directory's ``cosyvoice3.yaml`` read as data, ``flow.pt`` / ``hift.pt`` with ``weights_only=True``
and strict key checks), on the CPU in float32. The returned modules are shared between test
files: tests must not modify them (copy first).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from tests.cv3_parity import parity_dir, parity_models
from tts_core.cosyvoice2 import hyperyaml
from tts_core.cosyvoice3.flow import CausalFlowDiT
from tts_core.cosyvoice3.hift import CausalHiFTGenerator


@functools.cache
def _yaml(path: Path) -> dict[str, Any]:
    return hyperyaml.load(path / "cosyvoice3.yaml")


def parity_yaml() -> dict[str, Any]:
    """The directory's ``cosyvoice3.yaml`` as plain data (shared: do not modify)."""
    return _yaml(parity_dir())


def checkpoint(name: str) -> dict[str, torch.Tensor]:
    """``<name>.pt`` of the directory, loaded as the engine does (weights only)."""
    return torch.load(parity_dir() / f"{name}.pt", weights_only=True, map_location="cpu")


def parity_flow() -> CausalFlowDiT:
    return parity_models().flow


def parity_hift(fold: bool = True) -> CausalHiFTGenerator:
    """``fold=True``: weight norm folded into plain weights (what an engine runs); ``False``
    keeps the checkpoint's parametrisation and key names."""
    return parity_models(fold_hift=fold).hift
