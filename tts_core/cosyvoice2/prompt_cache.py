"""Prompt audio sent with requests, kept by content so that a prompt sent again costs nothing.

Clients of the reference service send the same prompt recording with every request (a web
page's voice, a bot's persona). Each time, the engine would encode it (speech tokenizer, CAM++,
log-mel) and compute the flow's share of the prompt (on the full-size model about 0.75 s of a
2 s first chunk on 2 CPU cores). This cache keeps, for the last few prompts by the sha256 of
their samples and rate, the encoded features and how often they came; once a prompt has come a
second time, the engine keeps its flow prompt cache too, as it does a registered speaker's
(engine.FLOW_PROMPT_CACHES). A prompt seen once costs nothing extra: its stream computes the
prompt's share itself, as before.

Exact: the features are those the encoder gives for the same samples (they are deterministic),
and a stream going on from a prompt cache gives the samples it gives computing the prompt
itself, bit for bit (see CausalFlow.prompt_cache).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ..lru import LruCache
from .onnx_frontend import PromptFeatures


@dataclass
class PromptEntry:
    """One prompt recording: its features and how often it came."""

    features: PromptFeatures
    uses: int = 1

    @property
    def repeated(self) -> bool:
        return self.uses > 1


def prompt_key(samples: np.ndarray, sample_rate: int) -> str:
    """sha256 of the samples as float32 and their rate: the same recording, the same key."""
    digest = hashlib.sha256(int(sample_rate).to_bytes(8, "little"))
    digest.update(np.ascontiguousarray(samples, dtype=np.float32).tobytes())
    return digest.hexdigest()


class PromptAudioCache(LruCache[str, PromptEntry]):
    """The last ``capacity`` prompts' :class:`PromptEntry` by :func:`prompt_key` (LRU); 0 keeps
    nothing."""

    def get(self, key: str) -> PromptEntry | None:
        """The entry of ``key`` (counted as one more use), or None."""
        entry = super().get(key)
        if entry is not None:
            with self._lock:
                entry.uses += 1
        return entry

    def add(self, key: str, features: PromptFeatures) -> PromptEntry:
        """Keep ``features`` under ``key`` (a first use); returns the entry."""
        entry = PromptEntry(features)
        self.put(key, entry)
        return entry
