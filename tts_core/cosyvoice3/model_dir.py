"""Loads an official CosyVoice 3 model directory into our modules.

Layout (ModelScope / Hugging Face ``FunAudioLLM/Fun-CosyVoice3-0.5B-2512``)::

    cosyvoice3.yaml              hyper-parameters (hyperpyyaml; read as data, never executed)
    llm.pt  flow.pt  hift.pt     state dicts of the LM, the flow (DiT) and the causal vocoder
    campplus.onnx                speaker-embedding model
    speech_tokenizer_v3.onnx     speech tokenizer (v3; same interface as v2)
    CosyVoice-BlankEN/           Qwen2 config.json + tokenizer files
    spk2info.pt                  optional preset speakers

The same rules as the CosyVoice 2 loader, whose helpers this one uses: every size comes from the
yaml, ``config.json`` and the tensors; checkpoints are read with ``weights_only=True`` and must fit
exactly, and a mismatch names the missing, unexpected and mis-shaped keys.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..cosyvoice2.model_dir import (
    CosyVoice2Models,
    MissingModelFile,
    _assemble,
    _need,
    _node,
    _read_configs,
    _read_frontend,
    _read_qwen_config,
    _read_yaml,
    precision_plan,
)
from ..cosyvoice2.onnx_frontend import OnnxFrontend
from ..cosyvoice2.precision import Precision
from ..cosyvoice2.tokenizer import ENDOFPROMPT
from .flow import CausalFlowDiT, FlowConfig
from .hift import CausalHiFTConfig, CausalHiFTGenerator
from .llm import OFFICIAL_END_OF_PROMPT_ID, CosyVoice3LM, CosyVoice3LMConfig
from .tokenizer import CosyVoice3Tokenizer

log = logging.getLogger(__name__)

OFFICIAL_SOURCES = ("the official directory is FunAudioLLM/Fun-CosyVoice3-0.5B-2512 (ModelScope "
                    "or Hugging Face)")
YAML_NAMES = ("cosyvoice3.yaml",)
SPEECH_TOKENIZER = "speech_tokenizer_v3.onnx"
MODEL = "CosyVoice 3"


@dataclass
class CosyVoice3Models(CosyVoice2Models):
    """Everything a CosyVoice 3 engine needs (the CosyVoice 2 bundle's fields): ``lm`` is a
    :class:`CosyVoice3LM`, ``flow`` a :class:`CausalFlowDiT`, ``hift`` a
    :class:`CausalHiFTGenerator` and ``tokenizer`` a :class:`CosyVoice3Tokenizer`."""


def is_cosyvoice3_dir(path: Path) -> bool:
    """True when ``path`` holds a ``cosyvoice3.yaml`` (how the reference tells versions apart)."""
    return any((Path(path) / name).is_file() for name in YAML_NAMES)


def load_model_dir(path: Path, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32, require_frontend: bool = True,
                   onnx_threads: int = 1, fold_hift: bool = True,
                   precision: Precision | str | None = None) -> CosyVoice3Models:
    """Load a CosyVoice 3 model directory (arguments as the CosyVoice 2 loader's).

    ``dtype`` applies to the LM backbone and the flow; the vocoder always runs in float32 (its
    f0 predictor in float64). Without the front end files (``require_frontend=False``) the
    ``<|endofprompt|>`` id is the official one.
    """
    root = Path(path)
    if not root.is_dir():
        raise MissingModelFile(f"model directory {root} does not exist; {OFFICIAL_SOURCES}")
    device = torch.device(device)
    plan = precision_plan(precision, dtype, device)
    yaml_path, cfg = _read_yaml(root, YAML_NAMES, OFFICIAL_SOURCES)
    llm_path = _need(root / "llm.pt", "the language model weights", OFFICIAL_SOURCES)
    flow_path = _need(root / "flow.pt", "the flow-matching model weights", OFFICIAL_SOURCES)
    hift_path = _need(root / "hift.pt", "the vocoder weights", OFFICIAL_SOURCES)
    qwen = _read_qwen_config(root, OFFICIAL_SOURCES)

    tokenizer: CosyVoice3Tokenizer | None = None
    onnx: OnnxFrontend | None = None
    end_of_prompt = OFFICIAL_END_OF_PROMPT_ID
    if require_frontend:
        tokenizer, onnx = _read_frontend(root, qwen, device, onnx_threads, CosyVoice3Tokenizer,
                                         SPEECH_TOKENIZER, OFFICIAL_SOURCES)
        end_of_prompt = tokenizer.special_token_ids[ENDOFPROMPT]

    def node(key: str) -> Any:
        return _node(cfg, key, yaml_path, MODEL, OFFICIAL_SOURCES)

    lm_config, flow_config, hift_config, mel_config, ratio, sample_rate = _read_configs(
        yaml_path, cfg, node,
        lambda lm_node: CosyVoice3LMConfig.from_yaml(lm_node, qwen, end_of_prompt),
        FlowConfig, CausalHiFTConfig)

    networks = (CosyVoice3LM(lm_config), CausalFlowDiT(flow_config),
                CausalHiFTGenerator(hift_config))
    return _assemble(CosyVoice3Models, root, cfg, networks, (llm_path, flow_path, hift_path),
                     device=device, precision=plan, fold_hift=fold_hift, tokenizer=tokenizer,
                     onnx=onnx, mel_config=mel_config, sampling=lm_config.sampling, ratio=ratio,
                     sample_rate=sample_rate)
