"""Front-end spectrograms: the two parity vectors; the Kaldi fbank against kaldi-native-fbank.

The 24 kHz mel uses the feature settings the model-directory loader reads from the parity
directory's yaml (``feat_extractor``), as the engine does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from tests.cv2_parity import metadata, parity_models, vectors
from tts_core.cosyvoice2.features import (
    WHISPER_HOP,
    WHISPER_N_FFT,
    WHISPER_SAMPLE_RATE,
    KaldiFbankConfig,
    MelConfig,
    kaldi_fbank_80,
    mel_spectrogram_24k,
    slaney_mel_filterbank,
    whisper_log_mel_128,
)

AUDIO_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "audio"
MEL_ATOL = 1e-4  # README: front-end mels, log domain


def load_vectors(name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    return vectors(name), metadata(name)


@pytest.fixture(scope="module", autouse=True)
def _threads() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def mel_config() -> MelConfig:
    return parity_models().mel_config


def test_mel_config_comes_from_the_yaml(mel_config) -> None:
    _, meta = load_vectors("frontend_mel80")
    assert mel_config.n_fft == int(meta["n_fft"])
    assert mel_config.hop_size == int(meta["hop_size"])
    assert mel_config.win_size == int(meta["win_size"])
    assert mel_config.num_mels == int(meta["num_mels"])
    assert mel_config.sampling_rate == int(meta["sampling_rate"])
    assert float(mel_config.fmax) == float(meta["fmax"])
    assert mel_config.center is False


def test_mel80_filterbank_equals_librosa_slaney(mel_config) -> None:
    vec, _ = load_vectors("frontend_mel80")
    bank = slaney_mel_filterbank(mel_config.sampling_rate, mel_config.n_fft,
                                 mel_config.num_mels, mel_config.fmin, mel_config.fmax)
    err = np.abs(bank - vec["mel_filterbank"].numpy()).max()
    assert err <= 1e-7, err
    print(f"mel80 filterbank max abs err {err:.1e}")


def test_mel80_matches_reference(mel_config) -> None:
    vec, _ = load_vectors("frontend_mel80")
    mel = mel_spectrogram_24k(vec["wav"], mel_config)
    frames = vec["wav"].shape[1] // mel_config.hop_size
    assert mel.shape == (1, mel_config.num_mels, frames) == vec["mel"].shape
    err = (mel - vec["mel"]).abs().max().item()
    assert err <= MEL_ATOL
    # speech_feat is the same values frame-major, as handed to the flow
    assert (mel.transpose(1, 2) - vec["speech_feat"]).abs().max().item() <= MEL_ATOL
    print(f"mel80 max abs err {err:.2e}")


def test_mel80_accepts_1d_and_batches(mel_config) -> None:
    vec, _ = load_vectors("frontend_mel80")
    wav = vec["wav"]
    single = mel_spectrogram_24k(wav[0], mel_config)
    batch = mel_spectrogram_24k(torch.cat([wav, wav * 0.5]), mel_config)
    assert torch.equal(single, mel_spectrogram_24k(wav, mel_config))
    assert batch.shape[0] == 2 and torch.allclose(batch[:1], single, atol=1e-5)


def test_whisper_mel128_filterbank_and_log_mel() -> None:
    vec, meta = load_vectors("frontend_whisper_mel128")
    n_mels, hop = int(meta["n_mels"]), int(meta["hop_length"])
    # the speech tokenizer's front end is fixed (not in the yaml): 16 kHz, n_fft 400, hop 160
    assert (int(meta["sample_rate"]), int(meta["n_fft"]), hop) == (
        WHISPER_SAMPLE_RATE, WHISPER_N_FFT, WHISPER_HOP)
    bank = slaney_mel_filterbank(int(meta["sample_rate"]), int(meta["n_fft"]), n_mels)
    bank_err = np.abs(bank - vec["mel_filterbank"].numpy()).max()
    assert bank_err <= 1e-7
    log_mel = whisper_log_mel_128(vec["wav"], n_mels=n_mels)
    assert log_mel.shape == (1, n_mels, vec["wav"].shape[1] // hop) == vec["log_mel"].shape
    err = (log_mel - vec["log_mel"]).abs().max().item()
    assert err <= MEL_ATOL
    print(f"whisper filterbank {bank_err:.1e}, log-mel max abs err {err:.2e}")


def _knf_fbank(wav: np.ndarray) -> np.ndarray:
    import kaldi_native_fbank as knf

    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = 16000
    opts.frame_opts.dither = 0.0
    opts.mel_opts.num_bins = 80
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(16000, wav.tolist())
    fbank.input_finished()
    return np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)])


def _prompt_16k() -> np.ndarray:
    path = AUDIO_DIR / "zero_shot_prompt.wav"
    if not path.is_file():
        pytest.skip(f"prompt recording not found at {path}")
    wav, rate = sf.read(path, dtype="float32")
    return soxr.resample(wav, rate, 16000).astype(np.float32)


def test_kaldi_fbank_matches_kaldi_native_fbank_on_real_speech() -> None:
    wav = _prompt_16k()
    ref = _knf_fbank(wav)
    ours = kaldi_fbank_80(torch.from_numpy(wav), subtract_mean=False).numpy()
    assert ours.shape == ref.shape == (1 + (len(wav) - 400) // 160, 80)
    err = np.abs(ours - ref)
    # both are float32; the largest gaps sit in near-silent bins (log of ~1e-7 energies)
    assert err.max() <= 5e-3 and err.mean() <= 1e-4, (err.max(), err.mean())
    normalised = kaldi_fbank_80(torch.from_numpy(wav)).numpy()
    assert np.abs(normalised.mean(axis=0)).max() <= 1e-4
    assert np.abs(normalised - (ref - ref.mean(axis=0))).max() <= 5e-3
    print(f"kaldi fbank vs knf: max {err.max():.2e}, mean {err.mean():.2e}")


def test_kaldi_fbank_of_a_chirp_matches_kaldi_native_fbank() -> None:
    t = np.arange(16000 * 2) / 16000
    wav = (0.3 * np.sin(2 * np.pi * (200 * t + 900 * t**2))).astype(np.float32)
    wav += np.random.default_rng(3).normal(0, 0.01, wav.shape).astype(np.float32)
    ref = _knf_fbank(wav)
    ours = kaldi_fbank_80(torch.from_numpy(wav), KaldiFbankConfig(), subtract_mean=False).numpy()
    err = np.abs(ours - ref)
    assert err.max() <= 5e-3 and err.mean() <= 1e-4, (err.max(), err.mean())
    print(f"kaldi fbank (chirp) vs knf: max {err.max():.2e}, mean {err.mean():.2e}")


def test_too_short_or_bad_input_is_refused(mel_config) -> None:
    with pytest.raises(ValueError, match="at least 400 samples"):
        kaldi_fbank_80(torch.zeros(399))
    with pytest.raises(ValueError, match="need more than"):
        mel_spectrogram_24k(torch.zeros(100), mel_config)
    with pytest.raises(ValueError, match="float samples"):
        whisper_log_mel_128(torch.zeros(16000, dtype=torch.int16))
    with pytest.raises(ValueError, match="waveform"):
        whisper_log_mel_128(torch.zeros(1, 1, 16000))
