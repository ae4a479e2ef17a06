"""CosyVoice 3 front-end mel (yaml ``feat_extractor``, fmax null = 12 kHz) against the reference.

The computation is CosyVoice 2's (``tts_core.cosyvoice2.features``), parametrised by the yaml:
only the filterbank's upper edge differs. The 128-bin Whisper features of the speech tokenizer are
unchanged and covered by ``test_cv2_features_parity.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.cv3_acoustic import parity_yaml
from tests.cv3_parity import metadata, vectors
from tts_core.cosyvoice2.features import MelConfig, mel_spectrogram_24k, slaney_mel_filterbank

MEL_ATOL = 1e-5  # README suggests 1e-4 (log domain); 2 threads instead of 1 moved it 4.8e-7


@pytest.fixture(scope="module", autouse=True)
def _threads() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def mel_config() -> MelConfig:
    return MelConfig.from_yaml(parity_yaml()["feat_extractor"])


def test_mel_config_comes_from_the_yaml(mel_config: MelConfig) -> None:
    meta = metadata("frontend_mel80")
    assert mel_config.fmax is None  # "fmax: null": up to the Nyquist frequency
    assert mel_config.n_fft == int(meta["n_fft"])
    assert mel_config.hop_size == int(meta["hop_size"])
    assert mel_config.win_size == int(meta["win_size"])
    assert mel_config.fmin == float(meta["fmin"])
    assert mel_config.sampling_rate == 24000 and mel_config.center is False


def test_filterbank_reaches_12_khz(mel_config: MelConfig) -> None:
    vec = vectors("frontend_mel80")
    bank = slaney_mel_filterbank(mel_config.sampling_rate, mel_config.n_fft,
                                 mel_config.num_mels, mel_config.fmin, mel_config.fmax)
    assert bank.shape == tuple(vec["mel_filterbank"].shape)
    err = np.abs(bank - vec["mel_filterbank"].numpy()).max()
    assert err <= 1e-7, err
    hz_per_bin = mel_config.sampling_rate / mel_config.n_fft
    top_band = np.nonzero(bank[-1])[0]
    assert top_band[-1] * hz_per_bin > 11000  # the last band ends near 12 kHz
    cv2_bank = slaney_mel_filterbank(mel_config.sampling_rate, mel_config.n_fft,
                                     mel_config.num_mels, mel_config.fmin, 8000.0)
    assert np.abs(cv2_bank - bank).max() > 1e-3  # CosyVoice 2's bank would not do
    print(f"mel80 (12 kHz) filterbank max abs err {err:.1e}")


def test_mel_matches_reference(mel_config: MelConfig) -> None:
    vec = vectors("frontend_mel80")
    mel = mel_spectrogram_24k(vec["wav"], mel_config)
    frames = vec["wav"].shape[1] // mel_config.hop_size
    assert mel.shape == (1, mel_config.num_mels, frames) == vec["mel"].shape
    err = (mel - vec["mel"]).abs().max().item()
    assert err <= MEL_ATOL
    # speech_feat: the same values frame-major, as handed to the flow as prompt_feat
    assert (mel.transpose(1, 2) - vec["speech_feat"]).abs().max().item() <= MEL_ATOL
    # the signal reaches above 8 kHz, so the 12 kHz bands carry energy a CosyVoice 2 mel lacks
    cv2 = mel_spectrogram_24k(vec["wav"], MelConfig(fmax=8000.0))
    assert (cv2 - vec["mel"]).abs().max().item() > 0.1
    print(f"mel80 (12 kHz) max abs err {err:.2e}")
