"""Speakers of the CosyVoice 2 engine: presets from ``spk2info.pt`` and voices registered at run
time from a prompt recording.

A speaker is what the engine computed from a prompt once — the CAM++ embedding, the prompt's
speech tokens and 24 kHz mel, and its transcript — so later requests skip the front end. A
registered speaker is ONE file, ``<state_dir>/speakers/<id>.safetensors``: the tensors, with the
metadata (transcript, language, features, ...) and a SHA-256 of the tensors in the safetensors
header. It is written to a temporary name, flushed, and renamed into place, so registering,
replacing or deleting a speaker is one atomic step: after a crash the old speaker or the new one is
there, never a mix. At start every file is checked (header, checksum, shapes); anything
inconsistent (a damaged file, a left-over temporary file, files of the earlier two-file format
that do not pair up) gets one log line saying what was found and what was done. Ids are validated
so an id can never name a path outside that directory.

Each stored speaker names the features it holds (``"features"`` in its metadata: ``cosyvoice2`` —
speech tokenizer v2, mel up to 8 kHz — or ``cosyvoice3`` — tokenizer v3, mel up to 12 kHz; files
without the key are CosyVoice 2's). A registry only serves speakers of its own features: the
others stay on disk untouched, are not listed, and asking for one gets an error that says to
register the voice again (the prompt audio is not stored, so they cannot be recomputed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..engine import Speaker
from ..limits import SPEAKER_ID_RULE, is_valid_speaker_id

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 1: tensors + a separate JSON file (read and converted at start)
_TENSOR_NAMES = ("embedding", "speech_tokens", "speech_feat")
DEFAULT_FEATURES = "cosyvoice2"  # the features of speakers stored before the tag existed


class SpeakerError(ValueError):
    """A speaker id or speaker file is not acceptable; the message says why."""


def validate_speaker_id(speaker_id: str) -> str:
    if not is_valid_speaker_id(speaker_id):
        raise SpeakerError(f"speaker id {speaker_id!r} is not valid: {SPEAKER_ID_RULE}")
    return speaker_id


@dataclass(frozen=True)
class SpeakerProfile:
    """Cached prompt features of one voice (CPU tensors)."""

    id: str
    embedding: torch.Tensor  # [1, 192] float32
    speech_tokens: torch.Tensor  # [1, T] int32 (T may be 0 for embedding-only presets)
    speech_feat: torch.Tensor  # [1, ratio·T, 80] float32
    prompt_text: str = ""  # transcript of the prompt ("" when unknown)
    prompt_text_ids: tuple[int, ...] | None = None  # presets saved as ids instead of text
    language: str = "und"
    description: str = ""
    registered: bool = False
    created: float = 0.0

    @property
    def has_prompt_audio(self) -> bool:
        return self.speech_tokens.shape[1] > 0

    @property
    def has_transcript(self) -> bool:
        return bool(self.prompt_text) or bool(self.prompt_text_ids)

    def to_speaker(self) -> Speaker:
        return Speaker(id=self.id, language=self.language, description=self.description,
                       registered=self.registered)


def _as_2d(tensor: torch.Tensor, name: str, speaker: str) -> torch.Tensor:
    if tensor.dim() == 1:
        tensor = tensor[None]
    if tensor.dim() != 2 or tensor.shape[0] != 1:
        raise SpeakerError(f"preset {speaker!r}: {name} must be [1, n], got {list(tensor.shape)}")
    return tensor


def preset_from_spk2info(name: str, entry: dict[str, torch.Tensor], n_mels: int = 80
                         ) -> SpeakerProfile:
    """Read one ``spk2info.pt`` entry in either released format.

    * SFT presets: ``embedding`` (+ optional ``speech_token`` / ``speech_feat``);
    * speakers saved by the reference's ``add_zero_shot_spk``: ``flow_embedding``,
      ``flow_prompt_speech_token``, ``prompt_speech_feat`` and ``prompt_text`` (token ids).
    """
    embedding = entry.get("embedding", entry.get("flow_embedding", entry.get("llm_embedding")))
    if embedding is None:
        raise SpeakerError(f"preset {name!r} in spk2info.pt has no speaker embedding")
    embedding = _as_2d(embedding.float(), "embedding", name)
    tokens = entry.get("speech_token", entry.get("flow_prompt_speech_token"))
    feat = entry.get("speech_feat", entry.get("prompt_speech_feat"))
    if tokens is None or feat is None:
        tokens = torch.zeros(1, 0, dtype=torch.int32)
        feat = torch.zeros(1, 0, n_mels)
    tokens = _as_2d(tokens, "speech_token", name).to(torch.int32)
    feat = feat.float()
    if feat.dim() == 2:
        feat = feat[None]
    if feat.dim() != 3 or feat.shape[2] != n_mels:
        raise SpeakerError(f"preset {name!r}: speech_feat must be [1, frames, {n_mels}], got "
                           f"{list(feat.shape)}")
    text_ids = entry.get("prompt_text")
    ids = tuple(int(i) for i in text_ids.flatten().tolist()) if text_ids is not None else None
    return SpeakerProfile(id=name, embedding=embedding, speech_tokens=tokens, speech_feat=feat,
                          prompt_text_ids=ids or None, description="preset speaker")


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _sync_directory(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _sync_directory(directory: Path) -> None:
    """Make a rename or unlink in ``directory`` durable (its entry survives a power cut)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in _TENSOR_NAMES:
        tensor = tensors[name].contiguous()
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


class SpeakerRegistry:
    """Presets plus registered speakers; registered ones persist under ``state_dir`` (None:
    memory only). Thread-safe."""

    def __init__(self, state_dir: Path | None, presets: dict[str, SpeakerProfile] | None = None,
                 features: str = DEFAULT_FEATURES) -> None:
        self._lock = threading.Lock()
        self._presets = dict(presets or {})
        self._registered: dict[str, SpeakerProfile] = {}
        self.features = features
        self._foreign: dict[str, str] = {}  # stored speakers of other features: id -> features
        self.directory = Path(state_dir) / "speakers" if state_dir is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._load_all()

    # -- queries

    def get(self, speaker_id: str) -> SpeakerProfile | None:
        with self._lock:
            return self._registered.get(speaker_id) or self._presets.get(speaker_id)

    def all(self) -> list[SpeakerProfile]:
        with self._lock:
            return list(self._presets.values()) + sorted(self._registered.values(),
                                                         key=lambda p: p.id)

    def __len__(self) -> int:
        with self._lock:
            return len(self._presets) + len(self._registered)

    def is_preset(self, speaker_id: str) -> bool:
        return speaker_id in self._presets

    def foreign_features(self, speaker_id: str) -> str | None:
        """The features of a stored speaker this registry cannot serve (None: not such a one)."""
        with self._lock:
            return self._foreign.get(speaker_id)

    # -- changes

    def add(self, profile: SpeakerProfile, replace: bool = False) -> SpeakerProfile:
        validate_speaker_id(profile.id)
        with self._lock:
            if profile.id in self._presets:
                raise SpeakerError(f"speaker id {profile.id!r} is a preset speaker of the model "
                                   "directory; choose another id")
            if profile.id in self._registered and not replace:
                raise SpeakerError(f"speaker {profile.id!r} is already registered; delete it "
                                   "first or register under another id")
            if profile.id in self._foreign and not replace:
                raise SpeakerError(f"speaker id {profile.id!r} is taken by a voice registered "
                                   f"with {self._foreign[profile.id]} features; register with "
                                   "replace to overwrite it, or choose another id")
            if self.directory is not None:
                self._save(profile)
            self._foreign.pop(profile.id, None)
            self._registered[profile.id] = profile
        return profile

    def delete(self, speaker_id: str) -> None:
        with self._lock:
            if speaker_id in self._presets:
                raise SpeakerError(f"speaker {speaker_id!r} is a preset of the model directory "
                                   "and cannot be deleted")
            if speaker_id in self._foreign and speaker_id not in self._registered:
                if self.directory is not None:
                    for suffix in (".json", ".safetensors"):
                        (self.directory / f"{speaker_id}{suffix}").unlink(missing_ok=True)
                del self._foreign[speaker_id]
                return
            if speaker_id not in self._registered:
                raise KeyError(speaker_id)
            if self.directory is not None:
                (self.directory / f"{speaker_id}.safetensors").unlink(missing_ok=True)
                (self.directory / f"{speaker_id}.json").unlink(missing_ok=True)  # format 1
                _sync_directory(self.directory)
            del self._registered[speaker_id]

    # -- storage

    def _save(self, profile: SpeakerProfile) -> None:
        assert self.directory is not None
        tensors = {"embedding": profile.embedding.float().contiguous(),
                   "speech_tokens": profile.speech_tokens.to(torch.int32).contiguous(),
                   "speech_feat": profile.speech_feat.float().contiguous()}
        meta = {"format": str(FORMAT_VERSION), "id": profile.id, "language": profile.language,
                "description": profile.description, "prompt_text": profile.prompt_text,
                "created": repr(profile.created or time.time()), "features": self.features,
                "tensors_sha256": _tensor_digest(tensors)}
        _atomic_write(self.directory / f"{profile.id}.safetensors",
                      lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        # A format-1 transcript of the same id would now describe other tensors: remove it.
        legacy = self.directory / f"{profile.id}.json"
        if legacy.exists():
            legacy.unlink()
            _sync_directory(self.directory)

    def _load_all(self) -> None:
        assert self.directory is not None
        for leftover in sorted(self.directory.glob(".*.tmp")):
            log.warning("speaker store %s: removing %s, a file left half-written by an "
                        "interrupted registration (the speaker keeps its previous state)",
                        self.directory, leftover.name)
            leftover.unlink(missing_ok=True)
        for path in sorted(self.directory.glob("*.safetensors")):
            try:
                validate_speaker_id(path.stem)
                features = self._features_of(path)
                if features != self.features:
                    self._foreign[path.stem] = features
                    continue
                profile = self._load(path)
            except (OSError, ValueError, KeyError, TypeError) as error:
                log.warning("speaker store %s: skipping %s: %s (register the speaker again, "
                            "with replace, to repair it)", self.directory, path.name, error)
                continue
            if profile.id in self._presets:
                log.warning("speaker store %s: skipping registered speaker %r: a preset has "
                            "the same id", self.directory, profile.id)
                continue
            self._registered[profile.id] = profile
        for meta_path in sorted(self.directory.glob("*.json")):
            if not meta_path.with_suffix(".safetensors").exists():
                log.warning("speaker store %s: ignoring %s: its tensors file %s is missing "
                            "(an interrupted registration or deletion of the earlier format); "
                            "register the speaker again", self.directory, meta_path.name,
                            meta_path.with_suffix(".safetensors").name)

        if self._foreign:
            log.warning("%d stored speaker(s) hold features of another engine and are not used "
                        "by this one (%s): %s", len(self._foreign), self.features,
                        ", ".join(sorted(self._foreign)[:10]))

    @staticmethod
    def _features_of(path: Path) -> str:
        """The features tag of a stored speaker: from the safetensors header, or from the JSON
        file of the earlier two-file format."""
        with safe_open(str(path), framework="pt") as handle:
            meta = dict(handle.metadata() or {})
        if not meta and path.with_suffix(".json").exists():
            meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        return str(meta.get("features", DEFAULT_FEATURES))

    def _load(self, path: Path) -> SpeakerProfile:
        with safe_open(str(path), framework="pt") as handle:
            meta = dict(handle.metadata() or {})
        if not meta:
            return self._load_format1(path)
        speaker_id = validate_speaker_id(str(meta["id"]))
        if path.name != f"{speaker_id}.safetensors":
            raise SpeakerError(f"file name does not match the id {speaker_id!r}")
        if meta.get("format") != str(FORMAT_VERSION):
            raise SpeakerError(f"unknown format {meta.get('format')!r}")
        tensors = load_file(str(path))
        if _tensor_digest(tensors) != meta.get("tensors_sha256"):
            raise SpeakerError("the tensors do not match the checksum stored with them "
                               "(the file is damaged)")
        return self._profile(speaker_id, tensors, meta)

    def _load_format1(self, path: Path) -> SpeakerProfile:
        """Format 1 (tensors + ``<id>.json``): load, then rewrite as one format-2 file."""
        meta_path = path.with_suffix(".json")
        if not meta_path.exists():
            raise SpeakerError(f"no metadata: neither a format-{FORMAT_VERSION} header nor "
                               f"{meta_path.name}")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        speaker_id = validate_speaker_id(str(meta["id"]))
        if path.stem != speaker_id:
            raise SpeakerError(f"file name does not match the id {speaker_id!r}")
        profile = self._profile(speaker_id, load_file(str(path)), meta)
        self._save(profile)
        log.info("speaker store %s: converted speaker %r to the one-file format (format 1 "
                 "could not tell a half-finished replacement from a complete one)",
                 self.directory, speaker_id)
        return profile

    @staticmethod
    def _profile(speaker_id: str, tensors: dict[str, torch.Tensor], meta: dict
                 ) -> SpeakerProfile:
        embedding, tokens, feat = (tensors["embedding"], tensors["speech_tokens"],
                                   tensors["speech_feat"])
        if embedding.dim() != 2 or tokens.dim() != 2 or feat.dim() != 3:
            raise SpeakerError("tensor shapes are not [1, 192] / [1, T] / [1, F, mels]")
        return SpeakerProfile(id=speaker_id, embedding=embedding, speech_tokens=tokens,
                              speech_feat=feat, prompt_text=str(meta.get("prompt_text", "")),
                              language=str(meta.get("language", "und")),
                              description=str(meta.get("description", "")), registered=True,
                              created=float(meta.get("created", 0.0)))
