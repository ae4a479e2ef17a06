"""glibc malloc tuning (tts_core/allocator.py), each case in a fresh interpreter."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = """
from tts_core.allocator import tune_allocator
first = tune_allocator()
print(first, tune_allocator() == first)
"""


def _run(tuning: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "TTS_MALLOC_TUNING"}
    env["PYTHONPATH"] = str(ROOT)
    if tuning is not None:
        env["TTS_MALLOC_TUNING"] = tuning
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=True)
    return done.stdout.split()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_tuning_is_set_once_per_process() -> None:
    assert _run(None) == ["True", "True"]


def test_the_environment_can_leave_the_defaults() -> None:
    assert _run("0") == ["False", "True"]
