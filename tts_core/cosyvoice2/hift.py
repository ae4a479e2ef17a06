"""HiFT vocoder of CosyVoice 2: mel [B, 80, F] -> 24 kHz waveform [B, 480 F].

HiFTNet = neural source filter + iSTFTNet. A small conv net predicts f0 from the mel; f0 drives a
harmonic-plus-noise excitation ("source"); a HiFi-GAN-like decoder upsamples the mel, mixes in the
source's short-time spectrum at every resolution, and predicts magnitude and phase of a tiny STFT
(n_fft 16, hop 4) that an inverse STFT turns into samples.

Module names follow the released ``hift.pt`` exactly, weight norm included (torch's
parametrisation: ``<conv>.parametrizations.weight.original0`` = g, ``.original1`` = v). Checkpoints
written with the older ``weight_g`` / ``weight_v`` names are renamed on load
(:func:`normalize_state_dict`). After loading, :meth:`HiFTGenerator.fold_weight_norm` replaces
every g·v/‖v‖ by the plain weight it computes, once, so inference stops recomputing it.

Randomness: the excitation makes two draws per call (an initial phase per harmonic and additive
Gaussian noise; the reference's third draw, a noise branch whose result inference discards, is
skipped). Pass a ``torch.Generator`` to control them; ``deterministic=True`` replaces both by
zeros, which is how the parity vectors were recorded. (With the frame-rate phase integration the
initial phase lands on a sample the downsampling never reads, so in practice only the noise
matters; it is drawn anyway, as the reference does.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from tts_core import cancellation

from .checkpoint import load_strict
from .hyperyaml import Tagged

_WN = ".parametrizations.weight."


@dataclass
class HiFTConfig:
    """Hyper-parameters of the yaml ``hift`` node; defaults are the released CosyVoice 2 values."""

    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8  # overtones above f0: the source has nb_harmonics + 1 sines
    sampling_rate: int = 24000
    nsf_alpha: float = 0.1  # sine amplitude
    nsf_sigma: float = 0.003  # noise std in voiced frames
    nsf_voiced_threshold: float = 10.0  # f0 (Hz) above which a frame counts as voiced
    upsample_rates: list[int] = field(default_factory=lambda: [8, 5, 3])
    upsample_kernel_sizes: list[int] = field(default_factory=lambda: [16, 11, 7])
    istft_n_fft: int = 16
    istft_hop_len: int = 4
    resblock_kernel_sizes: list[int] = field(default_factory=lambda: [3, 7, 11])
    resblock_dilation_sizes: list[list[int]] = field(
        default_factory=lambda: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    )
    source_resblock_kernel_sizes: list[int] = field(default_factory=lambda: [7, 7, 11])
    source_resblock_dilation_sizes: list[list[int]] = field(
        default_factory=lambda: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    )
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    f0_num_class: int = 1
    f0_in_channels: int = 80
    f0_cond_channels: int = 512

    # yaml classes this config describes (a subclass for another vocoder changes them)
    yaml_target: ClassVar[str] = "HiFTGenerator"
    yaml_f0_target: ClassVar[str] = "ConvRNNF0Predictor"

    @property
    def upsample_factor(self) -> int:
        """Waveform samples per mel frame (480 at 24 kHz)."""
        return math.prod(self.upsample_rates) * self.istft_hop_len

    @classmethod
    def from_yaml(cls, node: Tagged) -> HiFTConfig:
        """Build from the ``hift`` node of the model yaml (as read by ``hyperyaml.load``)."""
        if not isinstance(node, Tagged) or not isinstance(node.args, dict):
            raise ValueError(f"hift: expected a '!new:...{cls.yaml_target}' mapping in the yaml")
        if not node.target.endswith("." + cls.yaml_target):
            raise ValueError(
                f"hift: {node.target} is not supported here; expected "
                f"cosyvoice.hifigan.generator.{cls.yaml_target}"
            )
        args = dict(node.args)
        names = {f.name for f in fields(cls)}
        values: dict = {}
        istft = args.pop("istft_params", None)
        if istft is not None:
            values["istft_n_fft"] = int(istft["n_fft"])
            values["istft_hop_len"] = int(istft["hop_len"])
        predictor = args.pop("f0_predictor", None)
        if isinstance(predictor, Tagged) and isinstance(predictor.args, dict):
            if not predictor.target.endswith("." + cls.yaml_f0_target):
                raise ValueError(f"hift.f0_predictor: {predictor.target} is not supported")
            for key in ("num_class", "in_channels", "cond_channels"):
                if key in predictor.args:
                    values[f"f0_{key}"] = int(predictor.args[key])
        for key, value in args.items():
            if key not in names:
                raise ValueError(f"hift: unknown parameter {key!r} in the yaml")
            values[key] = value
        config = cls(**values)
        if config.sampling_rate == 22050:
            # The reference switches to CosyVoice 1's sample-rate sine generator at 22.05 kHz.
            raise ValueError("hift: sampling_rate 22050 (CosyVoice 1 vocoder) is not supported")
        return config


def _padding(kernel_size: int, dilation: int = 1) -> int:
    return (kernel_size * dilation - dilation) // 2


class Snake(nn.Module):
    """x + sin²(αx)/α with a learned α per channel (no log-scale)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha[None, :, None]
        return x + (1.0 / (alpha + 1e-9)) * torch.sin(x * alpha).pow(2)


class CausalConv1d(nn.Conv1d):
    """Stride-1 Conv1d padded with (kernel − 1)·dilation zeros on the left only: output frame t
    sees inputs up to t (CosyVoice 3's causal vocoder)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, dilation=dilation)
        self.left_pad = (kernel_size - 1) * dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.left_pad, 0)))


def _conv(channels: int, kernel_size: int, dilation: int, causal: bool) -> nn.Conv1d:
    if causal:
        return CausalConv1d(channels, channels, kernel_size, dilation)
    return nn.Conv1d(channels, channels, kernel_size, dilation=dilation,
                     padding=_padding(kernel_size, dilation))


class ResBlock(nn.Module):
    """Per dilation: Snake -> dilated conv -> Snake -> conv, added back to the input.

    ``causal``: every conv pads on the left only (CosyVoice 3), instead of both sides.
    """

    def __init__(self, channels: int, kernel_size: int, dilations: list[int],
                 causal: bool = False):
        super().__init__()
        self.convs1 = nn.ModuleList(
            weight_norm(_conv(channels, kernel_size, d, causal)) for d in dilations
        )
        self.convs2 = nn.ModuleList(
            weight_norm(_conv(channels, kernel_size, 1, causal)) for _ in dilations
        )
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for act1, conv1, act2, conv2 in zip(
            self.activations1, self.convs1, self.activations2, self.convs2, strict=True
        ):
            x = x + conv2(act2(conv1(act1(x))))
        return x


class ConvRNNF0Predictor(nn.Module):
    """Five conv(k3)+ELU layers and a linear read-out; |output| is f0 in Hz per mel frame."""

    def __init__(self, num_class: int, in_channels: int, cond_channels: int):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(5):
            conv = nn.Conv1d(in_channels if i == 0 else cond_channels, cond_channels, 3, padding=1)
            layers += [weight_norm(conv), nn.ELU()]
        self.condnet = nn.Sequential(*layers)  # indices 0, 2, ..., 8 are the convs, as in hift.pt
        self.classifier = nn.Linear(cond_channels, num_class)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        hidden = self.condnet(mel).transpose(1, 2)
        return torch.abs(self.classifier(hidden).squeeze(-1))


class HarmonicSource(nn.Module):
    """Sine excitation at f0 and its overtones, merged into one channel by Linear + tanh.

    The phase is integrated at the frame rate (downsample the per-sample phase increment, cumsum,
    upsample linearly), which keeps float32 phase errors small over long utterances at 24 kHz.
    Only ``l_linear`` is learned; the submodule name matches ``m_source`` in ``hift.pt``.
    """

    def __init__(self, config: HiFTConfig):
        super().__init__()
        self.sampling_rate = config.sampling_rate
        self.upsample_factor = config.upsample_factor
        self.num_sines = config.nb_harmonics + 1
        self.sine_amp = config.nsf_alpha
        self.noise_std = config.nsf_sigma
        self.voiced_threshold = config.nsf_voiced_threshold
        self.l_linear = nn.Linear(self.num_sines, 1)

    def forward(
        self,
        f0: torch.Tensor,
        generator: torch.Generator | None = None,
        deterministic: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """f0 [B, F] in Hz -> (source [B, 1, F·up], uv [B, F·up, 1])."""
        up = self.upsample_factor
        # nearest-neighbour repeat of each frame's f0 over its samples
        f0 = F.interpolate(f0[:, None], scale_factor=up, mode="nearest").transpose(1, 2)
        harmonics = torch.arange(1, self.num_sines + 1, device=f0.device, dtype=f0.dtype)
        # phase increment per sample, in turns; whole turns do not change the sine
        rad = (f0 * harmonics / self.sampling_rate) % 1
        # draws happen where the generator lives (it may be a CPU generator for a GPU model)
        draw_on = generator.device if generator is not None else f0.device
        if not deterministic:
            start = torch.rand(f0.shape[0], self.num_sines, generator=generator,
                               device=draw_on, dtype=f0.dtype).to(f0.device)
            start[:, 0] = 0  # the fundamental starts at phase 0
            rad[:, 0, :] = rad[:, 0, :] + start
        rad = F.interpolate(rad.transpose(1, 2), scale_factor=1 / up, mode="linear")
        phase = torch.cumsum(rad, dim=2) * 2 * np.pi
        phase = F.interpolate(phase * up, scale_factor=up, mode="linear").transpose(1, 2)
        sines = torch.sin(phase) * self.sine_amp
        uv = (f0 > self.voiced_threshold).to(f0.dtype)
        sines = sines * uv
        if not deterministic:
            # voiced: a little noise on top of the sines; unvoiced: noise of about sine amplitude
            noise_amp = uv * self.noise_std + (1 - uv) * self.sine_amp / 3
            noise = torch.randn(sines.shape, generator=generator, device=draw_on,
                                dtype=sines.dtype).to(sines.device)
            sines = sines + noise_amp * noise
        source = torch.tanh(self.l_linear(sines))
        return source.transpose(1, 2), uv


class HiFTBase(nn.Module):
    """What the CosyVoice 2 and 3 vocoders share: weight loading, and the decoder after
    ``conv_pre`` (upsampling stages fused with the source spectrum, ``conv_post``, inverse
    STFT). A subclass builds the modules named here (``ups``, ``source_downs``,
    ``source_resblocks``, ``resblocks``, ``conv_post``) and the ``stft_window`` buffer."""

    config: HiFTConfig

    # --- weights -------------------------------------------------------------------------

    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Strict load of a ``hift.pt`` state dict in either weight-norm spelling.

        Raises ValueError naming the missing, unexpected and mis-shaped keys.
        """
        load_strict(self, normalize_state_dict(state_dict), "the hift state dict")

    def fold_weight_norm(self) -> None:
        """Replace every weight-norm parametrisation by the plain weight it computes.

        Inference results are unchanged; afterwards ``state_dict()`` uses plain ``.weight``.
        """
        for module in self.modules():
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)

    # --- shared decoder stages -----------------------------------------------------------

    def source_spectrum(self, source: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """source [B, 1, S] -> real and imaginary STFT parts [B, n_fft + 2, S/hop + 1]."""
        c = self.config
        spec = torch.stft(source.squeeze(1).float(), c.istft_n_fft, c.istft_hop_len,
                          c.istft_n_fft, window=self.stft_window, return_complex=True)
        return torch.cat([spec.real, spec.imag], dim=1).to(dtype)

    def fuse_and_upsample(self, x: torch.Tensor, source_spec: torch.Tensor) -> torch.Tensor:
        """``conv_pre`` output -> ``conv_post`` output [B, n_fft + 2, frames·up/hop + 1]."""
        c = self.config
        n_kernels = len(c.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            cancellation.check()  # between the upsampling stages, the vocoder's steps
            x = up(F.leaky_relu(x, c.lrelu_slope))
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")
            x = x + self.source_resblocks[i](self.source_downs[i](source_spec))
            blocks = self.resblocks[i * n_kernels:(i + 1) * n_kernels]
            total = blocks[0](x)
            for block in blocks[1:]:
                total = total + block(x)
            x = total / n_kernels
        return self.conv_post(F.leaky_relu(x))  # default slope 0.01 here, as the reference

    def to_waveform(self, x: torch.Tensor) -> torch.Tensor:
        """``conv_post`` output (log-magnitude, phase) -> waveform [B, samples], clamped."""
        c = self.config
        x = x.float()
        bins = c.istft_n_fft // 2 + 1
        magnitude = torch.exp(x[:, :bins]).clamp(max=1e2)
        phase = torch.sin(x[:, bins:])  # the reference squashes the phase through sin
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        wav = torch.istft(spec, c.istft_n_fft, c.istft_hop_len, c.istft_n_fft,
                          window=self.stft_window)
        return wav.clamp(-c.audio_limit, c.audio_limit)


def hann_window(n_fft: int) -> torch.Tensor:
    """Periodic Hann computed in float64 and rounded once (as scipy's get_window does)."""
    n = np.arange(n_fft)
    return torch.from_numpy((0.5 - 0.5 * np.cos(2 * np.pi * n / n_fft)).astype(np.float32))


class HiFTGenerator(HiFTBase):
    """The CosyVoice 2 vocoder. ``inference(mel, cache_source)`` is the entry point."""

    def __init__(self, config: HiFTConfig):
        super().__init__()
        self.config = config
        c = config
        n_bins = c.istft_n_fft + 2  # real and imaginary parts of n_fft/2 + 1 bins
        self.m_source = HarmonicSource(c)
        self.conv_pre = weight_norm(nn.Conv1d(c.in_channels, c.base_channels, 7, padding=3))
        self.ups = nn.ModuleList(
            weight_norm(nn.ConvTranspose1d(c.base_channels // 2**i, c.base_channels // 2**(i + 1),
                                           k, u, padding=(k - u) // 2))
            for i, (u, k) in enumerate(zip(c.upsample_rates, c.upsample_kernel_sizes, strict=True))
        )
        # The source spectrum has the final frame rate; stage i needs it downsampled by the
        # product of the upsampling rates still to come.
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        stages = len(c.upsample_rates)
        for i, (k, d) in enumerate(zip(c.source_resblock_kernel_sizes,
                                       c.source_resblock_dilation_sizes, strict=True)):
            channels = c.base_channels // 2**(i + 1)
            stride = math.prod(c.upsample_rates[i + 1:stages])
            if stride == 1:
                self.source_downs.append(nn.Conv1d(n_bins, channels, 1))
            else:
                self.source_downs.append(
                    nn.Conv1d(n_bins, channels, 2 * stride, stride, padding=stride // 2))
            self.source_resblocks.append(ResBlock(channels, k, d))
        self.resblocks = nn.ModuleList(
            ResBlock(c.base_channels // 2**(i + 1), k, d)
            for i in range(stages)
            for k, d in zip(c.resblock_kernel_sizes, c.resblock_dilation_sizes, strict=True)
        )
        last = c.base_channels // 2**stages
        self.conv_post = weight_norm(nn.Conv1d(last, n_bins, 7, padding=3))
        self.f0_predictor = ConvRNNF0Predictor(c.f0_num_class, c.f0_in_channels,
                                               c.f0_cond_channels)
        self.register_buffer("stft_window", hann_window(c.istft_n_fft), persistent=False)

    # --- stages --------------------------------------------------------------------------

    def predict_f0(self, mel: torch.Tensor) -> torch.Tensor:
        """mel [B, in_channels, F] -> f0 [B, F] in Hz."""
        return self.f0_predictor(mel)

    def source_from_f0(
        self,
        f0: torch.Tensor,
        generator: torch.Generator | None = None,
        deterministic: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """f0 [B, F] -> (source [B, 1, F·up], uv [B, F·up, 1])."""
        return self.m_source(f0, generator=generator, deterministic=deterministic)

    def spectrum(self, mel: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """Decoder up to the last conv: [B, n_fft + 2, F·up/hop + 1] (log-magnitude, phase)."""
        return self.fuse_and_upsample(self.conv_pre(mel), self.source_spectrum(source, mel.dtype))

    def decode(self, mel: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """mel [B, in_channels, F] + source [B, 1, F·up] -> waveform [B, F·up]."""
        return self.to_waveform(self.spectrum(mel, source))

    @torch.inference_mode()
    def inference(
        self,
        mel: torch.Tensor,
        cache_source: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        deterministic: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """mel [B, in_channels, F] -> (wav [B, F·up], source [B, 1, F·up]).

        ``cache_source`` [B, 1, S] (the excitation tail of the previous streaming chunk)
        overwrites the first S samples of the freshly computed excitation, so the harmonics
        continue without a phase jump across chunks. The returned source is the one used.
        """
        if mel.dim() != 3 or mel.shape[1] != self.config.in_channels:
            raise ValueError(f"hift: mel must be [B, {self.config.in_channels}, frames], "
                             f"got {list(mel.shape)}")
        f0 = self.predict_f0(mel)
        source, _ = self.source_from_f0(f0, generator=generator, deterministic=deterministic)
        if cache_source is not None and cache_source.shape[-1] > 0:
            n = cache_source.shape[-1]
            if n > source.shape[-1]:
                raise ValueError(f"hift: cache_source has {n} samples, more than the "
                                 f"{source.shape[-1]} this mel produces")
            source[:, :, :n] = cache_source
        return self.decode(mel, source), source


def normalize_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a HiFT checkpoint's keys to this module's spelling.

    * old weight-norm names: ``<conv>.weight_g`` / ``.weight_v`` ->
      ``<conv>.parametrizations.weight.original0`` / ``.original1``;
    * a ``generator.`` prefix (checkpoints saved from the HiFi-GAN training wrapper) is dropped.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = key.removeprefix("generator.")
        if name.endswith(".weight_g"):
            name = name.removesuffix(".weight_g") + _WN + "original0"
        elif name.endswith(".weight_v"):
            name = name.removesuffix(".weight_v") + _WN + "original1"
        if name in out:
            raise ValueError(f"hift state dict: {key!r} duplicates {name!r}")
        out[name] = value
    return out


def build_hift(node: Tagged, state_dict: Mapping[str, torch.Tensor] | None = None,
               fold: bool = False) -> HiFTGenerator:
    """HiFT from the yaml node, optionally loaded (strict) and weight-norm-folded; eval mode."""
    model = HiFTGenerator(HiFTConfig.from_yaml(node))
    if state_dict is not None:
        model.load_weights(state_dict)
    if fold:
        model.fold_weight_norm()
    return model.eval()
