"""The gRPC server: native TextToSpeechService, the REST compatibility calls, health, reflection.

Every synthesis RPC is one function that reads top to bottom, in the same steps:

1. decode the request into the engine's ``SynthesisRequest`` and check its fields against the
   request rules (``convert`` / ``compat``, rules in ``tts_core/limits.py``): INVALID_ARGUMENT,
   HTTP 400/413/415;
2. the engine's own checks (``Core.prepare``): UNIMPLEMENTED 501 for a mode it cannot serve,
   NOT_FOUND 404 for an unknown speaker;
3. admission and audio (``Core.audio``): RESOURCE_EXHAUSTED, HTTP 503 when max_concurrent +
   max_queue syntheses are already running or waiting; then encoded chunks as the engine makes
   them.

Nothing is sent before the first chunk is ready, so every failure up to there is a clean status.
Each RPC keeps its own ``CallLog`` (sizes and timings, never text) and logs it once, where it
ends. SynthesizeTextStream takes the same steps with its first message (the config); its text
pieces are fed to the engine while it speaks. Registering a speaker is engine work as heavy as
a short synthesis, so it takes a slot (and may be refused) like one. Decoding a request
(multipart parsing, audio decoding, resampling: up to ~0.1 s of CPU for full-size uploads) runs
in a thread, so the event loop keeps streaming the other calls meanwhile.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import TypeVar

import grpc
from google.api import httpbody_pb2
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from service import compat, convert, errors, metrics, openai_api
from service import limits as service_limits
from service.audio import OutputEncoder, decode_audio
from service.auth import ApiKeyInterceptor, KeyChecker
from service.gen.cosyvoice.v1 import (
    compat_pb2,
    compat_pb2_grpc,
    openai_pb2,
    openai_pb2_grpc,
    tts_pb2,
    tts_pb2_grpc,
)
from service.synthesis import Synthesizer, TextFeed
from tts_core import limits
from tts_core.engine import Capabilities, Engine, EngineError, Mode, SynthesisRequest

log = logging.getLogger("service")

_MODE_TO_PROTO = {
    Mode.SFT: tts_pb2.SYNTHESIS_MODE_SFT,
    Mode.ZERO_SHOT: tts_pb2.SYNTHESIS_MODE_ZERO_SHOT,
    Mode.CROSS_LINGUAL: tts_pb2.SYNTHESIS_MODE_CROSS_LINGUAL,
    Mode.INSTRUCT: tts_pb2.SYNTHESIS_MODE_INSTRUCT,
    Mode.VOICE_CONVERSION: tts_pb2.SYNTHESIS_MODE_VOICE_CONVERSION,
}


T = TypeVar("T")


class CallLog:
    """What one synthesis call asked for and produced: for its stats message and its log line.

    Each RPC function owns one and logs it once, where the call ends (never the text, the
    prompt or any metadata: only sizes and timings); the Prometheus metrics are counted there
    too, once per call.
    """

    def __init__(self, name: str, native_rate: int, request_id: str = "-",
                 on_end: Callable[[], None] | None = None):
        self.name = name  # the RPC, or the REST path
        self.surface = metrics.surface_of(name)
        self.request_id = request_id
        self.on_end = on_end
        self.ended = False
        self.native_rate = native_rate  # the engine's: what ``samples`` counts in
        self.started = time.monotonic()
        self.mode = "-"
        self.chars = 0
        self.text_feed: TextFeed | None = None  # SynthesizeTextStream: counts arriving text
        self.sample_rate = 0
        self.chunks = 0
        self.samples = 0  # engine samples (native rate)
        self.first_chunk_at = 0.0
        self.finished_at = 0.0
        metrics.METRICS.call_started()

    def request(self, request: SynthesisRequest, text_feed: TextFeed | None = None) -> None:
        self.mode = request.mode.value
        self.chars = len(request.text)
        self.text_feed = text_feed

    def chunk(self) -> None:
        if not self.chunks:
            self.first_chunk_at = time.monotonic() - self.started
        self.chunks += 1

    def stats(self, engine: str) -> tts_pb2.SynthesizeResponse:
        return tts_pb2.SynthesizeResponse(stats=tts_pb2.SynthesisStats(
            audio_seconds=self.samples / float(self.native_rate),
            time_to_first_chunk_seconds=self.first_chunk_at, total_seconds=self.finished_at,
            engine=engine, chunks=self.chunks, sample_rate=self.sample_rate))

    def finish(self, outcome: str, http_status: int | None = None) -> None:
        """The call ended with ``outcome`` (a gRPC status name; ``http_status``: the error's
        HTTP status, for a call refused before audio): log and count it (once)."""
        if self.ended:
            return
        self.ended = True
        chars = self.text_feed.chars if self.text_feed is not None else self.chars
        audio = self.samples / float(self.native_rate)
        total = time.monotonic() - self.started
        if outcome == "OK" or self.chunks:
            http_status = 200  # the status went out with the first audio
        elif outcome == "CANCELLED":
            http_status = None  # nobody was left to answer
        fields = {"request_id": self.request_id, "surface": self.surface, "call": self.name,
                  "mode": self.mode, "code": outcome, "http_status": http_status,
                  "time_to_first_audio_seconds":
                      round(self.first_chunk_at, 4) if self.chunks else None,
                  "audio_seconds": round(audio, 3), "duration_seconds": round(total, 4),
                  "text_chars": chars, "chunks": self.chunks, "sample_rate": self.sample_rate}
        log.info("%s id=%s mode=%s chars=%d rate=%d -> %s chunks=%d ttfb=%.3fs total=%.3fs "
                 "audio=%.2fs", self.name, self.request_id, self.mode, chars, self.sample_rate,
                 outcome, self.chunks, self.first_chunk_at, total, audio,
                 extra={"fields": fields})
        metrics.METRICS.call_ended(self.surface, self.mode, outcome, duration=total,
                                   first_audio=self.first_chunk_at if self.chunks else None,
                                   audio_seconds=audio)
        if self.on_end is not None:
            self.on_end()


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def request_id(context: grpc.aio.ServicerContext) -> str:
    """The call's id: the gateway's ``x-request-id`` (Envoy makes one per HTTP request) or a
    gRPC client's, when it is a short plain token; else a new one."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and _REQUEST_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex


async def _answer(context: grpc.aio.ServicerContext, work: Awaitable[T]) -> T:
    """The result of a unary call's ``work``, or the call ended with the right status."""
    try:
        return await work
    except Exception as error:
        await _abort(context, error)
    raise AssertionError("unreachable: abort raises")


async def _abort(context: grpc.aio.ServicerContext, error: Exception,
                 call: CallLog | None = None) -> None:
    """End the call with the status ``error`` stands for (INTERNAL for the unexpected)."""
    if isinstance(error, grpc.aio.AbortError):
        raise error
    error = _as_service_error(error)
    if call is not None:
        call.finish(error.code.name, error.http_status)
    await context.abort(error.code, error.message, trailing_metadata=error.trailing_metadata())


class Core:
    """What every service shares: the engine, the synthesizer, the encoded audio stream and
    speaker registration."""

    def __init__(self, engine: Engine, synthesizer: Synthesizer,
                 text_idle_seconds: float = limits.TEXT_STREAM_IDLE_SECONDS):
        self.engine = engine
        self.synth = synthesizer
        self.text_idle_seconds = text_idle_seconds
        self.sample_rate = engine.capabilities().sample_rate
        self.open_calls = 0  # synthesis calls not yet ended: what a shutdown drains

    def open_call(self, name: str, context: grpc.aio.ServicerContext) -> CallLog:
        """The ``CallLog`` of a synthesis call that starts now (counted until it ends)."""
        self.open_calls += 1
        return CallLog(name, self.sample_rate, request_id(context), self._call_ended)

    def _call_ended(self) -> None:
        self.open_calls -= 1

    @property
    def capabilities(self) -> Capabilities:
        # Asked each time: registering a speaker can enable a mode (sft on a model without
        # presets).
        return self.engine.capabilities()

    async def prepare(self, request: SynthesisRequest, output: convert.OutputSpec, call: CallLog,
                      *, streamed_text: bool = False) -> OutputEncoder:
        """The engine's checks of ``request``; then the encoder its audio will go through."""
        self.synth.check_open()  # shutting down: refused at once, before any work
        await self.synth.validate(request, streamed_text=streamed_text)
        encoder = OutputEncoder(self.sample_rate, output.sample_rate, output.encoding)
        call.sample_rate = encoder.output_rate
        return encoder

    async def audio(self, request: SynthesisRequest, encoder: OutputEncoder, call: CallLog,
                    text: TextFeed | None = None) -> AsyncIterator[bytes]:
        """Admission, then encoded audio as the engine makes it (at least one piece, which may
        be empty: a gRPC stream must carry a message). With ``text`` the engine speaks the
        pieces fed there (SynthesizeTextStream)."""
        # aclosing: leaving early (client gone) stops the engine now, not when GC runs.
        async with aclosing(self.synth.stream(request, text)) as chunks:
            async for chunk in chunks:
                call.samples += len(chunk)
                data = await _run(encoder.compressed, encoder.encode, chunk)
                if data:
                    call.chunk()
                    yield data
        tail = await _run(encoder.compressed, encoder.finish)
        if tail or not call.chunks:
            call.chunk()
            yield tail
        call.finished_at = time.monotonic() - call.started

    def require_registration(self) -> None:
        if not self.capabilities.supports_speaker_registration:
            raise errors.unimplemented(
                f"the {self.engine.name} engine cannot register speakers; start the server "
                "with an engine that can (a CosyVoice 2 or 3 model: --model-dir DIR)")

    def require_text_streaming(self) -> None:
        if not self.capabilities.supports_text_streaming:
            raise errors.unimplemented(
                f"the {self.engine.name} engine cannot speak text while it arrives: "
                "send the whole text to Synthesize, or start the server with an engine "
                "that can (a CosyVoice 2 or 3 model: --model-dir DIR)")

    async def register(self, request: tts_pb2.RegisterSpeakerRequest
                       ) -> tts_pb2.RegisterSpeakerResponse:
        """RegisterSpeaker (JSON) and /register_speaker (upload) both end here."""
        self.require_registration()
        if not request.HasField("prompt_audio"):
            raise errors.bad_request("prompt_audio is required to register a speaker")
        speaker_id, language = request.speaker_id.strip(), request.language or None
        try:  # the cheap rules first, before the upload is decoded
            limits.check_registration(speaker_id, request.prompt_text, language,
                                      request.description)
        except EngineError as error:
            raise errors.from_engine_error(error) from None
        prompt = await asyncio.to_thread(decode_audio, request.prompt_audio.data,
                                         request.prompt_audio.format,
                                         request.prompt_audio.sample_rate)
        try:  # a taken id is the engine's to judge (ALREADY_EXISTS, HTTP 409)
            speaker = await self.synth.run(
                self.engine.register_speaker, speaker_id, prompt, request.prompt_text,
                language=language, description=request.description, replace=request.replace)
        except EngineError as error:
            raise errors.from_engine_error(error) from None
        return tts_pb2.RegisterSpeakerResponse(speaker=tts_pb2.Speaker(
            id=speaker.id, language=speaker.language, description=speaker.description,
            registered=speaker.registered))

    async def delete(self, speaker_id: str) -> tts_pb2.DeleteSpeakerResponse:
        self.require_registration()
        if not speaker_id.strip():
            raise errors.bad_request("speaker_id is empty: name the registered speaker to delete")
        try:
            await asyncio.to_thread(self.engine.delete_speaker, speaker_id)
        except EngineError as error:
            raise errors.from_engine_error(error) from None
        return tts_pb2.DeleteSpeakerResponse()


async def _run(in_thread: bool, fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)``, in a worker thread when it is heavy enough to stall the event loop."""
    return await asyncio.to_thread(fn, *args) if in_thread else fn(*args)


class TextToSpeechService(tts_pb2_grpc.TextToSpeechServiceServicer):
    def __init__(self, core: Core):
        self.core = core

    async def Synthesize(self, request: tts_pb2.SynthesizeRequest,
                         context: grpc.aio.ServicerContext
                         ) -> AsyncIterator[tts_pb2.SynthesizeResponse]:
        core = self.core
        call = core.open_call("Synthesize", context)
        try:
            job, output = await asyncio.to_thread(convert.to_engine_request, request)
            call.request(job)
            encoder = await core.prepare(job, output, call)
            index = 0
            async with aclosing(core.audio(job, encoder, call)) as audio:
                async for data in audio:
                    yield _audio_reply(data, encoder, index)
                    index += 1
            yield call.stats(core.engine.name)
            call.finish("OK")
        except (asyncio.CancelledError, GeneratorExit):  # the client went away
            call.finish("CANCELLED")
            raise
        except Exception as error:
            await _abort(context, error, call)

    async def SynthesizeTextStream(self, request_iterator: AsyncIterator,
                                   context: grpc.aio.ServicerContext
                                   ) -> AsyncIterator[tts_pb2.SynthesizeResponse]:
        core = self.core
        call = core.open_call("SynthesizeTextStream", context)
        reader: asyncio.Task | None = None
        try:
            core.require_text_streaming()
            config = await _first_config(request_iterator)
            job, output = await asyncio.to_thread(convert.to_engine_request, config,
                                                  streamed_text=True)
            feed = TextFeed(idle_seconds=core.text_idle_seconds)
            feed.put(job.text)
            call.request(job, feed)
            encoder = await core.prepare(job, output, call, streamed_text=True)
            reader = asyncio.create_task(_read_text(request_iterator, feed))
            index = 0
            async with aclosing(core.audio(job, encoder, call, feed)) as audio:
                async for data in audio:
                    yield _audio_reply(data, encoder, index)
                    index += 1
            yield call.stats(core.engine.name)
            call.finish("OK")
        except (asyncio.CancelledError, GeneratorExit):
            call.finish("CANCELLED")
            raise
        except Exception as error:
            await _abort(context, error, call)
        finally:
            if reader is not None:
                reader.cancel()

    async def ListSpeakers(self, request: tts_pb2.ListSpeakersRequest,
                           context: grpc.aio.ServicerContext) -> tts_pb2.ListSpeakersResponse:
        caps = self.core.capabilities
        speakers = await asyncio.to_thread(self.core.engine.speakers)
        modes = [tts_pb2.ModeSupport(mode=_MODE_TO_PROTO[m], supported=m in caps.modes,
                                     reason="" if m in caps.modes
                                     else caps.unsupported_reasons.get(m, "not supported"))
                 for m in Mode]
        return tts_pb2.ListSpeakersResponse(
            speakers=[tts_pb2.Speaker(id=s.id, language=s.language, description=s.description,
                                      registered=s.registered) for s in speakers],
            engine=caps.engine, sample_rate=caps.sample_rate, modes=modes,
            supports_speaker_registration=caps.supports_speaker_registration,
            supports_text_streaming=caps.supports_text_streaming,
            limits=tts_pb2.ServiceLimits(
                max_text_chars=limits.MAX_TEXT_CHARS,
                max_upload_bytes=service_limits.MAX_UPLOAD_BYTES,
                max_prompt_seconds=limits.MAX_PROMPT_SECONDS,
                min_prompt_seconds=limits.MIN_PROMPT_SECONDS,
                output_sample_rates=service_limits.OUTPUT_SAMPLE_RATES,
                min_input_sample_rate=limits.MIN_INPUT_SAMPLE_RATE,
                max_input_sample_rate=limits.MAX_INPUT_SAMPLE_RATE,
                min_speed=limits.MIN_SPEED, max_speed=limits.MAX_SPEED,
                max_stream_text_chars=limits.MAX_STREAM_TEXT_CHARS,
                text_stream_idle_seconds=self.core.text_idle_seconds))

    async def GetServerStatus(self, request: tts_pb2.GetServerStatusRequest,
                              context: grpc.aio.ServicerContext
                              ) -> tts_pb2.GetServerStatusResponse:
        synth = self.core.synth
        c = synth.counters
        return tts_pb2.GetServerStatusResponse(
            engine=self.core.engine.name, uptime_seconds=time.monotonic() - c.started,
            max_concurrent=synth.max_concurrent, max_queue=synth.max_queue,
            active_syntheses=c.active, queued_syntheses=c.queued, started_total=c.started_total,
            completed_total=c.completed_total, cancelled_total=c.cancelled_total,
            failed_total=c.failed_total, rejected_total=c.rejected_total,
            engine_chunks_total=c.engine_chunks_total, **_batch_status(self.core.engine))

    async def RegisterSpeaker(self, request: tts_pb2.RegisterSpeakerRequest,
                              context: grpc.aio.ServicerContext
                              ) -> tts_pb2.RegisterSpeakerResponse:
        return await _answer(context, self.core.register(request))

    async def DeleteSpeaker(self, request: tts_pb2.DeleteSpeakerRequest,
                            context: grpc.aio.ServicerContext) -> tts_pb2.DeleteSpeakerResponse:
        return await _answer(context, self.core.delete(request.speaker_id))


def _audio_reply(data: bytes, encoder: OutputEncoder, index: int) -> tts_pb2.SynthesizeResponse:
    return tts_pb2.SynthesizeResponse(audio=tts_pb2.AudioChunk(
        data=data, sample_rate=encoder.output_rate, encoding=encoder.encoding, index=index))


class RestCompatService(compat_pb2_grpc.RestCompatServiceServicer):
    """The reference server's /inference_* endpoints (reached through the gateway)."""

    def __init__(self, core: Core):
        self.core = core

    async def _inference(self, kind: str, request: Message, context: grpc.aio.ServicerContext
                         ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        """Every /inference_* endpoint: the same steps, for the endpoint's ``kind``."""
        core = self.core
        call = core.open_call(compat.ENDPOINTS[kind].path, context)
        try:
            job, output = await asyncio.to_thread(_decode_rest, kind, request)
            call.request(job)
            encoder = await core.prepare(job, output, call)
            async with aclosing(core.audio(job, encoder, call)) as audio:
                async for data in audio:
                    yield httpbody_pb2.HttpBody(content_type=encoder.content_type, data=data)
            call.finish("OK")
        except (asyncio.CancelledError, GeneratorExit):
            call.finish("CANCELLED")
            raise
        except Exception as error:
            await _abort(context, error, call)

    InferenceSft = functools.partialmethod(_inference, "sft")
    InferenceZeroShot = functools.partialmethod(_inference, "zero_shot")
    InferenceCrossLingual = functools.partialmethod(_inference, "cross_lingual")
    InferenceInstruct = functools.partialmethod(_inference, "instruct")
    InferenceInstruct2 = functools.partialmethod(_inference, "instruct2")
    InferenceVc = functools.partialmethod(_inference, "vc")

    async def RegisterSpeakerUpload(self, request: compat_pb2.RegisterSpeakerUploadRequest,
                                    context: grpc.aio.ServicerContext
                                    ) -> tts_pb2.RegisterSpeakerResponse:
        async def register() -> tts_pb2.RegisterSpeakerResponse:
            native = await asyncio.to_thread(compat.decode_register, request)
            return await self.core.register(native)

        return await _answer(context, register())


class OpenAiSpeechService(openai_pb2_grpc.OpenAiSpeechServiceServicer):
    """OpenAI's /v1/audio/speech, /v1/models and /v1/audio/voices (through the gateway).

    Errors are answered in OpenAI's shape as the response body (with the HTTP status in the
    response metadata, which the gateway makes the status), not as a gRPC status: the
    transcoder would write its own error shape.
    """

    def __init__(self, core: Core):
        self.core = core
        self.created = int(time.time())

    async def CreateSpeech(self, request: openai_pb2.CreateSpeechRequest,
                           context: grpc.aio.ServicerContext
                           ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        core = self.core
        call = core.open_call("/v1/audio/speech", context)
        sent = False  # whether the response (and so its status) has started
        speech: openai_api.Speech | None = None
        try:
            speech = await asyncio.to_thread(openai_api.decode_speech, request.body.data,
                                             request.body.content_type, core.engine.name)
            call.request(speech.request)
            encoder = await core.prepare(speech.request, speech.output, call)
            content_type = "text/event-stream" if speech.sse else encoder.content_type
            async with aclosing(core.audio(speech.request, encoder, call)) as audio:
                async for data in audio:
                    if not sent:
                        await context.send_initial_metadata(
                            ((openai_api.SPEED_HEADER, f"{speech.speed_applied:g}"),))
                        sent = True
                    if speech.sse:
                        data = openai_api.sse_delta(data) if data else b""
                    yield httpbody_pb2.HttpBody(content_type=content_type, data=data)
            if speech.sse:
                yield httpbody_pb2.HttpBody(content_type=content_type,
                                            data=openai_api.sse_done(len(speech.request.text)))
            call.finish("OK")
        except (asyncio.CancelledError, GeneratorExit):
            call.finish("CANCELLED")
            raise
        except Exception as failure:
            error = _as_service_error(failure)
            if error.code == grpc.StatusCode.NOT_FOUND and error.param is None:
                error.param = "voice"  # the engine's: an unknown speaker
            call.finish(error.code.name, error.http_status)
            if not sent:  # the whole answer is the error
                await context.send_initial_metadata(
                    ((errors.HTTP_STATUS_KEY, str(error.http_status or 500)),))
                yield httpbody_pb2.HttpBody(content_type="application/json",
                                            data=openai_api.error_body(error))
            else:  # audio has gone out: all that is left is to break the stream off
                if speech is not None and speech.sse:  # an event can still say what happened
                    yield httpbody_pb2.HttpBody(content_type="text/event-stream",
                                                data=openai_api.sse_error(error))
                # and the stream's status (the REST trailer) says it was cut short
                await context.abort(error.code, error.message)

    async def ListModels(self, request: openai_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:
        return httpbody_pb2.HttpBody(
            content_type="application/json",
            data=openai_api.models_body(self.core.engine.name, self.created))

    async def ListVoices(self, request: openai_pb2.ListVoicesRequest,
                         context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:
        speakers = await asyncio.to_thread(self.core.engine.speakers)
        return httpbody_pb2.HttpBody(content_type="application/json",
                                     data=openai_api.voices_body(speakers))


def _as_service_error(error: Exception) -> errors.ServiceError:
    """``error`` as the client hears it (the unexpected logged here, told as INTERNAL)."""
    if isinstance(error, errors.ServiceError):
        return error
    log.error("unexpected failure while serving a call", exc_info=error)
    return errors.ServiceError(grpc.StatusCode.INTERNAL, errors.INTERNAL_MESSAGE, 500)


def _decode_rest(kind: str, request: Message) -> tuple[SynthesisRequest, convert.OutputSpec]:
    return convert.to_engine_request(compat.decode(kind, request), names=compat.REST_NAMES)


async def _first_config(messages: AsyncIterator) -> tts_pb2.SynthesizeRequest:
    """The config message that must open a SynthesizeTextStream call."""
    try:
        first = await anext(messages)
    except StopAsyncIteration:
        raise errors.bad_request("the stream ended before its first message: send the config "
                                 "(mode, voice, output options), then the text") from None
    if first.WhichOneof("payload") != "config":
        raise errors.bad_request("the first message must carry config (mode, voice, output "
                                 "options); the text follows in the next messages")
    return first.config


async def _read_text(messages: AsyncIterator, feed: TextFeed) -> None:
    """Move the client's text pieces into ``feed`` until it half-closes (runs as a task)."""
    try:
        async for message in messages:
            if message.WhichOneof("payload") != "text":
                raise errors.bad_request("only the first message may carry config; send the "
                                         "text in the following messages")
            feed.put(message.text)
        feed.close()
    except errors.ServiceError as error:
        feed.fail(error)
    except Exception as error:  # the request stream broke off (client gone)
        log.debug("reading the text stream failed: %r", error)
        feed.fail(errors.ServiceError(grpc.StatusCode.CANCELLED, "the text stream broke off"))


SERVICE_NAMES = (
    tts_pb2.DESCRIPTOR.services_by_name["TextToSpeechService"].full_name,
    compat_pb2.DESCRIPTOR.services_by_name["RestCompatService"].full_name,
    openai_pb2.DESCRIPTOR.services_by_name["OpenAiSpeechService"].full_name,
)


def _batch_status(engine: Engine) -> dict[str, int]:
    """Batch occupancy of an engine with a batch scheduler (``batch_occupancy()``)."""
    occupancy = getattr(engine, "batch_occupancy", None)
    batch, max_batch = occupancy() if occupancy is not None else (0, 1)
    return {"batch_occupancy": batch, "max_batch": max_batch}


SHUTTING_DOWN = ("the server is shutting down and takes no new syntheses; retry shortly "
                 "(another replica, or this one once restarted, will answer)")
CUT_OFF = ("the server shut down before this stream was finished (its drain time ran out): "
           "the audio is incomplete; retry the request")


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer
    synthesizer: Synthesizer
    core: Core

    async def stop(self, grace: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        self.synthesizer.shutdown()

    async def drain(self, seconds: float, cut: asyncio.Event, grace: float = 1.0) -> None:
        """Shut down gracefully, in at most ``seconds`` + ``grace``.

        Health says NOT_SERVING at once (the gateway stops routing here); new syntheses and those
        still waiting for a slot are refused with UNAVAILABLE (HTTP 503); running ones may
        finish until ``seconds`` have passed or ``cut`` is set (a second SIGTERM), then they end
        with UNAVAILABLE, which a REST client sees in the stream's status trailer. ``grace``
        lets the last messages and trailers out before the port closes.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        await self.health.enter_graceful_shutdown()
        self.synthesizer.drain(errors.unavailable(SHUTTING_DOWN))
        log.info("draining: %d synthesis calls open, waiting up to %.0f s",
                 self.core.open_calls, seconds)
        while self.core.open_calls and not cut.is_set() and loop.time() < deadline:
            try:
                await asyncio.wait_for(cut.wait(), min(0.05, max(0.0, deadline - loop.time())))
            except TimeoutError:
                pass
        if self.core.open_calls:
            cut_count = self.synthesizer.cut(errors.unavailable(CUT_OFF))
            log.warning("drain %s: cut %d running syntheses short",
                        "interrupted by a second signal" if cut.is_set() else "time is up",
                        cut_count)
        else:
            log.info("drained: every synthesis call has ended")
        await self.server.stop(grace)
        self.synthesizer.shutdown()


async def start_server(engine: Engine, *, host: str, port: int, api_keys: list[str],
                       max_concurrent: int = service_limits.DEFAULT_MAX_CONCURRENT,
                       max_queue: int = service_limits.DEFAULT_MAX_QUEUE,
                       text_idle_seconds: float = limits.TEXT_STREAM_IDLE_SECONDS
                       ) -> RunningServer:
    """Start serving ``engine``; returns once the port is bound and health says SERVING.

    ``text_idle_seconds``: how long SynthesizeTextStream waits for the next text piece.
    """
    synthesizer = Synthesizer(engine, max_concurrent, max_queue)
    core = Core(engine, synthesizer, text_idle_seconds)
    server = grpc.aio.server(
        interceptors=[ApiKeyInterceptor(KeyChecker(api_keys))],
        options=[("grpc.max_receive_message_length", service_limits.MAX_GRPC_MESSAGE_BYTES),
                 ("grpc.max_send_message_length", service_limits.MAX_GRPC_MESSAGE_BYTES),
                 ("grpc.max_metadata_size", service_limits.MAX_GRPC_METADATA_BYTES),
                 ("grpc.absolute_max_metadata_size", service_limits.MAX_GRPC_METADATA_BYTES),
                 ("grpc.so_reuseport", 0)],
    )
    tts_pb2_grpc.add_TextToSpeechServiceServicer_to_server(TextToSpeechService(core), server)
    compat_pb2_grpc.add_RestCompatServiceServicer_to_server(RestCompatService(core), server)
    openai_pb2_grpc.add_OpenAiSpeechServiceServicer_to_server(OpenAiSpeechService(core), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port} (in use?)")
    await server.start()
    for name in ("", *SERVICE_NAMES):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, bound, health, synthesizer, core)
