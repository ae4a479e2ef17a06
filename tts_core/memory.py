"""Memory sizes: reading an operator's size (``8G``) and what memory this process may still use.

The CosyVoice engines size the flow stream caches of all their concurrent streams from these
(see ``CosyVoice2Engine``): one stream's cache can reach gigabytes, so N streams at once must
share one budget rather than each take the per-stream maximum.
"""

from __future__ import annotations

import re
from pathlib import Path

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(?:i?b)?|b)?", re.IGNORECASE)


# The flow caches of all streams that may run at once (max_batch, or the server's
# max_concurrent) share one budget: N streams each at the per-stream limit would take N x 3.5
# GiB, more than a 24 GiB machine has at --max-batch 8. Without an explicit budget it is this
# share of the memory free where the caches live once the models are loaded (the rest is for
# the LM's KV caches, activations and the machine); each stream gets an equal part. Processes
# sharing one memory (replicas on one machine or one GPU) divide it between them
# (``--flow-cache-share``, which the replica launcher sets).
DEFAULT_FLOW_CACHE_SHARE = 0.5


def parse_size(text: str) -> int:
    """Bytes in a size such as ``8G``, ``512M``, ``1.5GiB`` or ``1073741824`` (K, M, G and T
    are powers of 1024, with or without a trailing ``B`` / ``iB``); ValueError otherwise."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a size: give bytes or a number with K, M, G or T "
                         "(powers of 1024), e.g. 8G, 512M or 1073741824")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])


def format_gib(size: int) -> str:
    return f"{size / (1 << 30):.3g} GiB"


def meminfo_available(meminfo: str) -> int | None:
    """MemAvailable of a /proc/meminfo text, in bytes (None when it has none)."""
    match = re.search(r"^MemAvailable:\s*(\d+)\s*kB\s*$", meminfo, re.MULTILINE)
    return int(match.group(1)) << 10 if match else None


def cgroup_available(limit: str, current: str, stat: str = "", version: int = 2) -> int | None:
    """Room left under a cgroup memory limit (v2: memory.max, memory.current, memory.stat; v1:
    memory.limit_in_bytes, memory.usage_in_bytes, memory.stat): the limit minus the working
    set, which is the usage less its inactive file cache (page cache the kernel reclaims before
    it kills anything: model files just read sit there). None without a limit (v2 "max"; v1
    reports a number near 2**63)."""
    if limit.strip() == "max" or int(limit) >= 1 << 62:
        return None
    key = "inactive_file" if version == 2 else "total_inactive_file"
    reclaimable = re.search(rf"^{key}\s+(\d+)\s*$", stat, re.MULTILINE)
    used = int(current) - (int(reclaimable.group(1)) if reclaimable else 0)
    return max(0, int(limit) - max(0, used))


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


# cgroup versions: (line of /proc/self/cgroup, mount under /sys/fs/cgroup, limit, usage)
_CGROUPS = ((2, re.compile(r"^0::(.*)$", re.M), ".", "memory.max", "memory.current"),
            (1, re.compile(r"^\d+:(?:[^:]*,)?memory(?:,[^:]*)?:(.*)$", re.M), "memory",
             "memory.limit_in_bytes", "memory.usage_in_bytes"))


def host_available(proc: Path = Path("/proc"), cgroups: Path = Path("/sys/fs/cgroup")
                   ) -> int | None:
    """Memory this process may still use: MemAvailable, or less where a cgroup memory limit of
    its own cgroup or of one above it leaves less (containers, systemd MemoryMax). None when
    nothing can be read (not Linux)."""
    meminfo = _read(proc / "meminfo")
    found = [meminfo_available(meminfo)] if meminfo is not None else []
    own = _read(proc / "self" / "cgroup") or ""
    for version, line, mount, limit_file, usage_file in _CGROUPS:
        match = line.search(own)
        if match is None:
            continue
        root = (cgroups / mount).resolve()
        folder = (root / match.group(1).strip().lstrip("/")).resolve()
        for level in (folder, *folder.parents):
            if not level.is_relative_to(root):
                break
            limit, usage = _read(level / limit_file), _read(level / usage_file)
            if limit is not None and usage is not None:
                found.append(cgroup_available(limit, usage, _read(level / "memory.stat") or "",
                                              version))
    sizes = [size for size in found if size is not None]
    return min(sizes) if sizes else None


def available_memory(device: str) -> int | None:
    """Free memory where tensors on ``device`` live: the GPU's for CUDA, else the host's (see
    :func:`host_available`); None when unknown."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    return host_available()
