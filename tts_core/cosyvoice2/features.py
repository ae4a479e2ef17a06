"""Front-end spectrograms of CosyVoice 2.

* :func:`mel_spectrogram_24k` — the 80-bin log-mel of 24 kHz prompt audio that conditions the
  flow model (yaml ``feat_extractor``);
* :func:`whisper_log_mel_128` — the 128-bin Whisper log-mel of 16 kHz audio, input of the
  speech tokenizer (``speech_tokenizer_v2.onnx``);
* :func:`kaldi_fbank_80` — 80-bin Kaldi log filterbank of 16 kHz audio, mean-normalised over time,
  input of the CAM++ speaker-embedding model (``campplus.onnx``).

The Slaney mel filterbanks are computed here with numpy (no librosa): :func:`slaney_mel_filterbank`
follows librosa's ``filters.mel`` (htk=False, norm="slaney"), float32 rounding included.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from .hyperyaml import Tagged

# --- Slaney mel scale (linear below 1 kHz, logarithmic above) ------------------------------

_F_SP = 200.0 / 3  # Hz per mel in the linear part
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOG_STEP = math.log(6.4) / 27.0


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    mel = hz / _F_SP
    high = hz >= _MIN_LOG_HZ
    return np.where(high, _MIN_LOG_MEL + np.log(np.maximum(hz, 1e-300) / _MIN_LOG_HZ) / _LOG_STEP,
                    mel)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    hz = _F_SP * mel
    high = mel >= _MIN_LOG_MEL
    return np.where(high, _MIN_LOG_HZ * np.exp(_LOG_STEP * (mel - _MIN_LOG_MEL)), hz)


@functools.lru_cache(maxsize=16)
def slaney_mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                          fmax: float | None = None) -> np.ndarray:
    """[n_mels, n_fft // 2 + 1] float32 triangular filters, area-normalised (Slaney)."""
    fmax = sample_rate / 2 if fmax is None else float(fmax)
    fft_hz = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    widths = np.diff(edges)
    distance = edges[:, None] - fft_hz[None, :]
    bank = np.zeros((n_mels, n_fft // 2 + 1), dtype=np.float32)
    for i in range(n_mels):
        rising = -distance[i] / widths[i]
        falling = distance[i + 2] / widths[i + 1]
        bank[i] = np.maximum(0.0, np.minimum(rising, falling))
    # each triangle scaled to unit area: 2 / bandwidth in Hz (computed in float64, stored float32)
    bank *= (2.0 / (edges[2:n_mels + 2] - edges[:n_mels]))[:, None]
    bank.setflags(write=False)
    return bank


def _as_batch(wav: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(wav, torch.Tensor):
        wav = torch.as_tensor(np.asarray(wav, dtype=np.float32))
    if wav.dim() == 1:
        wav = wav[None]
    if wav.dim() != 2:
        raise ValueError(f"{name}: expected a waveform [samples] or [batch, samples], "
                         f"got shape {list(wav.shape)}")
    if not wav.is_floating_point():
        raise ValueError(f"{name}: expected float samples in [-1, 1], got {wav.dtype}")
    return wav.float()


# --- 24 kHz 80-bin log-mel (flow prompt features) ---------------------------------------------


@dataclass(frozen=True)
class MelConfig:
    """The yaml ``feat_extractor`` node (matcha-style mel spectrogram)."""

    n_fft: int = 1920
    num_mels: int = 80
    sampling_rate: int = 24000
    hop_size: int = 480
    win_size: int = 1920
    fmin: float = 0.0
    fmax: float | None = 8000.0
    center: bool = False

    @classmethod
    def from_yaml(cls, node: Tagged) -> MelConfig:
        if not isinstance(node, Tagged) or not isinstance(node.args, dict):
            raise ValueError("feat_extractor: expected a '!name:...mel_spectrogram' mapping")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(node.args) - names)
        if unknown:
            raise ValueError(f"feat_extractor: unknown parameters {unknown}")
        config = cls(**node.args)
        if config.center:
            raise ValueError("feat_extractor: center=True is not what CosyVoice 2 uses")
        return config


def mel_spectrogram_24k(wav: torch.Tensor, config: MelConfig = MelConfig()) -> torch.Tensor:
    """Natural-log mel spectrogram [B, num_mels, frames]; 480·F samples give F frames.

    Reflect-pad by (n_fft − hop)/2 each side, STFT without centring (periodic Hann),
    magnitude √(re² + im² + 1e-9), Slaney mel filterbank, log(max(·, 1e-5)).
    """
    wav = _as_batch(wav, "mel_spectrogram_24k")
    pad = (config.n_fft - config.hop_size) // 2
    if wav.shape[-1] <= pad:
        raise ValueError(f"mel_spectrogram_24k: need more than {pad} samples, "
                         f"got {wav.shape[-1]}")
    padded = F.pad(wav[:, None], (pad, pad), mode="reflect")[:, 0]
    window = torch.hann_window(config.win_size, device=wav.device)
    spec = torch.stft(padded, config.n_fft, hop_length=config.hop_size,
                      win_length=config.win_size, window=window, center=False,
                      return_complex=True)
    spec = torch.view_as_real(spec)
    magnitude = torch.sqrt(spec.pow(2).sum(-1) + 1e-9)
    bank = torch.from_numpy(slaney_mel_filterbank(config.sampling_rate, config.n_fft,
                                                  config.num_mels, config.fmin,
                                                  config.fmax).copy()).to(wav.device)
    return torch.log(torch.clamp(torch.matmul(bank, magnitude), min=1e-5))


# --- 16 kHz 128-bin Whisper log-mel (speech tokenizer input) ---------------------------------

WHISPER_SAMPLE_RATE = 16000
WHISPER_N_FFT = 400
WHISPER_HOP = 160


def whisper_log_mel_128(wav16k: torch.Tensor, n_mels: int = 128) -> torch.Tensor:
    """Whisper's log-mel [B, n_mels, samples // 160] of a 16 kHz waveform.

    Centred STFT (reflect padding 200, periodic Hann 400), power, last frame dropped, Slaney
    filterbank, log10(max(·, 1e-10)), floored at (max − 8), then (x + 4) / 4. The max is taken
    over the whole tensor, as Whisper does (so give one utterance per call).
    """
    wav = _as_batch(wav16k, "whisper_log_mel_128")
    if wav.shape[-1] <= WHISPER_N_FFT // 2:
        raise ValueError(f"whisper_log_mel_128: need more than {WHISPER_N_FFT // 2} samples, "
                         f"got {wav.shape[-1]}")
    window = torch.hann_window(WHISPER_N_FFT, device=wav.device)
    stft = torch.stft(wav, WHISPER_N_FFT, WHISPER_HOP, window=window, return_complex=True)
    power = stft[..., :-1].abs() ** 2
    bank = torch.from_numpy(slaney_mel_filterbank(WHISPER_SAMPLE_RATE, WHISPER_N_FFT,
                                                  n_mels).copy()).to(wav.device)
    log_spec = torch.clamp(bank @ power, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


# --- 16 kHz 80-bin Kaldi fbank (CAM++ speaker embedding input) -----------------------------


@dataclass(frozen=True)
class KaldiFbankConfig:
    """Kaldi ``compute-fbank-feats`` defaults, as torchaudio's ``kaldi.fbank`` applies them."""

    sample_rate: int = 16000
    num_mel_bins: int = 80
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    preemphasis: float = 0.97
    low_freq: float = 20.0
    high_freq: float = 0.0  # <= 0: relative to the Nyquist frequency
    window_power: float = 0.85  # Povey window = Hann (symmetric) ** 0.85

    @property
    def frame_length(self) -> int:
        return int(self.sample_rate * self.frame_length_ms / 1000)

    @property
    def frame_shift(self) -> int:
        return int(self.sample_rate * self.frame_shift_ms / 1000)

    @property
    def padded_length(self) -> int:
        return 1 << (self.frame_length - 1).bit_length()  # next power of two


def _kaldi_mel(hz: torch.Tensor) -> torch.Tensor:
    return 1127.0 * torch.log(1.0 + hz / 700.0)


@functools.lru_cache(maxsize=8)
def _kaldi_mel_banks(config: KaldiFbankConfig) -> torch.Tensor:
    """[num_mel_bins, padded_length // 2 + 1] triangles on Kaldi's 1127·ln(1 + f/700) scale."""
    nyquist = config.sample_rate / 2
    high = config.high_freq if config.high_freq > 0 else nyquist + config.high_freq
    n_bins = config.padded_length // 2
    bin_hz = config.sample_rate / config.padded_length
    mel_low = _kaldi_mel(torch.tensor(config.low_freq, dtype=torch.float64))
    mel_high = _kaldi_mel(torch.tensor(high, dtype=torch.float64))
    step = (mel_high - mel_low) / (config.num_mel_bins + 1)
    index = torch.arange(config.num_mel_bins, dtype=torch.float64)[:, None]
    left, center, right = (mel_low + (index + k) * step for k in range(3))
    mel = _kaldi_mel(bin_hz * torch.arange(n_bins, dtype=torch.float64))[None, :]
    rising = (mel - left) / (center - left)
    falling = (right - mel) / (right - center)
    banks = torch.clamp(torch.minimum(rising, falling), min=0.0)
    # the Nyquist bin gets no weight
    return F.pad(banks, (0, 1)).float()


def kaldi_fbank_80(wav16k: torch.Tensor, config: KaldiFbankConfig = KaldiFbankConfig(),
                   subtract_mean: bool = True) -> torch.Tensor:
    """Kaldi log-mel filterbank [frames, num_mel_bins] of one 16 kHz waveform (float, ±1 scale).

    25 ms frames every 10 ms (edges snipped), no dither, DC removed per frame, pre-emphasis
    0.97, Povey window, zero-padded to 512, power spectrum, 80 triangles from 20 Hz to Nyquist,
    log(max(·, float32 eps)); then, as CosyVoice's front end does for CAM++, the mean over time
    is subtracted.
    """
    wav = _as_batch(wav16k, "kaldi_fbank_80")
    if wav.shape[0] != 1:
        raise ValueError("kaldi_fbank_80: expected one waveform")
    wav = wav[0]
    length, shift = config.frame_length, config.frame_shift
    if wav.shape[0] < length:
        raise ValueError(f"kaldi_fbank_80: need at least {length} samples "
                         f"({config.frame_length_ms:g} ms), got {wav.shape[0]}")
    frames = wav.unfold(0, length, shift)  # [n, length]; trailing partial frame dropped
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames - config.preemphasis * previous
    window = torch.hann_window(length, periodic=False, dtype=torch.float64)
    frames = frames * window.pow(config.window_power).to(frames.device, frames.dtype)
    frames = F.pad(frames, (0, config.padded_length - length))
    power = torch.fft.rfft(frames).abs().pow(2)
    energies = power @ _kaldi_mel_banks(config).to(power.device).T
    feats = torch.log(torch.clamp(energies, min=torch.finfo(torch.float32).eps))
    if subtract_mean:
        feats = feats - feats.mean(dim=0, keepdim=True)
    return feats
