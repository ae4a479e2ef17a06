"""Causal HiFT vocoder of CosyVoice 3: mel [B, 80, F] -> 24 kHz waveform [B, 480 F].

The same neural-source-filter + iSTFT design as CosyVoice 2's vocoder (shared code in
``tts_core.cosyvoice2.hift``: Snake, residual blocks, weight-norm loading, the fused upsampling
stages and the inverse STFT), made causal so that a growing mel can be re-vocoded and cut:

* every convolution pads on the left only, except two that look ahead: ``conv_pre`` sees 4 frames
  to the right and the f0 predictor's first convolution 3. With ``finalize=False`` (more mel will
  follow) those frames are right context instead of zero padding, and the output stops earlier;
* the upsampling layers repeat each frame (nearest) and apply a causal convolution, instead of
  transposed convolutions;
* the f0 predictor runs in float64, as the reference does (f0 drives a phase that reaches ~1e4
  rad, so its rounding matters);
* the excitation is deterministic: the phase is integrated per frame and held over the frame's
  samples, and its noise comes from a fixed uniform table (see :class:`SineNoiseTable`).

Module names follow the released ``hift.pt`` exactly (weight norm as torch's parametrisation).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from tts_core.cosyvoice2.hift import (
    CausalConv1d,
    HarmonicSource,
    HiFTBase,
    HiFTConfig,
    ResBlock,
    hann_window,
)
from tts_core.cosyvoice2.hyperyaml import Tagged

F0_LOOK_RIGHT = 3  # the f0 predictor's first conv has kernel 4 and looks 3 frames ahead


@dataclass
class CausalHiFTConfig(HiFTConfig):
    """The yaml ``hift`` node; defaults are the released Fun-CosyVoice3-0.5B values."""

    conv_pre_look_right: int = 4

    yaml_target: ClassVar[str] = "CausalHiFTGenerator"
    yaml_f0_target: ClassVar[str] = "CausalConvRNNF0Predictor"

    @property
    def look_right(self) -> int:
        """Mel frames a non-final call needs beyond the frames it vocodes."""
        return F0_LOOK_RIGHT + self.conv_pre_look_right


# --- the fixed noise of the reference's causal source --------------------------------------

SINE_NOISE_ROWS = 300 * 24000  # 300 s at 24 kHz, the reference's table length
_NOISE_COLUMNS = 9  # the official 8 overtones + f0


def _official_draws() -> tuple[torch.Generator, torch.Tensor]:
    """Replays the reference's global-RNG draws up to its sine noise table on a private
    generator: torch.manual_seed(0) by the flow matching, then every draw the official yaml makes
    until then (README "Randomness", item 3). Only the number of values drawn matters, so the
    parameter initialisations are replayed on throw-away tensors of the official shapes.

    Returns the generator, positioned at the table, and the initial phases ``rand_ini`` [1, 9]
    drawn just before it (entry 0 zeroed; they never reach the output).
    """
    g = torch.Generator(device="cpu").manual_seed(0)
    torch.empty(1, 80, 15000).normal_(generator=g)  # flow-matching noise table
    torch.empty(6561, 80).normal_(generator=g)  # flow.input_embedding
    shapes = [(80, 192)]  # flow.spk_embed_affine_layer
    shapes += [(512, 80, 4)] + [(512, 512, 3)] * 4 + [(1, 512)]  # f0 predictor convs, classifier
    for shape in shapes:  # weight then bias, as nn.Linear / nn.Conv1d initialise them
        torch.empty(shape).uniform_(generator=g)
        torch.empty(shape[0]).uniform_(generator=g)
    rand_ini = torch.rand(1, _NOISE_COLUMNS, generator=g)
    rand_ini[:, 0] = 0
    return g, rand_ini


def official_initial_phases() -> torch.Tensor:
    """The reference's ``rand_ini`` [1, 9] (for checks; it has no effect on any output)."""
    return _official_draws()[1]


class SineNoiseTable:
    """The uniform [0, 1) table ``sine_waves`` [1, 7 200 000, 9] of the reference's causal sine
    generator, with the values of the official construction.

    Rows are drawn on first use, as many as needed (the generator's draws are prefix-consistent,
    so row r is the same whatever the length drawn), instead of 260 MB up front; copies per device
    are kept. One table per process serves every vocoder: it is a constant.
    """

    def __init__(self) -> None:
        self._start = _official_draws()[0].get_state()
        self._tables: dict[torch.device, torch.Tensor] = {}
        self._lock = threading.Lock()

    # a process-wide constant: copies and pickles refer to the one table
    def __deepcopy__(self, memo: dict) -> SineNoiseTable:
        return self

    def __reduce__(self) -> tuple:
        return (sine_noise_table, ())

    def rows(self, n: int, device: torch.device) -> torch.Tensor:
        """The first ``n`` rows, [1, n, 9] float32 on ``device``."""
        if n > SINE_NOISE_ROWS:
            raise ValueError(f"hift: {n} samples requested, the fixed excitation noise covers "
                             f"{SINE_NOISE_ROWS} ({SINE_NOISE_ROWS // 24000} s); synthesise "
                             "shorter segments")
        table = self._tables.get(device)
        if table is None or table.shape[1] < n:
            with self._lock:
                table = self._tables.get(device)
                if table is None or table.shape[1] < n:
                    have = 0 if table is None else table.shape[1]
                    size = min(SINE_NOISE_ROWS, max(n, 2 * have, 30 * 24000))
                    generator = torch.Generator(device="cpu")
                    generator.set_state(self._start)
                    table = torch.rand(1, size, _NOISE_COLUMNS, generator=generator).to(device)
                    self._tables[device] = table
        return table[:, :n]


_SINE_NOISE: SineNoiseTable | None = None
_SINE_NOISE_LOCK = threading.Lock()


def sine_noise_table() -> SineNoiseTable:
    global _SINE_NOISE
    with _SINE_NOISE_LOCK:
        if _SINE_NOISE is None:
            _SINE_NOISE = SineNoiseTable()
        return _SINE_NOISE


# --- modules -------------------------------------------------------------------------------


class LookAheadConv1d(nn.Conv1d):
    """Conv1d of kernel look_right + 1: output frame t sees inputs t … t + look_right.

    finalize=True pads look_right zero frames on the right (same length out); finalize=False
    uses the input's last look_right frames as that context (look_right fewer frames out).
    """

    def __init__(self, in_channels: int, out_channels: int, look_right: int):
        super().__init__(in_channels, out_channels, look_right + 1)
        self.look_right = look_right

    def forward(self, x: torch.Tensor, finalize: bool = True) -> torch.Tensor:
        if finalize:
            x = F.pad(x, (0, self.look_right))
        return super().forward(x)


class CausalUpsample(nn.Conv1d):
    """Repeat every frame ``stride`` times, then a causal conv (in place of a transposed conv)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int):
        super().__init__(in_channels, out_channels, kernel_size)
        self.stride_up = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.repeat_interleave(self.stride_up, dim=2)
        return super().forward(F.pad(x, (self.kernel_size[0] - 1, 0)))


class CausalDownsample(nn.Conv1d):
    """Strided conv with stride − 1 zero frames on the left."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int):
        super().__init__(in_channels, out_channels, kernel_size, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.stride[0] - 1, 0)))


class CausalF0Predictor(nn.Module):
    """Look-ahead conv + four causal convs (ELU after each), linear read-out; |output| = f0 (Hz).
    Kept in float64 by :class:`CausalHiFTGenerator`."""

    def __init__(self, num_class: int, in_channels: int, cond_channels: int):
        super().__init__()
        layers: list[nn.Module] = [
            weight_norm(LookAheadConv1d(in_channels, cond_channels, F0_LOOK_RIGHT)), nn.ELU()]
        for _ in range(4):
            layers += [weight_norm(CausalConv1d(cond_channels, cond_channels, 3)), nn.ELU()]
        self.condnet = nn.Sequential(*layers)  # indices 0, 2, ..., 8 are the convs, as in hift.pt
        self.classifier = nn.Linear(cond_channels, num_class)

    def forward(self, mel: torch.Tensor, finalize: bool = True) -> torch.Tensor:
        """mel [B, C, F] -> f0 [B, F] (finalize) or [B, F − 3]."""
        hidden = self.condnet[1:](self.condnet[0](mel, finalize))
        return torch.abs(self.classifier(hidden.transpose(1, 2)).squeeze(-1))


class CausalHarmonicSource(HarmonicSource):
    """Deterministic sine excitation: per-frame phase held over the frame, fixed noise table."""

    def __init__(self, config: CausalHiFTConfig):
        super().__init__(config)
        if self.num_sines != _NOISE_COLUMNS:
            raise ValueError(f"hift: the causal source's fixed noise has {_NOISE_COLUMNS} "
                             f"columns; nb_harmonics must be {_NOISE_COLUMNS - 1}")
        self.noise_table = sine_noise_table()

    def forward(self, f0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        """f0 [B, F] in Hz -> (source [B, 1, F·up], uv [B, F·up, 1])."""
        up = self.upsample_factor
        harmonics = torch.arange(1, self.num_sines + 1, device=f0.device, dtype=f0.dtype)
        # The reference computes the phase increment per sample and downsamples it to the frame
        # rate by linear interpolation between two equal samples, i.e. exactly the frame's value;
        # the phase is then scaled by up and held (nearest) over the frame. Same float32 operation
        # order as the reference: the phase reaches ~1e4 rad.
        rad = ((f0[:, :, None] * harmonics) / self.sampling_rate) % 1  # [B, F, sines]
        phase = torch.cumsum(rad, dim=1) * 2 * np.pi
        sines = torch.sin(phase.transpose(1, 2) * up).repeat_interleave(up, dim=2)
        sines = sines.transpose(1, 2) * self.sine_amp  # [B, F·up, sines]
        uv = (f0 > self.voiced_threshold).to(f0.dtype).repeat_interleave(up, dim=1)[:, :, None]
        noise_amp = uv * self.noise_std + (1 - uv) * self.sine_amp / 3
        noise = noise_amp * self.noise_table.rows(sines.shape[1], f0.device).to(f0.dtype)
        source = torch.tanh(self.l_linear(sines * uv + noise))
        return source.transpose(1, 2), uv


class CausalHiFTGenerator(HiFTBase):
    """The CosyVoice 3 vocoder. ``inference(mel, finalize)`` is the entry point."""

    def __init__(self, config: CausalHiFTConfig):
        super().__init__()
        self.config = config
        c = config
        n_bins = c.istft_n_fft + 2  # real and imaginary parts of n_fft/2 + 1 bins
        self.m_source = CausalHarmonicSource(c)
        self.conv_pre = weight_norm(LookAheadConv1d(c.in_channels, c.base_channels,
                                                    c.conv_pre_look_right))
        self.ups = nn.ModuleList(
            weight_norm(CausalUpsample(c.base_channels // 2**i, c.base_channels // 2**(i + 1),
                                       k, u))
            for i, (u, k) in enumerate(zip(c.upsample_rates, c.upsample_kernel_sizes, strict=True))
        )
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        stages = len(c.upsample_rates)
        for i, (k, d) in enumerate(zip(c.source_resblock_kernel_sizes,
                                       c.source_resblock_dilation_sizes, strict=True)):
            channels = c.base_channels // 2**(i + 1)
            stride = math.prod(c.upsample_rates[i + 1:stages])
            self.source_downs.append(CausalConv1d(n_bins, channels, 1) if stride == 1
                                     else CausalDownsample(n_bins, channels, 2 * stride, stride))
            self.source_resblocks.append(ResBlock(channels, k, d, causal=True))
        self.resblocks = nn.ModuleList(
            ResBlock(c.base_channels // 2**(i + 1), k, d, causal=True)
            for i in range(stages)
            for k, d in zip(c.resblock_kernel_sizes, c.resblock_dilation_sizes, strict=True)
        )
        last = c.base_channels // 2**stages
        self.conv_post = weight_norm(CausalConv1d(last, n_bins, 7))
        self.f0_predictor = CausalF0Predictor(c.f0_num_class, c.f0_in_channels,
                                              c.f0_cond_channels).double()
        self.register_buffer("stft_window", hann_window(c.istft_n_fft), persistent=False)

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 - nn.Module's signature
        # .to(dtype) / .half() must not move the f0 predictor off float64 (devices still apply)
        super()._apply(fn, recurse)
        self.f0_predictor.double()
        return self

    # --- stages --------------------------------------------------------------------------

    def predict_f0(self, mel: torch.Tensor, finalize: bool = True) -> torch.Tensor:
        """mel [B, in_channels, F] -> f0 [B, F] (finalize) or [B, F − 3] in Hz, computed in
        float64 and returned in the mel's dtype."""
        return self.f0_predictor(mel.double(), finalize).to(mel.dtype)

    def source_from_f0(self, f0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f0 [B, F] -> (source [B, 1, F·up], uv [B, F·up, 1])."""
        return self.m_source(f0)

    def spectrum(self, mel: torch.Tensor, source: torch.Tensor, finalize: bool = True
                 ) -> torch.Tensor:
        """Decoder up to ``conv_post``; mel [B, C, F], source [B, 1, F·up] ->
        [B, n_fft + 2, F'·up/hop + 1] with F' = F, or F − conv_pre_look_right when not final."""
        c = self.config
        source_spec = self.source_spectrum(source, mel.dtype)
        if not finalize:  # the source frames under conv_pre's right context are not vocoded
            source_spec = source_spec[:, :, :-math.prod(c.upsample_rates) * c.conv_pre_look_right]
        return self.fuse_and_upsample(self.conv_pre(mel, finalize), source_spec)

    def decode(self, mel: torch.Tensor, source: torch.Tensor, finalize: bool = True
               ) -> torch.Tensor:
        """mel + source -> waveform [B, F·up] (finalize) or [B, (F − look_right − 1)·up]."""
        wav = self.to_waveform(self.spectrum(mel, source, finalize))
        if not finalize:  # the reference also holds back the last frame's samples
            wav = wav[:, :-self.config.upsample_factor]
        return wav

    @torch.inference_mode()
    def inference(self, mel: torch.Tensor, finalize: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """mel [B, in_channels, F] -> (wav, source [B, 1, F'·up]).

        finalize=True: wav [B, F·up], F' = F. finalize=False (more mel follows): the last
        ``config.look_right`` frames are right context only; wav covers F − 8 frames
        (F − look_right − 1), F' = F − 3.
        """
        c = self.config
        if mel.dim() != 3 or mel.shape[1] != c.in_channels:
            raise ValueError(f"hift: mel must be [B, {c.in_channels}, frames], "
                             f"got {list(mel.shape)}")
        if not finalize and mel.shape[2] <= c.look_right + 1:
            raise ValueError(f"hift: a non-final call needs more than {c.look_right + 1} mel "
                             f"frames, got {mel.shape[2]}")
        f0 = self.predict_f0(mel, finalize)
        source, _ = self.source_from_f0(f0)
        decoder_mel = mel if finalize else mel[:, :, :-F0_LOOK_RIGHT]
        return self.decode(decoder_mel, source, finalize), source


def build_hift(node: Tagged, state_dict: Mapping[str, torch.Tensor] | None = None,
               fold: bool = False) -> CausalHiFTGenerator:
    """Causal HiFT from the yaml node, optionally loaded (strict, either weight-norm spelling,
    optional ``generator.`` prefix) and weight-norm-folded; eval mode."""
    model = CausalHiFTGenerator(CausalHiFTConfig.from_yaml(node))
    if state_dict is not None:
        model.load_weights(state_dict)
    if fold:
        model.fold_weight_norm()
    return model.eval()
