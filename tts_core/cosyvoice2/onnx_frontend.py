"""Prompt-audio front end: the two ONNX models of a CosyVoice 2 model directory.

* ``campplus.onnx`` (CAM++ speaker verification model): 80-bin Kaldi fbank of the 16 kHz prompt,
  mean-normalised over time, ``[1, frames, 80]`` float32 → speaker embedding ``[1, 192]``;
* ``speech_tokenizer_v2.onnx`` (supervised semantic speech tokenizer): 128-bin Whisper log-mel of
  the 16 kHz prompt ``[1, 128, T]`` float32 plus its length ``[1]`` int32 → speech token ids
  ``[1, ≈T/4]`` (25 tokens per second).

The flow additionally needs the 24 kHz 80-bin mel of the prompt (computed in torch by
:mod:`features`). :func:`PromptEncoder.encode` runs all three and trims the mel and the tokens to a
common length (mel frames = ``token_mel_ratio`` × tokens), as the reference front end does for
CosyVoice 2.

Inputs are addressed by position, not by name, as the reference does, so exports that name them
differently still work; the dtypes and ranks are checked when the session opens.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr
import torch

from ..limits import (
    MAX_INPUT_SAMPLE_RATE,
    MAX_PROMPT_SECONDS,
    MIN_INPUT_SAMPLE_RATE,
    MIN_PROMPT_SECONDS,
)
from .features import MelConfig, kaldi_fbank_80, mel_spectrogram_24k, whisper_log_mel_128

TOKENIZER_SAMPLE_RATE = 16000


class PromptAudioError(ValueError):
    """The prompt (or source) audio cannot be used; the message says why."""


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """High-quality resampling (soxr "HQ"), float32 out."""
    samples = np.asarray(samples, dtype=np.float32)
    if from_rate == to_rate:
        return samples
    return soxr.resample(samples, from_rate, to_rate, quality="HQ").astype(np.float32, copy=False)


def trim_silence(samples: np.ndarray, sample_rate: int, threshold_db: float = 60.0,
                 margin_seconds: float = 0.1) -> np.ndarray:
    """Drop leading/trailing stretches quieter than ``threshold_db`` below the peak (20 ms RMS
    frames), keeping ``margin_seconds`` on each side. Speech inside is never touched."""
    frame = max(1, int(0.02 * sample_rate))
    n = len(samples) // frame
    if n == 0:
        return samples
    rms = np.sqrt(np.mean(samples[: n * frame].reshape(n, frame).astype(np.float64) ** 2, axis=1))
    peak = float(rms.max())
    if peak <= 0.0:
        return samples
    loud = np.nonzero(rms > peak * 10 ** (-threshold_db / 20))[0]
    margin = int(margin_seconds * sample_rate)
    start = max(0, loud[0] * frame - margin)
    end = min(len(samples), (loud[-1] + 1) * frame + margin)
    return samples[start:end]


def check_audio(samples: np.ndarray, sample_rate: int, what: str = "prompt",
                min_seconds: float = MIN_PROMPT_SECONDS,
                max_seconds: float = MAX_PROMPT_SECONDS) -> np.ndarray:
    """Validate a mono float waveform; return it as contiguous float32."""
    array = np.asarray(samples)
    if array.ndim != 1:
        raise PromptAudioError(f"{what} audio must be mono (one channel), got shape "
                               f"{list(array.shape)}")
    if not np.issubdtype(array.dtype, np.floating):
        raise PromptAudioError(f"{what} audio must be float samples in [-1, 1], got {array.dtype}")
    if not MIN_INPUT_SAMPLE_RATE <= sample_rate <= MAX_INPUT_SAMPLE_RATE:
        raise PromptAudioError(f"{what} audio sample rate {sample_rate} Hz is not supported "
                               f"({MIN_INPUT_SAMPLE_RATE}–{MAX_INPUT_SAMPLE_RATE} Hz)")
    if not np.isfinite(array).all():
        raise PromptAudioError(f"{what} audio contains NaN or infinite samples")
    seconds = len(array) / sample_rate
    if seconds < min_seconds:
        raise PromptAudioError(f"{what} audio is {seconds:.2f} s long; it needs at least "
                               f"{min_seconds:g} s of speech")
    if seconds > max_seconds:
        raise PromptAudioError(f"{what} audio is {seconds:.1f} s long; at most {max_seconds:g} s "
                               "are supported (the speech tokenizer's limit): cut it shorter")
    if float(np.abs(array).max()) < 1e-4:
        raise PromptAudioError(f"{what} audio is silent")
    return np.ascontiguousarray(array, dtype=np.float32)


@dataclass(frozen=True)
class PromptFeatures:
    """Everything the LM and the flow need from one prompt recording (CPU tensors)."""

    embedding: torch.Tensor  # [1, 192] float32 CAM++ speaker embedding
    speech_tokens: torch.Tensor  # [1, T] int32 speech token ids
    speech_feat: torch.Tensor  # [1, ratio·T, 80] float32 24 kHz log-mel, frame-major

    @property
    def num_tokens(self) -> int:
        return int(self.speech_tokens.shape[1])


def _providers(device: str) -> list[str]:
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if device.startswith("cuda") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _open(path: Path, threads: int, device: str):  # -> onnxruntime.InferenceSession
    import onnxruntime

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} is missing")
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    try:
        return onnxruntime.InferenceSession(str(path), sess_options=options,
                                            providers=_providers(device))
    except Exception as error:  # onnxruntime raises its own exception types
        raise ValueError(f"cannot open {path} as an ONNX model: {error}") from error


def _check_io(session, path: Path, inputs: list[tuple[str, int]], output_rank: int) -> None:
    got = session.get_inputs()
    if len(got) != len(inputs):
        raise ValueError(f"{path.name}: expected {len(inputs)} input(s), the model has "
                         f"{len(got)} ({', '.join(i.name for i in got)})")
    for node, (dtype, rank) in zip(got, inputs, strict=True):
        if node.type != dtype or len(node.shape) != rank:
            raise ValueError(f"{path.name}: input {node.name!r} is {node.type} of rank "
                             f"{len(node.shape)}; expected {dtype} of rank {rank}")
    outputs = session.get_outputs()
    if not outputs or len(outputs[0].shape) < output_rank - 1:
        raise ValueError(f"{path.name}: unexpected outputs {[o.name for o in outputs]}")


class OnnxFrontend:
    """The CAM++ and speech-tokenizer sessions. Thread-safe (ONNX Runtime sessions are)."""

    def __init__(self, campplus_path: Path, speech_tokenizer_path: Path, threads: int = 1,
                 device: str = "cpu") -> None:
        self.campplus_path = Path(campplus_path)
        self.speech_tokenizer_path = Path(speech_tokenizer_path)
        self.campplus = _open(self.campplus_path, threads, "cpu")  # tiny; CPU like the reference
        self.tokenizer = _open(self.speech_tokenizer_path, threads, device)
        _check_io(self.campplus, self.campplus_path, [("tensor(float)", 3)], 2)
        _check_io(self.tokenizer, self.speech_tokenizer_path,
                  [("tensor(float)", 3), ("tensor(int32)", 1)], 2)
        self._campplus_input = self.campplus.get_inputs()[0].name
        self._tokenizer_inputs = [i.name for i in self.tokenizer.get_inputs()]
        # ORT sessions can run concurrently, but CPU threads are few: one prompt at a time.
        self._lock = threading.Lock()

    def speaker_embedding(self, wav16k: np.ndarray) -> torch.Tensor:
        """[1, 192] float32 from a 16 kHz waveform."""
        feats = kaldi_fbank_80(torch.from_numpy(np.asarray(wav16k, dtype=np.float32)))
        with self._lock:
            out = self.campplus.run(None, {self._campplus_input: feats[None].numpy()})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32).reshape(1, -1))

    def speech_tokens(self, wav16k: np.ndarray) -> torch.Tensor:
        """[1, T] int32 speech token ids from a 16 kHz waveform (≤ 30 s)."""
        seconds = len(wav16k) / TOKENIZER_SAMPLE_RATE
        if seconds > MAX_PROMPT_SECONDS:
            raise PromptAudioError(f"speech tokenizer input is {seconds:.1f} s; at most "
                                   f"{MAX_PROMPT_SECONDS:g} s are supported")
        mel = whisper_log_mel_128(torch.from_numpy(np.asarray(wav16k, dtype=np.float32)))
        feats = mel.numpy().astype(np.float32, copy=False)
        length = np.array([feats.shape[2]], dtype=np.int32)
        with self._lock:
            out = self.tokenizer.run(None, {self._tokenizer_inputs[0]: feats,
                                            self._tokenizer_inputs[1]: length})[0]
        return torch.from_numpy(np.asarray(out).reshape(1, -1).astype(np.int32))


class PromptEncoder:
    """Turns prompt audio into :class:`PromptFeatures` (or source audio into speech tokens)."""

    def __init__(self, onnx: OnnxFrontend, mel_config: MelConfig, token_mel_ratio: int,
                 trim: bool = True) -> None:
        self.onnx = onnx
        self.mel_config = mel_config
        self.token_mel_ratio = token_mel_ratio
        self.trim = trim

    def _prepare(self, samples: np.ndarray, sample_rate: int, what: str,
                 min_seconds: float) -> np.ndarray:
        samples = check_audio(samples, sample_rate, what, min_seconds=min_seconds)
        if self.trim:
            samples = trim_silence(samples, sample_rate)
            if len(samples) / sample_rate < min_seconds:
                raise PromptAudioError(f"{what} audio holds less than {min_seconds:g} s of "
                                       "sound once leading and trailing silence is removed")
        return samples

    def encode(self, samples: np.ndarray, sample_rate: int) -> PromptFeatures:
        samples = self._prepare(samples, sample_rate, "prompt", MIN_PROMPT_SECONDS)
        wav16k = resample(samples, sample_rate, TOKENIZER_SAMPLE_RATE)
        wav24k = resample(samples, sample_rate, self.mel_config.sampling_rate)
        tokens = self.onnx.speech_tokens(wav16k)
        embedding = self.onnx.speaker_embedding(wav16k)
        feat = mel_spectrogram_24k(torch.from_numpy(wav24k)[None], self.mel_config)
        feat = feat.transpose(1, 2).contiguous()  # [1, frames, 80]
        # The flow wants exactly ratio mel frames per prompt token: cut both to fit.
        ratio = self.token_mel_ratio
        n = min(feat.shape[1] // ratio, tokens.shape[1])
        if n < 1:
            raise PromptAudioError("prompt audio gave no speech tokens")
        return PromptFeatures(embedding=embedding, speech_tokens=tokens[:, :n].contiguous(),
                              speech_feat=feat[:, : ratio * n].contiguous())

    def source_tokens(self, samples: np.ndarray, sample_rate: int) -> torch.Tensor:
        """Speech tokens [1, T] of the speech to re-voice (voice conversion)."""
        samples = self._prepare(samples, sample_rate, "source", 0.2)
        tokens = self.onnx.speech_tokens(resample(samples, sample_rate, TOKENIZER_SAMPLE_RATE))
        if tokens.shape[1] < 1:
            raise PromptAudioError("source audio gave no speech tokens")
        return tokens
