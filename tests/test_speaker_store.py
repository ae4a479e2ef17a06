"""The registered-speaker store is crash-safe: a replacement is one atomic step, checked at load.

The crash is real: a child process registers a speaker and is killed with SIGKILL at a chosen
point of the write; the parent then opens the store like a restarted server would.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tts_core.cosyvoice2.speakers import SpeakerProfile, SpeakerRegistry

REPO_ROOT = Path(__file__).resolve().parents[1]

# Run in a child: register "erin" (transcript "old"), then replace it (transcript "new"), dying
# by SIGKILL on the first call of the named function while the replacement is written.
_CHILD = textwrap.dedent("""
    import os, signal, sys
    import torch
    from tts_core.cosyvoice2 import speakers as sp

    state, crash_at = sys.argv[1], sys.argv[2]

    def profile(text, seed):
        g = torch.Generator().manual_seed(seed)
        return sp.SpeakerProfile(id="erin", embedding=torch.randn(1, 192, generator=g),
                                 speech_tokens=torch.arange(seed, seed + 10,
                                                            dtype=torch.int32)[None],
                                 speech_feat=torch.randn(1, 20, 80, generator=g),
                                 prompt_text=text, registered=True)

    registry = sp.SpeakerRegistry(state)
    registry.add(profile("old", 1))

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if crash_at == "replace":
        sp.os.replace = die          # after the new file is written, before it takes the name
    elif crash_at == "fsync":
        sp.os.fsync = die            # the new file written, not yet flushed
    elif crash_at == "after":
        sp._sync_directory = die     # renamed into place, directory not yet flushed
    registry.add(profile("new", 2), replace=True)
    print("survived")
""")


def _crash_while_replacing(state: Path, crash_at: str) -> None:
    child = subprocess.run([sys.executable, "-c", _CHILD, str(state), crash_at], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr


@pytest.mark.parametrize("crash_at, expected", [("fsync", "old"), ("replace", "old"),
                                                ("after", "new")])
def test_replacement_killed_midway_leaves_old_or_new_never_a_mix(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, crash_at: str, expected: str) -> None:
    _crash_while_replacing(tmp_path, crash_at)
    with caplog.at_level(logging.INFO, logger="tts_core.cosyvoice2.speakers"):
        registry = SpeakerRegistry(tmp_path)
    erin = registry.get("erin")
    assert erin is not None and erin.prompt_text == expected
    seed = 1 if expected == "old" else 2
    # The tensors belong to the same registration as the transcript.
    assert erin.speech_tokens[0, 0].item() == seed
    g = torch.Generator().manual_seed(seed)
    assert torch.equal(erin.embedding, torch.randn(1, 192, generator=g))
    files = sorted(p.name for p in (tmp_path / "speakers").iterdir())
    assert files == ["erin.safetensors"], files
    if crash_at != "after":  # a half-written file was found, removed, and said so
        assert any("half-written" in r.getMessage() and "erin.safetensors" in r.getMessage()
                   for r in caplog.records), caplog.text


def _profile(speaker_id: str = "erin", text: str = "hello") -> SpeakerProfile:
    return SpeakerProfile(id=speaker_id, embedding=torch.randn(1, 192),
                          speech_tokens=torch.arange(10, dtype=torch.int32)[None],
                          speech_feat=torch.randn(1, 20, 80), prompt_text=text, registered=True)


def test_damaged_file_is_skipped_with_a_clear_log_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    SpeakerRegistry(tmp_path).add(_profile())
    SpeakerRegistry(tmp_path).add(_profile("frank"))
    path = tmp_path / "speakers" / "erin.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit in the tensor data
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="tts_core.cosyvoice2.speakers"):
        registry = SpeakerRegistry(tmp_path)
    assert [p.id for p in registry.all()] == ["frank"]
    assert "erin.safetensors" in caplog.text and "checksum" in caplog.text
    assert "register the speaker again" in caplog.text


def test_earlier_two_file_format_is_converted_and_orphans_reported(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = tmp_path / "speakers"
    directory.mkdir()
    old = _profile("gina", "legacy transcript")
    save_file({"embedding": old.embedding, "speech_tokens": old.speech_tokens,
               "speech_feat": old.speech_feat}, str(directory / "gina.safetensors"))
    (directory / "gina.json").write_text(json.dumps({"format": 1, "id": "gina",
                                                     "prompt_text": "legacy transcript"}))
    (directory / "henk.json").write_text(json.dumps({"format": 1, "id": "henk"}))  # orphan
    with caplog.at_level(logging.INFO, logger="tts_core.cosyvoice2.speakers"):
        registry = SpeakerRegistry(tmp_path)
    gina = registry.get("gina")
    assert gina is not None and gina.prompt_text == "legacy transcript"
    assert torch.equal(gina.embedding, old.embedding)
    assert "converted speaker 'gina'" in caplog.text
    assert "henk.json" in caplog.text and "henk.safetensors is missing" in caplog.text
    assert not (directory / "gina.json").exists()
    assert SpeakerRegistry(tmp_path).get("gina").prompt_text == "legacy transcript"


def test_delete_is_one_step(tmp_path: Path) -> None:
    registry = SpeakerRegistry(tmp_path)
    registry.add(_profile())
    registry.delete("erin")
    assert not list((tmp_path / "speakers").iterdir())
    assert SpeakerRegistry(tmp_path).get("erin") is None
