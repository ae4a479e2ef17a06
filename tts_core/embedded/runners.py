"""Where the Kokoro model runs: onnxruntime on the published int8 model (the default), or
OpenVINO in bfloat16 (``$COSYVOICE_EMBEDDED_RUNTIME=openvino``, CPUs with AMX / avx512_bf16).

OpenVINO runs an edited copy of the verified int8 model (tts_core/embedded/graph_edits.py),
built once and cached next to it, about 3x as fast on this machine
(scripts/bench_embedded_ttfb.py --runtimes onnxruntime,openvino prints both side by side). It
is not the default because streamed Chinese and Japanese came out less intelligible in
bfloat16 (the README's "Runtimes" gives the figures); English did not.
"""

from __future__ import annotations

import logging
import os
import queue
import tempfile
import threading
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from tts_core.embedded import assets

log = logging.getLogger(__name__)

RUNTIME_ENV = "COSYVOICE_EMBEDDED_RUNTIME"
RUNTIMES = ("onnxruntime", "openvino")
CANCEL_POLL_SECONDS = 0.02  # how often a running onnxruntime call looks at its cancel flag
# Decoder lengths are rounded up to this many duration units (600 samples each, 0.4 s): at most
# 0.4 s of extra silence per call (trimmed; ~0.03 s of compute on average), and few enough
# lengths to warm up at start.
FRAME_MULTIPLE = 16
EDITED_VERSION = 5  # bump when graph_edits changes what it writes


class Runner(Protocol):
    name: str

    def run(self, feeds: dict[str, np.ndarray], cancel: threading.Event) -> np.ndarray | None:
        """The model's audio output, or None when ``cancel`` stopped the call."""


class OnnxRuntimeRunner:
    """The published int8 model on onnxruntime; one session shared by all requests."""

    name = "onnxruntime"

    def __init__(self, threads: int) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Idle worker threads must sleep, not spin: the CPU is shared with the server and
        # with other requests.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            model: str | bytes = str(assets.ensure_model_file())
        except OSError as e:  # read-only home, full disk: still serve, from memory
            log.warning("cannot write the model cache in %s (%s); set %s to a writable folder. "
                        "Loading the model from memory this time.",
                        assets.cache_dir(), e, assets.CACHE_ENV)
            model = assets.assemble_model_bytes()
        self.session = ort.InferenceSession(model, sess_options=opts,
                                            providers=["CPUExecutionProvider"])

    def run(self, feeds: dict[str, np.ndarray], cancel: threading.Event) -> np.ndarray | None:
        # onnxruntime checks the terminate flag between graph nodes, so a client that hangs
        # up frees the CPU within milliseconds, not after the call.
        options = ort.RunOptions()
        finished = threading.Event()

        def watch() -> None:
            while not finished.is_set():
                if cancel.wait(CANCEL_POLL_SECONDS):
                    options.terminate = True
                    return

        threading.Thread(target=watch, name="embedded-cancel", daemon=True).start()
        try:
            (audio,) = self.session.run(None, feeds, options)
        except Exception:
            if cancel.is_set():
                return None
            raise
        finally:
            finished.set()
        return np.asarray(audio)


def edited_model(directory: Path | None = None) -> Path:
    """The int8 model with graph_edits applied, as OpenVINO IR (``.xml`` + ``.bin``, float32
    weights; float16 storage gave NaN once compiled for bfloat16; the file is mapped, not
    copied, when it is read), cached beside the published model with a checksum file written
    last, so a damaged or half-written pair is rebuilt, never loaded. Returns the ``.xml``."""
    source = assets.ensure_model_file(directory)
    stem = f"{source.stem}-openvino-v{EDITED_VERSION}-f{FRAME_MULTIPLE}"
    xml, weights = source.with_name(stem + ".xml"), source.with_name(stem + ".bin")
    checksum = source.with_name(stem + ".sha256")

    def digests() -> str:
        return "\n".join(assets.file_sha256(p) for p in (xml, weights))

    if xml.is_file() and weights.is_file() and checksum.is_file():
        if digests() == checksum.read_text().strip():
            return xml
        log.warning("cached OpenVINO model %s fails its sha256 check; rebuilding it", xml)
    _build_edited(source, xml, weights)
    fd, tmp = tempfile.mkstemp(prefix=checksum.name + ".", suffix=".tmp", dir=source.parent)
    with os.fdopen(fd, "w") as f:
        f.write(digests())
    os.chmod(tmp, 0o644)
    os.replace(tmp, checksum)
    return xml


def _build_edited(source: Path, xml: Path, weights: Path) -> None:
    import onnx
    import openvino as ov

    from tts_core.embedded import graph_edits

    model = onnx.load(str(source))
    graph_edits.dequantize_convs(model, ("ConvInteger", "MatMulInteger"))
    graph_edits.round_up_frames(model, FRAME_MULTIPLE)
    graph_edits.polynomial_snake_sines(model)
    graph_edits.stft_as_convolution(model)
    if not graph_edits.integer_source_phase(model):  # bfloat16 would ruin the voice's pitch
        raise assets.ModelAssetError("the Kokoro model's harmonic source is not where "
                                     "graph_edits.integer_source_phase looks for it")
    with tempfile.TemporaryDirectory(dir=source.parent) as tmp:
        edited = Path(tmp) / "edited.onnx"
        onnx.save(model, str(edited))
        del model
        ov.save_model(ov.Core().read_model(str(edited)), str(Path(tmp) / "model.xml"),
                      compress_to_fp16=False)
        for name, target in (("model.bin", weights), ("model.xml", xml)):
            os.chmod(Path(tmp) / name, 0o644)
            os.replace(Path(tmp) / name, target)


class OpenVinoRunner:
    """The edited model on OpenVINO's CPU plugin in bfloat16; requests share the compiled
    model, each call takes an idle infer request (or makes one).

    bfloat16 has float32's range but not its precision, and on rare inputs the vocoder's output
    came out NaN (one sentence in about seventy of the tuning set, and not with any three of
    the four graph edits alone): such a call is run again on onnxruntime, with the published
    model, and logged, so a listener never gets silence for it."""

    name = "openvino"

    def __init__(self, threads: int) -> None:
        import openvino as ov

        core = ov.Core()
        self.threads = threads
        self.compiled = core.compile_model(str(edited_model()), "CPU", {
            "INFERENCE_NUM_THREADS": threads,
            "INFERENCE_PRECISION_HINT": "bf16",
            "PERFORMANCE_HINT": "LATENCY",
        })
        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        self._fallback: OnnxRuntimeRunner | None = None
        self._fallback_lock = threading.Lock()
        self.fallbacks = 0  # calls rerun on onnxruntime

    def run(self, feeds: dict[str, np.ndarray], cancel: threading.Event) -> np.ndarray | None:
        audio = self._run(feeds, cancel)
        if audio is None or np.isfinite(audio).all():
            return audio
        self.fallbacks += 1
        log.warning("OpenVINO returned non-finite audio for a %d-token call; running it on "
                     "onnxruntime (%d so far)", feeds["tokens"].shape[-1], self.fallbacks)
        with self._fallback_lock:
            if self._fallback is None:
                self._fallback = OnnxRuntimeRunner(self.threads)
        return self._fallback.run(feeds, cancel)

    def _run(self, feeds: dict[str, np.ndarray], cancel: threading.Event) -> np.ndarray | None:
        # No cancel() of a running request: in OpenVINO 2026.4 a cancelled request left the
        # compiled model's shape state broken, and every later call failed (shape inference of
        # the next input). A cancelled call runs to its end (a fraction of a second: at most
        # CALL_TOKENS tokens at RTF ~0.2) and its result is dropped.
        try:
            request = self._idle.get_nowait()
        except queue.Empty:
            request = self.compiled.create_infer_request()
        try:
            request.infer(feeds)
            audio = request.get_output_tensor(0).data.copy()
        finally:
            self._idle.put(request)
        return None if cancel.is_set() else audio


def has_bfloat16_cpu() -> bool:
    """Whether OpenVINO is installed and finds bfloat16 units on this CPU."""
    try:
        import openvino as ov
    except ImportError:
        return False
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def choose_runtime(requested: str | None = None) -> str:
    """``requested``, else ``$COSYVOICE_EMBEDDED_RUNTIME``, else onnxruntime; OpenVINO only
    where it has bfloat16 units (in float32 it is no faster than onnxruntime)."""
    requested = (requested or os.environ.get(RUNTIME_ENV) or "onnxruntime").strip().lower()
    if requested not in RUNTIMES:
        raise ValueError(f"{RUNTIME_ENV}={requested!r}: choose one of {', '.join(RUNTIMES)}")
    if requested == "openvino" and not has_bfloat16_cpu():
        raise ValueError(f"{RUNTIME_ENV}=openvino needs a CPU with bfloat16 units (AMX or "
                         "avx512_bf16), which OpenVINO does not find here; use onnxruntime")
    return requested


def open_runner(threads: int, runtime: str | None = None) -> Runner:
    chosen = choose_runtime(runtime)
    if chosen == "openvino":
        try:
            return OpenVinoRunner(threads)
        except OSError as e:  # no writable cache for the edited model: the published one
            log.warning("cannot prepare the OpenVINO model in %s (%s); running onnxruntime",
                        assets.cache_dir(), e)
    return OnnxRuntimeRunner(threads)
