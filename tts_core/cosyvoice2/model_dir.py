"""Loads an official CosyVoice 2 model directory into our modules.

Layout (ModelScope ``iic/CosyVoice2-0.5B``, Hugging Face ``FunAudioLLM/CosyVoice2-0.5B``)::

    cosyvoice2.yaml              hyper-parameters (hyperpyyaml; read as data, never executed)
    llm.pt  flow.pt  hift.pt     state dicts of the LM, the flow and the vocoder
    campplus.onnx                speaker-embedding model
    speech_tokenizer_v2.onnx     speech tokenizer
    CosyVoice-BlankEN/           Qwen2 config.json + tokenizer files (vocab.json, merges.txt, ...)
    spk2info.pt                  optional preset speakers

Every size comes from the yaml, ``config.json`` and the tensors, so reduced or enlarged models in
the same layout load too. Checkpoints are read with ``torch.load(weights_only=True)`` (no pickled
code runs) and must fit the modules exactly: a mismatch names the missing, unexpected and
mis-shaped keys.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from . import hyperyaml
from .attention_native import native_attention
from .checkpoint import load_strict
from .features import MelConfig
from .flow import CausalFlow, FlowConfig
from .gemm_native import native_gemm
from .hift import HiFTConfig, HiFTGenerator, normalize_state_dict
from .llm import CosyVoice2LM, LMConfig
from .onnx_frontend import OnnxFrontend
from .precision import Precision, resolve_precision
from .qwen2 import Qwen2Config
from .sampling import SamplingConfig
from .tokenizer import CosyVoice2Tokenizer

log = logging.getLogger(__name__)

OFFICIAL_SOURCES = ("the official directory is ModelScope iic/CosyVoice2-0.5B or Hugging Face "
                    "FunAudioLLM/CosyVoice2-0.5B")
YAML_NAMES = ("cosyvoice2.yaml", "cosyvoice.yaml")  # early CosyVoice 2 releases used the latter
BLANK_EN = "CosyVoice-BlankEN"


_Models = TypeVar("_Models", bound="CosyVoice2Models")


class ModelDirError(ValueError):
    """The model directory is incomplete or does not fit the CosyVoice 2 architecture."""


class MissingModelFile(ModelDirError, FileNotFoundError):
    """A file the model directory must have is not there."""


@dataclass
class CosyVoice2Models:
    """Everything a CosyVoice 2 engine needs, loaded and moved to ``device``.

    The modules are in eval mode and hold no per-request state: share them between threads.
    ``tokenizer`` and ``onnx`` are None when loaded with ``require_frontend=False``.
    """

    path: Path
    device: torch.device
    dtype: torch.dtype  # the flow's (and, unless int8, the LM stack's) dtype
    lm: CosyVoice2LM
    flow: CausalFlow
    hift: HiFTGenerator
    tokenizer: CosyVoice2Tokenizer | None
    onnx: OnnxFrontend | None
    mel_config: MelConfig
    sampling: SamplingConfig
    sample_rate: int
    token_frame_rate: int
    token_mel_ratio: int
    chunk_size: int  # streaming chunk, in speech tokens
    spk2info: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict, repr=False)  # the parsed yaml
    precision: Precision | None = None  # the per-module plan the modules were loaded with


# The helpers below are shared with the CosyVoice 3 loader, which passes its own names.


def _need(path: Path, what: str, sources: str = OFFICIAL_SOURCES) -> Path:
    if not path.is_file():
        raise MissingModelFile(f"model directory {path.parent} lacks {path.name} ({what}); "
                               f"{sources}")
    return path


def _node(cfg: dict[str, Any], key: str, yaml_path: Path, model: str = "CosyVoice 2",
          sources: str = OFFICIAL_SOURCES) -> Any:
    if key not in cfg:
        raise ModelDirError(f"{yaml_path.name} has no `{key}` entry; is this a {model} "
                            f"model directory? ({sources})")
    return cfg[key]


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types
        raise ModelDirError(f"cannot read {path.name} as a torch state dict (weights only): "
                            f"{error}") from error
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ModelDirError(f"{path.name} is not a state dict (a mapping of names to tensors)")
    return state


def _read_yaml(root: Path, names: tuple[str, ...] = YAML_NAMES,
               sources: str = OFFICIAL_SOURCES) -> tuple[Path, dict[str, Any]]:
    for name in names:
        path = root / name
        if path.is_file():
            try:
                return path, hyperyaml.load(path)
            except hyperyaml.HyperYamlError as error:
                raise ModelDirError(f"{name}: {error}") from error
            except (OSError, UnicodeDecodeError) as error:
                raise ModelDirError(f"cannot read {name}: {error}") from error
    raise MissingModelFile(f"model directory {root} lacks {names[0]} (the model "
                           f"configuration); {sources}")


def _read_qwen_config(root: Path, sources: str = OFFICIAL_SOURCES) -> Qwen2Config:
    path = _need(root / BLANK_EN / "config.json", "the Qwen2 backbone configuration", sources)
    try:
        return Qwen2Config.from_hf_config(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as error:
        raise ModelDirError(f"{BLANK_EN}/config.json: {error}") from error


def _read_spk2info(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ModelDirError(f"cannot read {path.name} (weights only): {error}") from error
    if not isinstance(data, dict):
        raise ModelDirError(f"{path.name} must map speaker ids to dicts of tensors")
    presets: dict[str, dict[str, torch.Tensor]] = {}
    for name, entry in data.items():
        if not isinstance(name, str) or not isinstance(entry, dict):
            raise ModelDirError(f"{path.name}: entry {name!r} is not a dict of tensors")
        presets[name] = {k: v for k, v in entry.items() if isinstance(v, torch.Tensor)}
    return presets


def _read_frontend(root: Path, qwen: Qwen2Config, device: torch.device, onnx_threads: int,
                   tokenizer_class: type[CosyVoice2Tokenizer] = CosyVoice2Tokenizer,
                   speech_tokenizer_name: str = "speech_tokenizer_v2.onnx",
                   sources: str = OFFICIAL_SOURCES) -> tuple[CosyVoice2Tokenizer, OnnxFrontend]:
    """The text tokenizer and the two ONNX sessions (speaker embedding, speech tokenizer)."""
    campplus = _need(root / "campplus.onnx", "the speaker-embedding model", sources)
    speech_tokenizer = _need(root / speech_tokenizer_name, "the speech tokenizer", sources)
    try:
        tokenizer = tokenizer_class.from_dir(root / BLANK_EN)
    except FileNotFoundError as error:
        raise MissingModelFile(f"{error}; {sources}") from error
    except ValueError as error:
        raise ModelDirError(str(error)) from error
    if tokenizer.max_token_id >= qwen.vocab_size:
        raise ModelDirError(f"the tokenizer has ids up to {tokenizer.max_token_id} but the "
                            f"LM's vocabulary (config.json vocab_size) has {qwen.vocab_size}")
    try:
        onnx = OnnxFrontend(campplus, speech_tokenizer, threads=onnx_threads, device=str(device))
    except ValueError as error:
        raise ModelDirError(str(error)) from error
    return tokenizer, onnx


def _check_consistent(yaml_path: Path, lm_config: LMConfig, flow_config: FlowConfig,
                      hift_config: HiFTConfig, mel_config: MelConfig, ratio: int,
                      sample_rate: int) -> None:
    """The yaml's parts must agree on token ids, frame rates and mel bins."""
    problems = []
    if flow_config.vocab_size != lm_config.speech_token_size:
        problems.append(f"flow vocab_size {flow_config.vocab_size} != llm speech_token_size "
                        f"{lm_config.speech_token_size}")
    if ratio != flow_config.token_mel_ratio:
        problems.append(f"token_mel_ratio {ratio} != flow token_mel_ratio "
                        f"{flow_config.token_mel_ratio}")
    if sample_rate != hift_config.sampling_rate or sample_rate != mel_config.sampling_rate:
        problems.append(f"sample_rate {sample_rate} differs from the vocoder's "
                        f"({hift_config.sampling_rate}) or the feature extractor's "
                        f"({mel_config.sampling_rate})")
    if mel_config.num_mels != flow_config.output_size or hift_config.in_channels != \
            flow_config.output_size:
        problems.append("mel bins differ between feat_extractor, flow and hift")
    if hift_config.upsample_factor != mel_config.hop_size:
        problems.append(f"the vocoder makes {hift_config.upsample_factor} samples per frame but "
                        f"the mel hop is {mel_config.hop_size}")
    if problems:
        raise ModelDirError(f"{yaml_path.name} is inconsistent: " + "; ".join(problems))


def _read_configs(yaml_path: Path, cfg: dict[str, Any], node: Callable[[str], Any],
                  build_lm: Callable[[Any], Any], flow_config: Any, hift_config: Any
                  ) -> tuple[Any, Any, Any, MelConfig, int, int]:
    """The LM, flow, vocoder and mel configurations of the yaml, the token/mel ratio and the
    sample rate, checked against each other (shared with the CosyVoice 3 loader)."""
    try:
        lm = build_lm(node("llm"))
        flow = flow_config.from_yaml(node("flow"))
        hift = hift_config.from_yaml(node("hift"))
        mel = MelConfig.from_yaml(node("feat_extractor"))
    except ModelDirError:
        raise
    except (ValueError, TypeError, KeyError) as error:
        raise ModelDirError(f"{yaml_path.name}: {error}") from error
    ratio = int(cfg.get("token_mel_ratio", flow.token_mel_ratio))
    sample_rate = int(cfg.get("sample_rate", hift.sampling_rate))
    _check_consistent(yaml_path, lm, flow, hift, mel, ratio, sample_rate)
    return lm, flow, hift, mel, ratio, sample_rate


def _assemble(models_class: type[_Models], root: Path, cfg: dict[str, Any],
              networks: tuple[Any, Any, Any], paths: tuple[Path, Path, Path], *,
              device: torch.device, precision: Precision, fold_hift: bool,
              tokenizer: CosyVoice2Tokenizer | None, onnx: OnnxFrontend | None,
              mel_config: MelConfig, sampling: SamplingConfig, ratio: int,
              sample_rate: int) -> _Models:
    """Load the three checkpoints strictly into the built networks, move them to ``device``,
    read the optional presets and bundle everything (shared with the CosyVoice 3 loader)."""
    lm, flow, hift = networks
    llm_path, flow_path, hift_path = paths
    load_strict(lm, _read_state_dict(llm_path), llm_path.name, ModelDirError)
    load_strict(flow, _read_state_dict(flow_path), flow_path.name, ModelDirError)
    hift_state = _read_state_dict(hift_path)
    try:
        hift_state = normalize_state_dict(hift_state)
    except ValueError as error:
        raise ModelDirError(f"hift.pt: {error}") from error
    load_strict(hift, hift_state, hift_path.name, ModelDirError)
    if fold_hift:
        hift.fold_weight_norm()  # g·v/‖v‖ once, not at every call

    # The LM's speech tables and output layer stay float32 so its log-probabilities keep full
    # precision; only the Qwen2 stack runs in a reduced dtype.
    lm.to(device=device).set_backbone_dtype(precision.lm_dtype).eval()
    if precision.lm_int8:
        lm.quantize_backbone_int8()
    if precision.lm_weight_int8:
        lm.quantize_backbone_weight_int8()
    flow.to(device=device, dtype=precision.flow_dtype).eval()
    if precision.flow_dtype == torch.bfloat16 and torch.device(device).type == "cpu":
        # the flow's native kernels built (or found) now, while the model loads, not in a request
        native_attention()
        native_gemm()
    # The vocoder is built in float32 and stays so (CosyVoice 3's f0 predictor in float64: a
    # dtype cast here would round its folded weights).
    hift.to(device=device).eval()
    if device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        # torch runs cuDNN convolutions in TF32 (10-bit products) unless told otherwise, and
        # the vocoder is mostly convolutions: on an H200 that moved the CosyVoice 3 parity wave
        # by up to 0.059, past the reference's 0.05 (float32 proper: 9.8e-4). Process-wide.
        torch.backends.cudnn.allow_tf32 = False
        log.info("cuDNN TF32 convolutions turned off: the vocoder runs in float32 proper")

    spk2info = {}
    if (root / "spk2info.pt").is_file():
        spk2info = _read_spk2info(root / "spk2info.pt")

    return models_class(
        path=root, device=device, dtype=precision.flow_dtype, lm=lm, flow=flow, hift=hift,
        tokenizer=tokenizer, onnx=onnx, mel_config=mel_config, sampling=sampling,
        sample_rate=sample_rate, token_frame_rate=int(cfg.get("token_frame_rate", 25)),
        token_mel_ratio=ratio, chunk_size=int(cfg.get("chunk_size", 25)), spk2info=spk2info,
        config=cfg, precision=precision)


def precision_plan(precision: Precision | str | None, dtype: torch.dtype,
                   device: torch.device) -> Precision:
    """The per-module plan of a loader call: an option name is resolved for ``device``;
    without one, ``dtype`` applies to the LM stack and the flow."""
    if isinstance(precision, str):
        return resolve_precision(precision, device)
    if precision is None:
        return Precision(str(dtype).removeprefix("torch."), dtype, False, dtype)
    return precision


def load_model_dir(path: Path, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32, require_frontend: bool = True,
                   onnx_threads: int = 1, fold_hift: bool = True,
                   precision: Precision | str | None = None) -> CosyVoice2Models:
    """Load a CosyVoice 2 model directory.

    ``precision`` (a :class:`Precision` plan or an option name such as "int8", see
    :mod:`precision`) sets each module's numerics; without it ``dtype`` applies to the LM stack
    and the flow. The vocoder always runs in float32, its output is too sensitive to rounding. With
    ``require_frontend=False`` the ONNX models and the tokenizer files may be absent (only the
    neural parts are loaded; text and prompt audio then cannot be processed). ``fold_hift``
    replaces the vocoder's weight-norm parametrisations by plain weights (same outputs, faster;
    its ``state_dict()`` then has ``.weight`` keys instead of the checkpoint's).
    """
    root = Path(path)
    if not root.is_dir():
        raise MissingModelFile(f"model directory {root} does not exist; {OFFICIAL_SOURCES}")
    device = torch.device(device)
    plan = precision_plan(precision, dtype, device)
    yaml_path, cfg = _read_yaml(root)
    llm_path = _need(root / "llm.pt", "the language model weights")
    flow_path = _need(root / "flow.pt", "the flow-matching model weights")
    hift_path = _need(root / "hift.pt", "the vocoder weights")
    qwen = _read_qwen_config(root)

    tokenizer: CosyVoice2Tokenizer | None = None
    onnx: OnnxFrontend | None = None
    if require_frontend:
        tokenizer, onnx = _read_frontend(root, qwen, device, onnx_threads)

    lm_config, flow_config, hift_config, mel_config, ratio, sample_rate = _read_configs(
        yaml_path, cfg, lambda key: _node(cfg, key, yaml_path),
        lambda node: LMConfig.from_yaml(node, qwen), FlowConfig, HiFTConfig)

    networks = CosyVoice2LM(lm_config), CausalFlow(flow_config), HiFTGenerator(hift_config)
    return _assemble(CosyVoice2Models, root, cfg, networks, (llm_path, flow_path, hift_path),
                     device=device, precision=plan, fold_hift=fold_hift, tokenizer=tokenizer,
                     onnx=onnx, mel_config=mel_config, sampling=lm_config.sampling, ratio=ratio,
                     sample_rate=sample_rate)
