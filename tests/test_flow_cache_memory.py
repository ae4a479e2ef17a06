"""One memory budget for the flow stream caches of all concurrent streams of an engine.

Sizes and free memory are read from real texts (sizes, /proc/meminfo, cgroup files in a temporary
tree); the budgets are those real engines on the generated tiny model directories hand to their
streams, and a stream whose budget is too small to cache must give the samples, bit for bit, of
one whose budget is never reached.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tts_core.memory import cgroup_available, host_available, meminfo_available, parse_size

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PROMPT_TEXT = "希望你以后能够做的比我还好呦。"
TEXT = "收到好友从远方寄来的生日礼物，那份意外的惊喜让我心中充满了甜蜜。"

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(("text", "size"), [
    ("8G", 8 << 30), ("512M", 512 << 20), ("512m", 512 << 20), ("1.5GiB", 3 << 29),
    ("2 GB", 2 << 30), ("1073741824", 1 << 30), ("64k", 64 << 10), ("100B", 100), ("0", 0),
    (" 1T ", 1 << 40)])
def test_sizes_are_read(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "-1G", "8X", "1e9", "8GG", "G", "8 G B"])
def test_bad_sizes_are_refused_with_a_usable_message(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not a size: give bytes or a number with K, M, G "
                                         r"or T .* e\.g\. 8G, 512M"):
        parse_size(text)


# ----------------------------------------------------------------------------- free memory

MEMINFO = """MemTotal:       24567012 kB
MemFree:          612340 kB
MemAvailable:   18874368 kB
Buffers:           81234 kB
Cached:          9123456 kB
SwapTotal:             0 kB
"""


def test_meminfo_available() -> None:
    assert meminfo_available(MEMINFO) == 18874368 * 1024  # 18 GiB
    assert meminfo_available(MEMINFO.replace("MemAvailable", "MemAvail")) is None
    assert meminfo_available("") is None


def test_cgroup_available() -> None:
    stat = "anon 4000\nfile 9000\ninactive_file 3000\nactive_file 6000\n"
    # limit 10000, working set 8000 - 3000 (reclaimable page cache)
    assert cgroup_available("10000\n", "8000\n", stat) == 5000
    assert cgroup_available("10000", "8000") == 2000  # no memory.stat: count all of it
    assert cgroup_available("5000", "8000", "") == 0  # over the limit already
    assert cgroup_available("max\n", "8000\n", stat) is None
    # cgroup v1: its own stat key; "no limit" is a number near 2**63
    assert cgroup_available("10000", "8000", "total_inactive_file 1000\ninactive_file 3000\n",
                            version=1) == 3000
    assert cgroup_available("9223372036854771712", "8000", "", version=1) is None


def test_host_available_takes_the_tightest_limit(tmp_path: Path) -> None:
    """MemAvailable, the process's own cgroup and the ones above it: the least room wins."""
    proc, cgroups = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(MEMINFO)
    (proc / "self" / "cgroup").write_text("0::/system.slice/tts.service\n")
    own, parent = cgroups / "system.slice" / "tts.service", cgroups / "system.slice"
    own.mkdir(parents=True)
    assert host_available(proc, cgroups) == 18 << 30  # no limits: MemAvailable
    (own / "memory.max").write_text("max\n")
    (own / "memory.current").write_text(f"{1 << 30}\n")
    (parent / "memory.max").write_text(f"{12 << 30}\n")
    (parent / "memory.current").write_text(f"{4 << 30}\n")
    assert host_available(proc, cgroups) == 8 << 30  # the parent's limit
    (own / "memory.max").write_text(f"{3 << 30}\n")
    assert host_available(proc, cgroups) == 2 << 30  # its own, tighter
    (proc / "meminfo").write_text(MEMINFO.replace("18874368", "1048576"))
    assert host_available(proc, cgroups) == 1 << 30  # the machine, tighter still
    # cgroup v1: the memory hierarchy's own mount
    (proc / "meminfo").unlink()
    (proc / "self" / "cgroup").write_text("4:memory:/tts\n1:cpu:/\n")
    v1 = cgroups / "memory" / "tts"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(f"{6 << 30}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{1 << 30}\n")
    assert host_available(proc, cgroups) == 5 << 30
    assert host_available(tmp_path / "nothing", tmp_path / "none") is None
