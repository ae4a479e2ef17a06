"""The state directory (generated key, registered speakers, Envoy's config and descriptor set):
made and tested once at start, so an unusable one is one clear line, not a traceback later."""

from __future__ import annotations

import errno
import os
from pathlib import Path

PROBE_BYTES = 256 * 1024  # about what start-up writes there (descriptor set, Envoy config)
_CHOOSE = "choose another with --state-dir or $COSYVOICE_STATE_DIR"


class StateDirError(ValueError):
    """The state directory cannot be used; the message names the path and what to do."""


def _first_non_directory(path: Path) -> Path | None:
    for parent in [*reversed(path.parents), path]:
        if parent.exists() and not parent.is_dir():
            return parent
    return None


def _explain(path: Path, error: OSError) -> str:
    where = f"state directory {path} is unusable"
    if error.errno in (errno.ENOTDIR, errno.EEXIST) and _first_non_directory(path) is not None:
        blocker = _first_non_directory(path)
        return (f"{where}: {blocker} is a regular file, not a directory; move that file away "
                f"or {_CHOOSE}")
    if error.errno == errno.EROFS:
        return f"{where}: its file system is read-only; {_CHOOSE} on a writable disk"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"{where}: the disk is full (no room for {PROBE_BYTES // 1024} KiB); free some "
                f"space or {_CHOOSE}")
    if error.errno in (errno.EACCES, errno.EPERM):
        return (f"{where}: permission denied; let this user write there (it is created with "
                f"mode 0700) or {_CHOOSE}")
    return f"{where}: {os.strerror(error.errno or 0) or error}; {_CHOOSE}"


def prepare_state_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700) if needed and prove it writable with room to spare."""
    path = Path(path).absolute()
    probe = path / ".write-test"
    try:
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o700)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"\0" * PROBE_BYTES)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as error:
        raise StateDirError(_explain(path, error)) from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return path
