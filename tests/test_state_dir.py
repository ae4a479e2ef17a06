"""An unusable state directory at start: one line naming the path and what to do, no traceback,
from both entry points (``python -m gateway`` and ``python -m service``), as real processes."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = ("gateway", "service")


def _start(entry: str, state_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COSYVOICE_API_KEYS": secrets.token_urlsafe(24)}
    # Port 1 is never reached: the state directory is checked before anything starts.
    cmd = [sys.executable, "-m", entry, "--state-dir", str(state_dir), "--port", "1"]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def _assert_one_clear_line(result: subprocess.CompletedProcess, path: Path, advice: str) -> None:
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 2, output
    assert "Traceback" not in output, output
    lines = output.splitlines()
    assert len(lines) == 1, output
    assert str(path) in lines[0] and advice in lines[0] and "--state-dir" in lines[0], lines[0]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_state_dir_under_a_regular_file(tmp_path: Path, entry: str) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file")
    state = blocker / "state"
    _assert_one_clear_line(_start(entry, state), blocker, "is a regular file")


def _mount_tmpfs(target: Path, options: str) -> bool:
    target.mkdir()
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
                          capture_output=True)
    return done.returncode == 0


@pytest.fixture
def mounts(tmp_path: Path):
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        target = tmp_path / f"mnt-{uuid.uuid4().hex[:8]}"
        if not _mount_tmpfs(target, options):
            pytest.skip("needs root and permission to mount a tmpfs")
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        subprocess.run(["umount", str(target)], capture_output=True)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_state_dir_on_a_read_only_file_system(mounts, entry: str) -> None:
    target = mounts("ro,size=1m")
    _assert_one_clear_line(_start(entry, target / "state"), target / "state", "read-only")


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_state_dir_on_a_full_disk(mounts, entry: str) -> None:
    target = mounts("size=64k")
    (target / "state").mkdir()
    fd = os.open(target / "filler", os.O_WRONLY | os.O_CREAT)
    try:  # fill the disk to the last block
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    _assert_one_clear_line(_start(entry, target / "state"), target / "state", "disk is full")
