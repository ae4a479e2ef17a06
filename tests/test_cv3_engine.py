"""The CosyVoice 3 engine on a generated (random-weight) model directory.

The audio is noise; what is checked is what CosyVoice 3 does differently from CosyVoice 2 — the
LM prompt layouts (system text, ``<|endofprompt|>``, instruct2), the pronunciation tokens, the
silence thinning, speakers tagged with their features — and that every mode, streaming, text
streaming and registration work end to end. The shared request handling is tested in
``test_cv2_engine.py``.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from safetensors import safe_open

from tts_core.cosyvoice2.speakers import SpeakerProfile, SpeakerRegistry
from tts_core.cosyvoice3.engine import SYSTEM_PROMPT, TRAINED_INSTRUCTIONS, CosyVoice3Engine
from tts_core.cosyvoice3.llm import SILENT_TOKENS
from tts_core.engine import (
    Audio,
    Mode,
    SpeakerExists,
    SynthesisRequest,
    UnknownSpeaker,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PROMPT_TEXT = "希望你以后能够做的比我还好呦。"
TEXT = "收到好友从远方寄来的生日礼物。"
SAMPLES_PER_TOKEN = 960

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def zh_prompt() -> Audio:
    samples, rate = soundfile.read(SHARED / "audio" / "zero_shot_prompt.wav", dtype="float32")
    return Audio(samples, rate)


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cv3-state")


@pytest.fixture(scope="module")
def engine(cv3_model_dir: Path, state_dir: Path) -> CosyVoice3Engine:
    # float32: what these tests check does not depend on the numerics, and random tiny models'
    # sampled lengths do (auto quantises the LM on CPU)
    return CosyVoice3Engine.from_model_dir(cv3_model_dir, threads=1, device="cpu",
                                           state_dir=state_dir, seed=5, precision="float32")


def run(engine: CosyVoice3Engine, request: SynthesisRequest) -> list[np.ndarray]:
    return list(engine.synthesize(request, threading.Event()))


def samples(chunks: list[np.ndarray]) -> int:
    total = sum(len(c) for c in chunks)
    assert total > 0 and total % SAMPLES_PER_TOKEN == 0
    assert all(np.isfinite(c).all() and np.abs(c).max() <= 0.99 + 1e-6 for c in chunks)
    return total


def ids(engine: CosyVoice3Engine, text: str) -> list[int]:
    return engine.tokenizer.encode(text)


# ----------------------------------------------------------------------------- prompt layouts


def test_zero_shot_prompt_has_the_system_text(engine: CosyVoice3Engine, zh_prompt: Audio) -> None:
    voice = engine._voice(SynthesisRequest(Mode.ZERO_SHOT, text=TEXT, prompt=zh_prompt,
                                           prompt_text=PROMPT_TEXT))
    system = ids(engine, SYSTEM_PROMPT + "<|endofprompt|>")
    assert voice.lm_prompt_text_ids == system + ids(engine, engine.text.normalize(PROMPT_TEXT))
    assert len(voice.lm_prompt_tokens) > 0 and not voice.tag_language
    # a transcript that already carries the separator is used as given
    given = f"You are a helpful assistant.<|endofprompt|>{PROMPT_TEXT}"
    voice = engine._voice(SynthesisRequest(Mode.ZERO_SHOT, text=TEXT, prompt=zh_prompt,
                                           prompt_text=given))
    assert voice.lm_prompt_text_ids == ids(engine, given)


def test_cross_lingual_and_instruct_prompts(engine: CosyVoice3Engine, zh_prompt: Audio) -> None:
    voice = engine._voice(SynthesisRequest(Mode.CROSS_LINGUAL, text=TEXT, prompt=zh_prompt))
    assert voice.lm_prompt_text_ids == ids(engine, SYSTEM_PROMPT + "<|endofprompt|>")
    assert voice.lm_prompt_tokens == [] and not voice.tag_language
    instruction = TRAINED_INSTRUCTIONS[0]
    voice = engine._voice(SynthesisRequest(Mode.INSTRUCT, text=TEXT, prompt=zh_prompt,
                                           instruct_text=instruction))
    official = f"You are a helpful assistant. {instruction}<|endofprompt|>"  # the trained form
    assert voice.lm_prompt_text_ids == ids(engine, official)
    assert voice.lm_prompt_tokens == []  # instruct2: no prompt speech in the LM
    voice = engine._voice(SynthesisRequest(Mode.INSTRUCT, text=TEXT, prompt=zh_prompt,
                                           instruct_text=f" {official} "))
    assert voice.lm_prompt_text_ids == ids(engine, official)  # verbatim, space kept


def test_pronunciation_tokens_reach_the_lm_whole(engine: CosyVoice3Engine) -> None:
    text = "高管对报道[j][ǐ]予好评, I [R][EH1][D] it."
    spoken = engine.text.normalize(text)
    assert "[j][ǐ]" in spoken and "[R][EH1][D]" in spoken
    token_ids = ids(engine, spoken)
    for token in ("[j]", "[ǐ]", "[R]", "[EH1]", "[D]"):
        assert engine.tokenizer.token_to_id(token) in token_ids


def test_long_silences_are_thinned() -> None:
    silent = sorted(SILENT_TOKENS)[0]
    engine = CosyVoice3Engine.__new__(CosyVoice3Engine)  # the hook needs no model
    assert list(engine._lm_tokens(iter([7, *[silent] * 9, 8]))) == [7, *[silent] * 5, 8]


# ----------------------------------------------------------------------------- modes


@pytest.mark.parametrize("mode, fields", [
    (Mode.ZERO_SHOT, {"prompt_text": PROMPT_TEXT}),
    (Mode.CROSS_LINGUAL, {}),
    (Mode.INSTRUCT, {"instruct_text": TRAINED_INSTRUCTIONS[-5]}),
])
def test_modes_stream_and_one_shot_agree_in_length(engine: CosyVoice3Engine, zh_prompt: Audio,
                                                   mode: Mode, fields: dict) -> None:
    text = "收到好友从远方寄来的生日礼物，那份意外的惊喜让我心中充满了甜蜜。"
    whole = run(engine, SynthesisRequest(mode, text=text, prompt=zh_prompt, stream=False,
                                         **fields))
    streamed = run(engine, SynthesisRequest(mode, text=text, prompt=zh_prompt, stream=True,
                                            **fields))
    # same seed, same speech tokens: the same number of samples, in more chunks when streamed
    assert samples(whole) == samples(streamed)
    n_text = sum(len(ids(engine, s)) for s in engine.text.segments(text))
    assert samples(whole) // SAMPLES_PER_TOKEN >= 2 * n_text  # min_len: stop ids refused
    assert len(streamed) >= 2


def test_sft_preset_and_voice_conversion(engine: CosyVoice3Engine, zh_prompt: Audio) -> None:
    assert {"中文女", "英文男"} <= {s.id for s in engine.speakers()}
    assert samples(run(engine, SynthesisRequest(Mode.SFT, text=TEXT, speaker_id="中文女")))
    source = Audio(zh_prompt.samples[: 2 * zh_prompt.sample_rate], zh_prompt.sample_rate)
    expected = engine.prompts.source_tokens(source.samples, source.sample_rate).shape[1]
    for stream in (True, False):  # no LM: every source token is vocoded, silent ones too
        converted = run(engine, SynthesisRequest(Mode.VOICE_CONVERSION, prompt=zh_prompt,
                                                 source=source, stream=stream))
        assert samples(converted) == expected * SAMPLES_PER_TOKEN


def test_text_stream(engine: CosyVoice3Engine, zh_prompt: Audio) -> None:
    pieces = ["收到好友", "从远方寄来的", "生日礼物，", "那份意外的惊喜", "让我心中充满了甜蜜。"]
    for mode, fields in ((Mode.ZERO_SHOT, {"prompt_text": PROMPT_TEXT}),
                         (Mode.CROSS_LINGUAL, {}),
                         (Mode.INSTRUCT, {"instruct_text": TRAINED_INSTRUCTIONS[1]})):
        request = SynthesisRequest(mode, text="", prompt=zh_prompt, stream=True, **fields)
        chunks = list(engine.synthesize_text_stream(request, iter(pieces), threading.Event()))
        assert samples(chunks) and len(chunks) >= 2, mode


def test_capabilities(engine: CosyVoice3Engine) -> None:
    caps = engine.capabilities()
    assert caps.engine == "cosyvoice3" and caps.sample_rate == 24000
    assert caps.modes == frozenset(Mode) and caps.supports_text_streaming


# ----------------------------------------------------------------------------- speakers


def test_registration_persists_and_is_tagged(engine: CosyVoice3Engine, zh_prompt: Audio,
                                             cv3_model_dir: Path, state_dir: Path) -> None:
    engine.register_speaker("alice", zh_prompt, PROMPT_TEXT, language="zh")
    with safe_open(str(state_dir / "speakers" / "alice.safetensors"), framework="pt") as stored:
        assert stored.metadata()["features"] == "cosyvoice3"
    again = CosyVoice3Engine.from_model_dir(cv3_model_dir, threads=1, device="cpu",
                                            state_dir=state_dir, seed=5, precision="float32")
    assert "alice" in {s.id for s in again.speakers()}
    request = SynthesisRequest(Mode.ZERO_SHOT, text=TEXT, speaker_id="alice")
    assert samples(run(again, request)) == samples(run(engine, request))
    # a CosyVoice 2 engine on the same state directory does not take the CosyVoice 3 speaker
    cv2_store = SpeakerRegistry(state_dir, features="cosyvoice2")
    assert cv2_store.get("alice") is None and cv2_store.foreign_features("alice") == "cosyvoice3"


def test_cosyvoice2_speaker_is_refused_not_reused(engine: CosyVoice3Engine, zh_prompt: Audio,
                                                  cv3_model_dir: Path, tmp_path: Path) -> None:
    # a speaker stored by the CosyVoice 2 engine (same store, its features)
    features = engine.prompts.encode(zh_prompt.samples, zh_prompt.sample_rate)
    SpeakerRegistry(tmp_path, features="cosyvoice2").add(SpeakerProfile(
        id="bob", embedding=features.embedding, speech_tokens=features.speech_tokens,
        speech_feat=features.speech_feat, prompt_text=PROMPT_TEXT, registered=True))
    cv3 = CosyVoice3Engine.from_model_dir(cv3_model_dir, threads=1, device="cpu",
                                          state_dir=tmp_path, seed=5)
    assert "bob" not in {s.id for s in cv3.speakers()}
    with pytest.raises(UnknownSpeaker, match="cosyvoice2 features.*register the voice again"):
        cv3.validate(SynthesisRequest(Mode.ZERO_SHOT, text=TEXT, speaker_id="bob"))
    with pytest.raises(SpeakerExists, match="cosyvoice2 features"):
        cv3.register_speaker("bob", zh_prompt, PROMPT_TEXT)
    cv3.register_speaker("bob", zh_prompt, PROMPT_TEXT, replace=True)  # re-registered: usable
    assert samples(run(cv3, SynthesisRequest(Mode.ZERO_SHOT, text=TEXT, speaker_id="bob")))


def test_streaming_dit_cache_does_not_change_the_audio(engine: CosyVoice3Engine,
                                                       zh_prompt: Audio) -> None:
    """The engine streams with the per-request DiT cache; recomputing every chunk from the first
    frame must give the same samples, bit for bit."""
    text = "收到好友从远方寄来的生日礼物，那份意外的惊喜让我心中充满了甜蜜。"
    request = SynthesisRequest(Mode.ZERO_SHOT, text=text, prompt=zh_prompt, stream=True,
                               prompt_text=PROMPT_TEXT)
    assert engine.token2wav.dit_cache
    cached = run(engine, request)
    engine.token2wav.dit_cache = False
    try:
        recomputed = run(engine, request)
    finally:
        engine.token2wav.dit_cache = True
    assert len(cached) == len(recomputed) >= 2
    for a, b in zip(cached, recomputed, strict=True):
        assert np.array_equal(a, b)
