"""End to end: the CosyVoice 2 engine on a generated (random-weight) model directory.

The weights are random, so the audio is noise; what is checked is everything around it: every
mode runs and produces audio whose length follows the LM's token-count rules exactly, streaming,
cancellation, determinism, concurrency, speakers and their persistence, and the errors.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

import tts_core.cosyvoice2.engine as cv2_engine
from tts_core.cosyvoice2.engine import (
    DEFAULT_FIRST_CHUNK_TOKENS,
    NO_PRESETS,
    CosyVoice2Engine,
    default_schedule,
)
from tts_core.cosyvoice2.prompt_cache import prompt_key
from tts_core.cosyvoice2.speakers import (
    SpeakerError,
    SpeakerProfile,
    SpeakerRegistry,
    validate_speaker_id,
)
from tts_core.cosyvoice2.testing.make_model_dir import make_model_dir, synthetic_voice
from tts_core.cosyvoice2.token2wav import StreamSchedule
from tts_core.engine import (
    Audio,
    InvalidRequest,
    Mode,
    SynthesisRequest,
    UnknownSpeaker,
    UnsupportedMode,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PROMPT_TEXT = "希望你以后能够做的比我还好呦。"
SAMPLES_PER_TOKEN = 960  # 2 mel frames of 480 samples

torch.set_num_threads(1)


def _read(name: str) -> Audio:
    samples, rate = soundfile.read(SHARED / "audio" / name, dtype="float32")
    return Audio(samples, rate)


@pytest.fixture(scope="session")
def zh_prompt() -> Audio:
    return _read("zero_shot_prompt.wav")  # 24 kHz float WAV, 3.5 s


@pytest.fixture(scope="session")
def en_prompt() -> Audio:
    audio = _read("cross_lingual_prompt.wav")  # 22.05 kHz PCM, 13.75 s
    return Audio(audio.samples[: 4 * audio.sample_rate], audio.sample_rate)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cv2-models")
    return {"presets": make_model_dir(root / "presets", "tiny", seed=11, spk2info=True),
            "bare": make_model_dir(root / "bare", "tiny", seed=12)}


@pytest.fixture(scope="module")
def engine(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
           ) -> CosyVoice2Engine:
    # float32: what these tests check does not depend on the numerics, and random tiny models'
    # sampled lengths do (auto quantises the LM on CPU)
    return CosyVoice2Engine.from_model_dir(model_dirs["presets"], threads=1, device="cpu",
                                           state_dir=tmp_path_factory.mktemp("state"), seed=5,
                                           precision="float32")


def collect(engine: CosyVoice2Engine, request: SynthesisRequest,
            cancel: threading.Event | None = None) -> list[np.ndarray]:
    return list(engine.synthesize(request, cancel or threading.Event()))


def text_tokens(engine: CosyVoice2Engine, text: str, tagged: bool) -> list[int]:
    """LM text-token count of each segment the engine will speak."""
    segments = engine.text.segments(text)
    if tagged:
        segments = [engine.text.tag_language(s) for s in segments]
    return [len(engine.tokenizer.encode(s)) for s in segments]


def assert_plausible(chunks: list[np.ndarray], counts: list[int]) -> int:
    """Speech tokens per segment lie in [2, 20] × its text tokens; each gives 960 samples."""
    assert chunks, "no audio"
    for chunk in chunks:
        assert chunk.dtype == np.float32 and chunk.ndim == 1
        assert np.isfinite(chunk).all() and np.abs(chunk).max() <= 0.99 + 1e-6
    total = sum(len(c) for c in chunks)
    assert total % SAMPLES_PER_TOKEN == 0
    tokens = total // SAMPLES_PER_TOKEN
    assert 2 * sum(counts) <= tokens <= 20 * sum(counts)
    assert float(np.sqrt(np.mean(np.concatenate(chunks) ** 2))) > 1e-3  # not silence
    return tokens


# ----------------------------------------------------------------------------- modes


def test_zero_shot(engine: CosyVoice2Engine, zh_prompt: Audio) -> None:
    text = "今天天气很好，我们去公园散步吧！"
    chunks = collect(engine, SynthesisRequest(Mode.ZERO_SHOT, text=text, prompt=zh_prompt,
                                              prompt_text=PROMPT_TEXT))
    assert_plausible(chunks, text_tokens(engine, text, tagged=False))


def test_cross_lingual(engine: CosyVoice2Engine, zh_prompt: Audio) -> None:
    text = "Hello there, this is a test of 3 things."
    chunks = collect(engine, SynthesisRequest(Mode.CROSS_LINGUAL, text=text, prompt=zh_prompt))
    assert_plausible(chunks, text_tokens(engine, text, tagged=True))


def test_instruct(engine: CosyVoice2Engine, en_prompt: Audio) -> None:
    text = "今天天气很好。"
    request = SynthesisRequest(Mode.INSTRUCT, text=text, prompt=en_prompt,
                               instruct_text="用四川话说这句话<|endofprompt|>")
    assert_plausible(collect(engine, request), text_tokens(engine, text, tagged=False))


def test_sft_with_a_preset(engine: CosyVoice2Engine) -> None:
    speakers = {s.id: s for s in engine.speakers()}
    assert speakers["中文女"].language == "zh" and not speakers["中文女"].registered
    assert speakers["英文男"].language == "en"
    text = "你好，世界。"
    chunks = collect(engine, SynthesisRequest(Mode.SFT, text=text, speaker_id="中文女"))
    assert_plausible(chunks, text_tokens(engine, text, tagged=True))


def test_voice_conversion_keeps_the_source_length(engine: CosyVoice2Engine, zh_prompt: Audio,
                                                  en_prompt: Audio) -> None:
    source = Audio(en_prompt.samples[: 2 * en_prompt.sample_rate], en_prompt.sample_rate)
    expected = engine.prompts.source_tokens(source.samples, source.sample_rate).shape[1]
    for stream in (True, False):
        chunks = collect(engine, SynthesisRequest(Mode.VOICE_CONVERSION, source=source,
                                                  prompt=zh_prompt, stream=stream))
        assert sum(len(c) for c in chunks) == expected * SAMPLES_PER_TOKEN
        assert all(np.isfinite(c).all() for c in chunks)


def test_long_text_is_segmented_and_streamed(engine: CosyVoice2Engine, zh_prompt: Audio) -> None:
    text = "我们今天学习了第3课，内容非常有趣。" * 6
    counts = text_tokens(engine, text, tagged=False)
    assert len(counts) > 1  # several LM segments
    request = SynthesisRequest(Mode.ZERO_SHOT, text=text, prompt=zh_prompt,
                               prompt_text=PROMPT_TEXT, stream=True)
    chunks = collect(engine, request)
    assert len(chunks) > len(counts)  # streaming: several chunks per segment
    streamed = assert_plausible(chunks, counts)
    whole = collect(engine, SynthesisRequest(Mode.ZERO_SHOT, text=text, prompt=zh_prompt,
                                             prompt_text=PROMPT_TEXT, stream=False))
    assert len(whole) == len(counts)  # one chunk per segment
    # Same seed, same tokens: streaming changes the chunking, not the length.
    assert assert_plausible(whole, counts) == streamed


def test_streaming_first_chunk_comes_early(engine: CosyVoice2Engine, zh_prompt: Audio,
                                           model_dirs: dict[str, Path]) -> None:
    text = "我们今天学习了第3课，内容非常有趣。" * 2
    request = SynthesisRequest(Mode.ZERO_SHOT, text=text, prompt=zh_prompt,
                               prompt_text=PROMPT_TEXT)
    first = next(iter(engine.synthesize(request, threading.Event())))
    # the first chunk holds DEFAULT_FIRST_CHUNK_TOKENS (no prompt padding: that is not a whole
    # attention chunk), less the 8 mel frames kept back for the cross-fade
    assert len(first) == DEFAULT_FIRST_CHUNK_TOKENS * SAMPLES_PER_TOKEN - 8 * 480
    # the reference's schedule (25 tokens + prompt padding to 25) starts later
    reference = CosyVoice2Engine.from_model_dir(model_dirs["presets"], threads=1, device="cpu",
                                                seed=5, first_chunk_tokens=25,
                                                precision="float32")
    first_reference = next(iter(reference.synthesize(request, threading.Event())))
    assert len(first_reference) > len(first)


def test_default_schedule_pads_the_prompt_only_for_whole_chunks() -> None:
    reference = StreamSchedule()  # the reference driver: 25 tokens, prompt padded to 25, x2, 100
    ours = default_schedule(chunk_size=25, first_chunk_tokens=25)
    assert (ours.first_hop, ours.growth, ours.max_hop) == (25, 2.0, 100)
    assert [ours.prompt_pad(p) for p in range(60)] == [reference.prompt_pad(p) for p in range(60)]
    assert all(default_schedule(25, 10).prompt_pad(p) == 0 for p in range(60))


def test_stream_prompt_is_aligned_to_end_past_an_attention_chunk() -> None:
    """Streams drop the start of the flow prompt so that only its look-ahead is left outside
    finished chunks (the first chunk then recomputes 3 prompt tokens, not up to 27)."""
    for length, kept in [(87, 78), (103, 103), (78, 78), (50, 28), (28, 28), (27, 27),
                         (10, 10), (130, 128)]:
        tokens = torch.arange(length, dtype=torch.int32)[None]
        feat = torch.arange(2 * length * 80, dtype=torch.float32).view(1, 2 * length, 80)
        new_tokens, new_feat = cv2_engine.align_stream_prompt(tokens, feat, 25, 3, 2)
        assert new_tokens.shape[1] == kept, length
        assert torch.equal(new_tokens, tokens[:, length - kept:])  # the end is kept
        assert torch.equal(new_feat, feat[:, 2 * (length - kept):])
        if kept >= 28:
            assert (kept - 3) % 25 == 0
    # features that are not ratio frames a token are left alone
    tokens, feat = torch.zeros(1, 87, dtype=torch.int32), torch.zeros(1, 170, 80)
    assert cv2_engine.align_stream_prompt(tokens, feat, 25, 3, 2)[0] is tokens


def test_speed_changes_the_length(engine: CosyVoice2Engine, zh_prompt: Audio) -> None:
    base = SynthesisRequest(Mode.ZERO_SHOT, text="你好，世界。", prompt=zh_prompt,
                            prompt_text=PROMPT_TEXT, stream=False)
    normal = sum(len(c) for c in collect(engine, base))
    fast = sum(len(c) for c in collect(engine, SynthesisRequest(**{**base.__dict__,
                                                                    "speed": 2.0})))
    frames = normal // 480
    assert fast == (frames // 2) * 480


def test_same_seed_same_audio_and_concurrency(engine: CosyVoice2Engine, zh_prompt: Audio,
                                              en_prompt: Audio) -> None:
    requests = [SynthesisRequest(Mode.ZERO_SHOT, text="今天天气很好。", prompt=zh_prompt,
                                 prompt_text=PROMPT_TEXT),
                SynthesisRequest(Mode.CROSS_LINGUAL, text="Nice weather today.",
                                 prompt=en_prompt, stream=False)]
    sequential = [np.concatenate(collect(engine, r)) for r in requests]
    again = np.concatenate(collect(engine, requests[0]))
    np.testing.assert_array_equal(again, sequential[0])
    with ThreadPoolExecutor(max_workers=2) as pool:
        parallel = list(pool.map(lambda r: np.concatenate(collect(engine, r)), requests * 2))
    for index, wav in enumerate(parallel):
        np.testing.assert_allclose(wav, sequential[index % 2], atol=1e-5)


def test_warm_up_changes_no_output(engine: CosyVoice2Engine, zh_prompt: Audio) -> None:
    """The service's warm-up stream (its own generator, no prompt) leaves every request's audio
    as it was, streamed or not."""
    requests = [SynthesisRequest(Mode.ZERO_SHOT, text="今天天气很好。", prompt=zh_prompt,
                                 prompt_text=PROMPT_TEXT),
                SynthesisRequest(Mode.ZERO_SHOT, text="今天天气很好。", prompt=zh_prompt,
                                 prompt_text=PROMPT_TEXT, stream=False)]
    before = [np.concatenate(collect(engine, r)) for r in requests]
    assert engine.warm_up(60) > 0
    for request, wav in zip(requests, before, strict=True):
        np.testing.assert_array_equal(np.concatenate(collect(engine, request)), wav)


def test_cancel_stops_between_chunks(engine: CosyVoice2Engine, zh_prompt: Audio) -> None:
    text = "我们今天学习了第3课，内容非常有趣。" * 4
    request = SynthesisRequest(Mode.ZERO_SHOT, text=text, prompt=zh_prompt,
                               prompt_text=PROMPT_TEXT)
    full = collect(engine, request)
    cancel = threading.Event()
    got = []
    for chunk in engine.synthesize(request, cancel):
        got.append(chunk)
        cancel.set()
    assert len(got) == 1 < len(full)
    cancel = threading.Event()
    cancel.set()
    assert collect(engine, request, cancel) == []


def test_bidirectional_text_stream(engine: CosyVoice2Engine, zh_prompt: Audio) -> None:
    pieces = ["Hello ", "there, ", "the ", "price ", "is ", "2", "5 ", "dollars. ",
              "See ", "you ", "soon."]
    request = SynthesisRequest(Mode.ZERO_SHOT, prompt=zh_prompt, prompt_text=PROMPT_TEXT)
    chunks = list(engine.synthesize_text_stream(request, iter(pieces), threading.Event()))
    assert chunks
    total = sum(len(c) for c in chunks)
    assert total % SAMPLES_PER_TOKEN == 0 and total > 10 * SAMPLES_PER_TOKEN
    assert all(np.isfinite(c).all() for c in chunks)
    # "2" + "5 " was normalised as one number, not digit by digit
    ids = list(engine._text_id_chunks(iter(pieces), engine._voice(request), threading.Event()))
    text = engine.tokenizer.decode([i for chunk in ids for i in chunk])
    assert "twenty five" in text and "two" not in text
    # Cutting at piece boundaries changes nothing the LM sees: the same ids as the whole text
    # (no lone space tokens, commas inside the text stay commas).
    for split in (pieces, ["今天天气很好，", "我们去公园", "散步吧，", "好不好？"]):
        ids = list(engine._text_id_chunks(iter(split), engine._voice(request), threading.Event()))
        whole = engine.tokenizer.encode(engine.text.normalize("".join(split)))
        assert [i for chunk in ids for i in chunk] == whole
    with pytest.raises(UnsupportedMode):
        list(engine.synthesize_text_stream(SynthesisRequest(Mode.VOICE_CONVERSION), iter([]),
                                           threading.Event()))


# ----------------------------------------------------------------------------- speakers


def test_no_presets_means_no_sft_until_a_speaker_is_registered(
        model_dirs: dict[str, Path], tmp_path: Path, zh_prompt: Audio) -> None:
    bare = CosyVoice2Engine.from_model_dir(model_dirs["bare"], threads=1, device="cpu",
                                           state_dir=tmp_path, seed=1)
    caps = bare.capabilities()
    assert Mode.SFT not in caps.modes and caps.unsupported_reasons[Mode.SFT] == NO_PRESETS
    assert caps.supports_speaker_registration and caps.sample_rate == 24000
    assert Mode.ZERO_SHOT in caps.modes and Mode.VOICE_CONVERSION in caps.modes
    with pytest.raises(UnsupportedMode, match="ships no preset speakers"):
        bare.validate(SynthesisRequest(Mode.SFT, text="你好", speaker_id="x"))
    speaker = bare.register_speaker("alice", zh_prompt, PROMPT_TEXT)
    assert speaker.registered and speaker.language == "zh"
    assert Mode.SFT in bare.capabilities().modes
    text = "今天天气很好。"
    chunks = collect(bare, SynthesisRequest(Mode.SFT, text=text, speaker_id="alice"))
    assert_plausible(chunks, text_tokens(bare, text, tagged=False))


def test_registered_speakers_persist_and_serve_every_prompt_mode(
        model_dirs: dict[str, Path], tmp_path: Path, zh_prompt: Audio, en_prompt: Audio) -> None:
    first = CosyVoice2Engine.from_model_dir(model_dirs["bare"], threads=1, device="cpu",
                                            state_dir=tmp_path, seed=2)
    first.register_speaker("bob", zh_prompt, PROMPT_TEXT, description="test voice")
    first.register_speaker("carol-2", en_prompt)  # no transcript
    files = sorted(p.name for p in (tmp_path / "speakers").iterdir())
    assert files == ["bob.safetensors", "carol-2.safetensors"]  # one file per speaker

    second = CosyVoice2Engine.from_model_dir(model_dirs["bare"], threads=1, device="cpu",
                                             state_dir=tmp_path, seed=2)
    speakers = {s.id: s for s in second.speakers()}
    assert set(speakers) == {"bob", "carol-2"}
    assert speakers["bob"].description == "test voice" and speakers["bob"].registered
    assert speakers["carol-2"].language == "und"
    stored, loaded = first.registry.get("bob"), second.registry.get("bob")
    assert torch.equal(stored.speech_tokens, loaded.speech_tokens)
    assert torch.equal(stored.embedding, loaded.embedding)
    assert loaded.prompt_text == stored.prompt_text == PROMPT_TEXT

    # A stored speaker is as good as the prompt it came from.
    request = SynthesisRequest(Mode.ZERO_SHOT, text="今天天气很好。", prompt=zh_prompt,
                               prompt_text=PROMPT_TEXT)
    by_prompt = np.concatenate(collect(second, request))
    by_id = np.concatenate(collect(second, SynthesisRequest(Mode.ZERO_SHOT, text="今天天气很好。",
                                                            speaker_id="bob")))
    np.testing.assert_allclose(by_id, by_prompt, atol=1e-5)
    for mode, extra in ((Mode.CROSS_LINGUAL, {}), (Mode.INSTRUCT, {"instruct_text": "慢一点说"}),
                        (Mode.SFT, {})):
        assert collect(second, SynthesisRequest(mode, text="Hi there.", speaker_id="carol-2",
                                                **extra))
    source = Audio(en_prompt.samples[: en_prompt.sample_rate], en_prompt.sample_rate)
    assert collect(second, SynthesisRequest(Mode.VOICE_CONVERSION, source=source,
                                            speaker_id="bob"))
    with pytest.raises(InvalidRequest, match="registered without a transcript"):
        second.validate(SynthesisRequest(Mode.ZERO_SHOT, text="hi", speaker_id="carol-2"))

    second.delete_speaker("bob")
    assert not (tmp_path / "speakers" / "bob.safetensors").exists()
    third = CosyVoice2Engine.from_model_dir(model_dirs["bare"], threads=1, device="cpu",
                                            state_dir=tmp_path)
    assert [s.id for s in third.speakers()] == ["carol-2"]
    with pytest.raises(UnknownSpeaker):
        third.delete_speaker("bob")


def test_speaker_registration_errors(engine: CosyVoice2Engine, zh_prompt: Audio) -> None:
    for bad in ("../etc/passwd", "a/b", "", ".hidden", "x" * 65, "a..b", "with space"):
        with pytest.raises(InvalidRequest, match="not valid"):
            engine.register_speaker(bad, zh_prompt, PROMPT_TEXT)
    with pytest.raises(InvalidRequest, match="already taken"):
        engine.register_speaker("中文女", zh_prompt, PROMPT_TEXT)
    with pytest.raises(InvalidRequest, match="preset"):
        engine.delete_speaker("中文女")
    short = Audio(zh_prompt.samples[:2400], zh_prompt.sample_rate)
    with pytest.raises(InvalidRequest, match="at least"):
        engine.register_speaker("shorty", short, "")
    engine.register_speaker("dave", zh_prompt, PROMPT_TEXT)
    with pytest.raises(InvalidRequest, match="already taken"):
        engine.register_speaker("dave", zh_prompt, PROMPT_TEXT)
    engine.register_speaker("dave", zh_prompt, "", replace=True)
    assert not engine.registry.get("dave").has_transcript
    engine.delete_speaker("dave")


def test_speaker_store_survives_damaged_files(tmp_path: Path) -> None:
    registry = SpeakerRegistry(tmp_path)
    profile = SpeakerProfile(id="erin", embedding=torch.randn(1, 192),
                             speech_tokens=torch.arange(10, dtype=torch.int32)[None],
                             speech_feat=torch.randn(1, 20, 80), prompt_text="hello",
                             registered=True)
    registry.add(profile)
    (tmp_path / "speakers" / "broken.json").write_text("{not json")
    (tmp_path / "speakers" / "mallory.json").write_text('{"format": 1, "id": "../mallory"}')
    reloaded = SpeakerRegistry(tmp_path)
    assert [p.id for p in reloaded.all()] == ["erin"]
    assert not list((tmp_path / "speakers").glob("*.tmp"))
    assert validate_speaker_id("Speaker_1.v2-x") == "Speaker_1.v2-x"
    assert validate_speaker_id("中文男") == "中文男"
    with pytest.raises(SpeakerError):
        validate_speaker_id("bad\nid")


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("fields, error, message", [
    ({"mode": Mode.ZERO_SHOT, "text": "  "}, InvalidRequest, "text is empty"),
    ({"mode": Mode.ZERO_SHOT, "text": "x" * 2001}, InvalidRequest, "the limit is 2000"),
    ({"mode": Mode.ZERO_SHOT, "text": "hi"}, InvalidRequest, "needs prompt audio"),
    ({"mode": Mode.ZERO_SHOT, "text": "hi", "prompt": "zh"}, InvalidRequest, "prompt_text"),
    ({"mode": Mode.CROSS_LINGUAL, "text": "hi", "speaker_id": "nobody"}, UnknownSpeaker,
     "unknown speaker 'nobody'"),
    ({"mode": Mode.SFT, "text": "hi"}, InvalidRequest, "sft needs speaker_id"),
    ({"mode": Mode.INSTRUCT, "text": "hi", "prompt": "zh"}, InvalidRequest, "instruct_text"),
    ({"mode": Mode.VOICE_CONVERSION, "prompt": "zh"}, InvalidRequest, "source audio"),
    ({"mode": Mode.CROSS_LINGUAL, "text": "hi", "prompt": "zh", "speed": 3.0}, InvalidRequest,
     "speed 3.0"),
    ({"mode": Mode.CROSS_LINGUAL, "text": "hi", "prompt": "long"}, InvalidRequest,
     "at most 30 s"),
    ({"mode": Mode.CROSS_LINGUAL, "text": "hi", "prompt": "stereo"}, InvalidRequest, "mono"),
    ({"mode": Mode.CROSS_LINGUAL, "text": "hi", "prompt": "silent"}, InvalidRequest, "silent"),
    ({"mode": Mode.VOICE_CONVERSION, "prompt": "zh", "source": "tiny"}, InvalidRequest,
     "source audio is"),
])
def test_bad_requests_are_refused_up_front(engine: CosyVoice2Engine, zh_prompt: Audio,
                                           fields: dict, error: type, message: str) -> None:
    voice = synthetic_voice(1.0, 150.0, 16000, seed=0)
    audio = {"zh": zh_prompt, "long": Audio(np.tile(voice, 31), 16000),
             "stereo": Audio(np.stack([voice, voice], axis=1), 16000),
             "silent": Audio(np.zeros(16000, np.float32), 16000),
             "tiny": Audio(voice[:1600], 16000)}
    for key in ("prompt", "source"):
        if key in fields:
            fields = {**fields, key: audio[fields[key]]}
    request = SynthesisRequest(**fields)
    with pytest.raises(error, match=message):
        engine.validate(request)
    with pytest.raises(error, match=message):  # synthesize validates before any work
        next(iter(engine.synthesize(request, threading.Event())))


def test_text_without_speakable_content(engine: CosyVoice2Engine, zh_prompt: Audio) -> None:
    request = SynthesisRequest(Mode.CROSS_LINGUAL, text="。。！", prompt=zh_prompt)
    with pytest.raises(InvalidRequest, match="nothing to speak"):
        collect(engine, request)


def test_device_choice(model_dirs: dict[str, Path]) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present: 'cuda' is a valid choice here")
    with pytest.raises(ValueError, match="CUDA is not available"):
        CosyVoice2Engine.from_model_dir(model_dirs["bare"], device="cuda")
    with pytest.raises(ValueError, match="unknown device"):
        CosyVoice2Engine.from_model_dir(model_dirs["bare"], device="tpu")
    auto = CosyVoice2Engine.from_model_dir(model_dirs["bare"], threads=1, device="auto")
    assert auto.models.device.type == "cpu" and auto.models.precision is not None
    # the CPU default (see precision.py): bfloat16 with AMX, else weight-only int8 LM
    assert auto.models.precision.name in ("int8w", "bfloat16")


def test_registered_speaker_streams_from_its_flow_prompt_cache(
        model_dirs: dict[str, Path], tmp_path: Path, zh_prompt: Audio, en_prompt: Audio,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Registration computes the prompt's share of the flow once; streams that start from it
    give exactly the samples of streams that compute it themselves."""
    engine = CosyVoice2Engine.from_model_dir(model_dirs["bare"], threads=1, device="cpu",
                                             state_dir=tmp_path, seed=3)
    engine.register_speaker("erin", zh_prompt, PROMPT_TEXT)
    cache = engine.flow_prompt_cache_of("erin")
    assert cache is not None and cache.frames > 0 and len(engine.flow_prompt_caches) == 1
    source = Audio(en_prompt.samples[: 3 * en_prompt.sample_rate], en_prompt.sample_rate)
    requests = [SynthesisRequest(Mode.ZERO_SHOT, text="今天天气很好，我们去公园散步吧！",
                                 speaker_id="erin"),
                SynthesisRequest(Mode.VOICE_CONVERSION, source=source, speaker_id="erin")]
    cached = [collect(engine, r) for r in requests]
    monkeypatch.setattr(cv2_engine, "FLOW_PROMPT_CACHES", 0)
    uncached = [collect(engine, r) for r in requests]
    for with_cache, without in zip(cached, uncached, strict=True):
        assert len(with_cache) == len(without) >= 2
        assert all(np.array_equal(a, b) for a, b in zip(with_cache, without, strict=True))
    engine.register_speaker("erin", en_prompt, "", replace=True)  # a new voice, a new cache
    monkeypatch.setattr(cv2_engine, "FLOW_PROMPT_CACHES", 4)
    collect(engine, SynthesisRequest(Mode.CROSS_LINGUAL, text="Hi there.", speaker_id="erin"))
    new = engine.flow_prompt_cache_of("erin")
    assert new is not None and new is not cache and len(engine.flow_prompt_caches) == 2
    engine.delete_speaker("erin")
    assert engine.flow_prompt_caches.values() == [cache]  # the deleted voice's cache is gone


def test_flow_prompt_caches_are_kept_by_content_within_their_bytes(
        model_dirs: dict[str, Path], tmp_path: Path, zh_prompt: Audio,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A stored speaker and requests sending the recording it was made from share one flow
    prompt cache; the caches kept stay within FLOW_PROMPT_CACHE_BYTES (the least recently used
    go), and a prompt whose cache alone is larger is not kept, its audio unchanged."""
    engine = CosyVoice2Engine.from_model_dir(model_dirs["bare"], threads=1, device="cpu",
                                             state_dir=tmp_path, seed=3)
    engine.register_speaker("erin", zh_prompt, PROMPT_TEXT)
    stored = engine.flow_prompt_cache_of("erin")
    assert stored is not None
    used: list[object] = []
    new_stream_cache = engine.models.flow.new_stream_cache
    monkeypatch.setattr(engine.models.flow, "new_stream_cache",
                        lambda max_bytes, prompt_cache=None: used.append(prompt_cache)
                        or new_stream_cache(max_bytes, prompt_cache))
    request = SynthesisRequest(Mode.ZERO_SHOT, text="今天天气很好。", prompt=zh_prompt,
                               prompt_text=PROMPT_TEXT)
    for _ in range(2):
        collect(engine, request)
    assert used == [None, stored] and len(engine.flow_prompt_caches) == 1
    # a bound below two caches: the least recently used goes
    size = stored.nbytes()
    bounded = CosyVoice2Engine.from_model_dir(model_dirs["bare"], threads=1, device="cpu",
                                              state_dir=tmp_path / "b", seed=3)
    bounded.flow_prompt_caches = cv2_engine.flow_prompt_cache_store(int(size * 1.5))
    bounded.register_speaker("erin", zh_prompt, PROMPT_TEXT)
    louder = Audio(zh_prompt.samples * 0.5, zh_prompt.sample_rate)  # another cache, same size
    bounded.register_speaker("olaf", louder, PROMPT_TEXT)
    assert bounded.flow_prompt_cache_of("erin") is None
    assert bounded.flow_prompt_cache_of("olaf") is not None
    assert bounded.flow_prompt_caches.nbytes <= size * 1.5
    # a bound below one cache: nothing kept, the same samples as with the cache
    bounded.flow_prompt_caches = cv2_engine.flow_prompt_cache_store(size // 2)
    speaker_request = SynthesisRequest(Mode.ZERO_SHOT, text="今天天气很好。", speaker_id="erin")
    got, want = collect(bounded, speaker_request), collect(engine, speaker_request)
    assert len(bounded.flow_prompt_caches) == 0 and len(got) == len(want) >= 1
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))


def test_prompt_audio_sent_again_is_not_encoded_or_flowed_again(
        model_dirs: dict[str, Path], zh_prompt: Audio, en_prompt: Audio,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A request's prompt recording is kept by content: sent again (as clients of the reference
    service do with every request), it is not encoded again, and from its second time on its
    stream goes on from the prompt's flow cache; the samples are those of an engine that
    caches nothing, bit for bit, in every prompt mode. The least recently sent prompt goes
    first."""
    cached = CosyVoice2Engine.from_model_dir(model_dirs["bare"], threads=1, device="cpu", seed=3)
    monkeypatch.setattr(cv2_engine, "PROMPT_AUDIO_CACHES", 0)
    bare = CosyVoice2Engine.from_model_dir(model_dirs["bare"], threads=1, device="cpu", seed=3)
    assert len(cached.prompt_audio) == 0 and bare.prompt_audio.capacity == 0
    encoded: list[int] = []
    encode = cached.prompts.encode
    monkeypatch.setattr(cached.prompts, "encode",
                        lambda samples, rate: encoded.append(len(samples)) or encode(samples, rate))
    requests = [SynthesisRequest(Mode.ZERO_SHOT, text="今天天气很好，我们去公园散步吧！",
                                 prompt=zh_prompt, prompt_text=PROMPT_TEXT),
                SynthesisRequest(Mode.CROSS_LINGUAL, text="See you soon.", prompt=zh_prompt),
                SynthesisRequest(Mode.ZERO_SHOT, text="今天天气很好。", prompt=zh_prompt,
                                 prompt_text=PROMPT_TEXT, stream=False)]
    for request in requests * 2:
        got, want = collect(cached, request), collect(bare, request)
        assert len(got) == len(want) >= 1
        assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
    assert len(encoded) == 1 and cached.prompt_audio.hits == 5
    entry = cached.prompt_audio.get(prompt_key(zh_prompt.samples, zh_prompt.sample_rate))
    assert entry is not None and entry.uses > 1
    (flow_cache,) = cached.flow_prompt_caches.values()  # from its second time on
    assert flow_cache.frames > 0
    # the same samples at another rate, and other prompts: new entries; the oldest goes
    other_rate = Audio(zh_prompt.samples, zh_prompt.sample_rate // 2)
    for prompt in (other_rate, en_prompt):
        collect(cached, SynthesisRequest(Mode.CROSS_LINGUAL, text="Hi.", prompt=prompt))
    assert len(encoded) == 3 and len(cached.prompt_audio) == 2
    assert cached.prompt_audio.get(prompt_key(zh_prompt.samples, zh_prompt.sample_rate)) is None
