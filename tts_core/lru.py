"""A small thread-safe least-recently-used map, for the engines' caches across requests."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class LruCache(Generic[K, V]):
    """Keeps the ``capacity`` most recently used entries (0 keeps nothing) and counts hits and
    misses. With ``max_bytes`` (and ``size``, an entry's bytes) it also keeps their total at
    most that: the least recently used go first, and an entry larger than the bound alone is
    not kept."""

    def __init__(self, capacity: int, max_bytes: int | None = None,
                 size: Callable[[V], int] | None = None) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        if (max_bytes is None) != (size is None):
            raise ValueError("max_bytes and size go together")
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._size = size
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes of the entries kept (0 without ``size``)."""
        return self._bytes

    def get(self, key: K) -> V | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def peek(self, key: K) -> V | None:
        """The value of ``key`` or None, leaving its recency and the counts alone."""
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry[0]

    def put(self, key: K, value: V) -> bool:
        """Keep ``value`` under ``key`` as the most recent entry; False when it is not kept
        (capacity 0, or larger than ``max_bytes`` alone)."""
        nbytes = self._size(value) if self._size is not None else 0
        if self.capacity == 0 or (self.max_bytes is not None and nbytes > self.max_bytes):
            self.pop(key)  # an older value under the key is stale now
            return False
        with self._lock:
            self._drop(key)
            self._entries[key] = (value, nbytes)
            self._bytes += nbytes
            while len(self._entries) > self.capacity or (
                    self.max_bytes is not None and self._bytes > self.max_bytes):
                self._drop(next(iter(self._entries)))
        return True

    def pop(self, key: K) -> V | None:
        """Forget ``key``; its value, or None."""
        with self._lock:
            entry = self._entries.get(key)
            self._drop(key)
            return None if entry is None else entry[0]

    def values(self) -> list[V]:
        """The values kept, least recently used first (a snapshot)."""
        with self._lock:
            return [value for value, _ in self._entries.values()]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def _drop(self, key: K) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry[1]
