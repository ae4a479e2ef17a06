"""on_short_thread: the work runs on a thread of its own that has ended when the call returns,
with its result or its exception handed back."""

from __future__ import annotations

import threading

import pytest

from tts_core.short_thread import on_short_thread


def test_result_comes_back_from_a_thread_that_has_ended() -> None:
    ran_on: list[threading.Thread] = []

    def work(a: int, b: int = 0) -> int:
        ran_on.append(threading.current_thread())
        return a + b

    assert on_short_thread(work, 2, b=3) == 5
    assert ran_on[0] is not threading.current_thread() and not ran_on[0].is_alive()


def test_an_exception_is_raised_in_the_caller() -> None:
    def fail() -> None:
        raise ValueError("bad prompt audio")

    with pytest.raises(ValueError, match="bad prompt audio"):
        on_short_thread(fail)
