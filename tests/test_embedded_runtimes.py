"""Where the Kokoro model runs: both runtimes, the graph edits the OpenVINO one runs, the choice.

The edits change the numbers (activations no longer rounded to 8 bits; a little more silence at
the end, which moves the decoder's instance-norm statistics), so what is checked is what a
listener gets: the same durations, the same words heard (Whisper), the speech where it was.
"""

from __future__ import annotations

import functools
import threading
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.asr import error_rate, median_pitch_hz, transcribe, word_error_rate
from tts_core.embedded import assets, frontend, graph_edits, runners
from tts_core.embedded.engine import EmbeddedEngine
from tts_core.engine import Mode, SynthesisRequest

RATE = 24000
SENTENCE = "Fresh bread from the bakery is still warm in the morning."


@pytest.fixture(scope="module")
def published() -> onnx.ModelProto:
    return onnx.load(str(assets.ensure_model_file()))


def feeds(text: str = SENTENCE, voice: str = "af_heart", speed: float = 1.0) -> dict:
    ids = frontend.to_token_ids(frontend.phonemize(text, "en"), assets.load_vocab())
    return {"tokens": np.array([[0, *ids, 0]], np.int64),
            "style": assets.load_voices()[voice].style_for(len(ids)),
            "speed": np.array([speed], np.float32)}


def run(model: onnx.ModelProto, inputs: dict) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, inputs)[0].ravel()


def speech_span(audio: np.ndarray) -> tuple[int, int]:
    loud = np.flatnonzero(np.abs(audio) > 0.005)
    return int(loud[0]), int(loud[-1])


def test_float_convolutions_replace_every_integer_one_and_say_the_same(published):
    model = onnx.ModelProto()
    model.CopyFrom(published)
    assert graph_edits.dequantize_convs(model) == 87
    ops = {n.op_type for n in model.graph.node}
    assert "ConvInteger" not in ops and "Conv" in ops
    assert [i.name for i in model.graph.input] == ["tokens", "style", "speed"]
    before, after = run(published, feeds()), run(model, feeds())
    assert len(after) == len(before)  # the durations come out the same
    start, end = speech_span(before)
    assert abs(speech_span(after)[0] - start) < 0.05 * RATE
    assert abs(speech_span(after)[1] - end) < 0.05 * RATE
    assert word_error_rate(SENTENCE, transcribe(after, RATE)) == 0


@pytest.mark.parametrize("speed", [0.8, 1.0, 1.3])
def test_rounded_frames_add_only_trailing_silence(published, speed):
    model = onnx.ModelProto()
    model.CopyFrom(published)
    graph_edits.round_up_frames(model, 8)
    before, after = run(published, feeds(speed=speed)), run(model, feeds(speed=speed))
    block = 8 * graph_edits.FRAME_SAMPLES
    assert len(after) % block == 0 and len(before) <= len(after) < len(before) + block
    assert np.abs(after[len(before):]).max() < 0.005  # what was added is silence
    start, end = speech_span(before)
    assert abs(speech_span(after)[0] - start) < 0.05 * RATE
    assert abs(speech_span(after)[1] - end) < 0.05 * RATE


def test_polynomial_snake_sines_replace_only_the_squared_ones(published):
    model = onnx.ModelProto()
    model.CopyFrom(published)
    assert graph_edits.polynomial_snake_sines(model) == 48
    left = [n.name for n in model.graph.node if n.op_type == "Sin"]
    assert left and all("generator" in name for name in left)  # source and iSTFT phases
    y = np.linspace(-60, 60, 200001)
    r = y - np.pi * np.round(y / np.pi)
    poly = np.polyval(graph_edits._SINE_TERMS, r * r) * r
    assert np.abs(poly ** 2 - np.sin(y) ** 2).max() < 1e-5
    after = run(model, feeds())
    assert word_error_rate(SENTENCE, transcribe(after, RATE)) == 0


def stft_graph(shape: list[int]) -> onnx.ModelProto:
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(20) / 20)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("STFT", ["x", "step", "window", "length"], ["y"], onesided=1)],
        "stft", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(np.array(5, np.int64), "step"),
         onnx.numpy_helper.from_array(window, "window"),
         onnx.numpy_helper.from_array(np.array(20, np.int64), "length")])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 20)])


@pytest.mark.parametrize("shape", [[1, 203], [2, 203, 1]])
def test_stft_as_convolution_computes_the_same_spectrum(shape):
    model = stft_graph(shape)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    before = run(model, {"x": x})
    assert graph_edits.stft_as_convolution(model) == 1
    assert "STFT" not in {n.op_type for n in model.graph.node}
    after = run(model, {"x": x})
    np.testing.assert_allclose(after, before, atol=1e-4)


def test_integer_source_phase_keeps_the_pitch_and_the_words(published):
    """Exact in float32 too: the phase is only moved by a constant (half a frame)."""
    model = onnx.ModelProto()
    model.CopyFrom(published)
    assert graph_edits.integer_source_phase(model)
    assert "CumSum" in {n.op_type for n in model.graph.node if n.name == ""}
    inputs = feeds(voice="am_michael")
    before, after = run(published, inputs), run(model, inputs)
    assert len(after) == len(before)
    assert abs(median_pitch_hz(after, RATE) / median_pitch_hz(before, RATE) - 1) < 0.05
    assert word_error_rate(SENTENCE, transcribe(after, RATE)) == 0


def test_round_up_frames_refuses_a_graph_without_duration_rounding():
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
                                   [onnx.helper.make_tensor_value_info("x", 1, [1])],
                                   [onnx.helper.make_tensor_value_info("y", 1, [1])])
    with pytest.raises(ValueError, match="no duration rounding"):
        graph_edits.round_up_frames(onnx.helper.make_model(graph), 8)
    with pytest.raises(ValueError, match="at least 1"):
        graph_edits.round_up_frames(onnx.helper.make_model(graph), 0)


RUNTIMES = ["onnxruntime"] + (["openvino"] if runners.has_bfloat16_cpu() else [])


@pytest.fixture(scope="module", params=RUNTIMES)
def engine(request, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(assets.CACHE_ENV, str(tmp_path_factory.mktemp("cache")))
        yield EmbeddedEngine(threads=2, runtime=request.param)


def speak(engine: EmbeddedEngine, text: str, speaker: str) -> np.ndarray:
    request = SynthesisRequest(Mode.SFT, text=text, speaker_id=speaker)
    return np.concatenate(list(engine.synthesize(request, threading.Event())))


@pytest.mark.parametrize("speaker", ["英文女", "英文男", "中文男"])
def test_each_runtime_is_understood_with_the_voice_s_pitch(engine, speaker):
    """The bfloat16 runtime once moved a male voice an octave up (the source's phase): its
    pitch must match the published model's on onnxruntime, not just lie on the right side."""
    text = {"中文男": "我们下个月二十号出发去上海旅游。"}.get(speaker, SENTENCE)
    language = "zh" if speaker == "中文男" else "en"
    audio = speak(engine, text, speaker)
    heard = transcribe(audio, RATE, language)
    assert error_rate(text, heard, language) <= 0.1, heard
    if engine.runtime != "onnxruntime":
        reference = speak(reference_engine(), text, speaker)
        ratio = median_pitch_hz(audio, RATE) / median_pitch_hz(reference, RATE)
        assert abs(ratio - 1) < 0.1, f"pitch {ratio:.2f}x the published model's"


@functools.lru_cache(maxsize=1)
def reference_engine() -> EmbeddedEngine:
    return EmbeddedEngine(threads=2, runtime="onnxruntime")


def test_each_runtime_stops_on_cancel_and_serves_on(engine):
    """A long single piece (no sentence break for 200 tokens) is one model call of seconds:
    onnxruntime must end it within a fraction of that; OpenVINO finishes the call (its cancel
    broke later calls) and drops the result."""
    text = "and then the river " * 40
    voice = engine.voice("af_heart")
    ids = frontend.to_token_ids(frontend.phonemize(text, "en"), engine._vocab)[:240]
    started = time.perf_counter()
    assert engine._infer(ids, voice, 1.0) is not None
    whole = time.perf_counter() - started
    cancel = threading.Event()
    threading.Timer(0.1, cancel.set).start()
    started = time.perf_counter()
    assert engine._infer(ids, voice, 1.0, cancel) is None
    stopped = time.perf_counter() - started
    bound = 0.1 + (0.5 if engine.runtime == "onnxruntime" else 1.5) * whole
    assert stopped < bound, f"stopped after {stopped:.2f} s of a {whole:.2f} s call"
    # and the runtime still serves, whatever the next length and wherever the cancel fell
    # (OpenVINO once kept a stopped request's shapes: every later call failed)
    for delay in (0.01, 0.05, 0.3):
        cancel = threading.Event()
        threading.Timer(delay, cancel.set).start()
        engine._infer(ids, voice, 1.0, cancel)
        for size in (20, 60):
            assert engine._infer(ids[:size], voice, 1.0) is not None


def test_runtime_choice(monkeypatch):
    monkeypatch.setenv(runners.RUNTIME_ENV, "tensorflow")
    with pytest.raises(ValueError, match="COSYVOICE_EMBEDDED_RUNTIME.*onnxruntime, openvino"):
        runners.choose_runtime()
    monkeypatch.setenv(runners.RUNTIME_ENV, "OpenVINO")
    if runners.has_bfloat16_cpu():
        assert runners.choose_runtime() == "openvino"
    else:
        with pytest.raises(ValueError, match="bfloat16 units"):
            runners.choose_runtime()
    monkeypatch.delenv(runners.RUNTIME_ENV)
    assert runners.choose_runtime() == "onnxruntime"  # the default
    assert runners.choose_runtime("onnxruntime") == "onnxruntime"


def test_openvino_without_a_writable_cache_falls_back_to_onnxruntime(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv(assets.CACHE_ENV, str(blocker / "cache"))
    runner = runners.open_runner(threads=1, runtime="openvino")
    assert runner.name == "onnxruntime"
    assert runner.run(feeds("Hi."), threading.Event()).size > 0


@pytest.mark.skipif("openvino" not in RUNTIMES, reason="needs bfloat16 units for OpenVINO")
def test_a_damaged_edited_model_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    xml = runners.edited_model()
    weights = xml.with_suffix(".bin")
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # a copy cut short
    assert runners.edited_model() == xml and weights.read_bytes() == good
    xml.write_text(xml.read_text().replace("Conv", "Cnv", 1))  # an edited description
    runners.edited_model()
    assert runners.OpenVinoRunner(threads=1).run(feeds("Hi."), threading.Event()).size > 0


@pytest.mark.skipif("openvino" not in RUNTIMES, reason="needs bfloat16 units for OpenVINO")
def test_a_call_that_comes_back_non_finite_is_run_again_on_onnxruntime(tmp_path, monkeypatch):
    """bfloat16 made one tuning sentence in about seventy NaN; the runner must catch that. The
    fault is injected into the real runner's first answer; the rerun is the real onnxruntime."""
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    runner = runners.OpenVinoRunner(threads=2)
    real = runner._run

    def first_answer_nan(inputs, cancel):
        audio = real(inputs, cancel)
        audio[len(audio) // 2] = np.nan
        return audio

    monkeypatch.setattr(runner, "_run", first_answer_nan)
    inputs = feeds()
    audio = runner.run(inputs, threading.Event())
    assert np.isfinite(audio).all() and runner.fallbacks == 1
    np.testing.assert_array_equal(audio, runners.OnnxRuntimeRunner(2).run(inputs,
                                                                            threading.Event()))


@pytest.mark.skipif("openvino" not in RUNTIMES, reason="needs bfloat16 units for OpenVINO")
def test_openvino_server_keeps_serving_clients_that_hang_up(launch_stack, monkeypatch):
    """Through Envoy and the gRPC server: clients that close after the first audio leave their
    calls cancelled mid-run; every later call must still be served (a cancelled OpenVINO
    request once broke all later ones with a 500)."""
    import requests

    monkeypatch.setenv(runners.RUNTIME_ENV, "openvino")
    stack = launch_stack()
    form = {"tts_text": "Good evening, and welcome back. Tonight we look at how rivers shape "
                        "the land.", "spk_id": "英文女"}
    for pause in (0.2, 1.0, 0.2, 1.0):
        time.sleep(pause)
        with requests.post(f"{stack.rest_url}/inference_sft", data=form, stream=True,
                           headers=stack.headers, timeout=120) as reply:
            assert reply.status_code == 200, reply.text[:300]
            assert next(piece for piece in reply.iter_content(chunk_size=None) if piece)
    reply = requests.post(f"{stack.rest_url}/inference_sft", data=form,
                          headers=stack.headers, timeout=120)
    assert reply.status_code == 200 and len(reply.content) > 2 * 22050
