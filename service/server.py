"""The gRPC server: native TextToSpeechService, the REST compatibility calls, health, reflection.

Request life cycle (one code path for gRPC and REST): decode and check fields and limits
(INVALID_ARGUMENT, HTTP 400/413/415) -> the engine's own checks (UNIMPLEMENTED 501 for a mode
it cannot serve, NOT_FOUND 404 for an unknown speaker) -> admission (RESOURCE_EXHAUSTED, HTTP
503 when max_concurrent + max_queue syntheses are already running or waiting) -> audio. Nothing
is sent before the first chunk is ready, so every failure up to there is a clean status.
SynthesizeTextStream follows the same path with its first message (the config); its text pieces
are fed to the engine while it speaks. Registering a speaker is engine work as heavy as a short
synthesis, so it takes a slot (and may be refused) like one. Decoding a request (multipart
parsing, audio decoding, resampling: up to ~0.1 s of CPU for full-size uploads) runs in a
thread, so the event loop keeps streaming the other calls meanwhile.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
from google.api import httpbody_pb2
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from service import compat, convert, errors, limits
from service.audio import OutputEncoder, decode_audio
from service.auth import ApiKeyInterceptor, KeyChecker
from service.gen.cosyvoice.v1 import compat_pb2, compat_pb2_grpc, tts_pb2, tts_pb2_grpc
from service.synthesis import Synthesizer, TextFeed
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


@dataclass
class _Call:
    """One synthesis call: what it asked for and produced, for the stats message and the log."""

    name: str  # the RPC, or the REST path
    started: float = field(default_factory=time.monotonic)
    request: SynthesisRequest | None = None  # set once the request decoded
    text_feed: TextFeed | None = None  # SynthesizeTextStream only
    sample_rate: int = 0
    chunks: int = 0
    audio_seconds: float = 0.0
    first_chunk_at: float = 0.0
    finished_at: float = 0.0

    def since_start(self) -> float:
        return time.monotonic() - self.started

    def stats(self, engine: str) -> tts_pb2.SynthesizeResponse:
        return tts_pb2.SynthesizeResponse(stats=tts_pb2.SynthesisStats(
            audio_seconds=self.audio_seconds, time_to_first_chunk_seconds=self.first_chunk_at,
            total_seconds=self.finished_at, engine=engine, chunks=self.chunks,
            sample_rate=self.sample_rate))


async def _abort(context: grpc.aio.ServicerContext, error: errors.ServiceError) -> None:
    await context.abort(error.code, error.message, trailing_metadata=error.trailing_metadata())


async def _abort_unexpected(context: grpc.aio.ServicerContext, error: Exception) -> None:
    if isinstance(error, grpc.aio.AbortError):
        raise error
    log.error("unexpected failure while serving a call", exc_info=error)
    await _abort(context, errors.ServiceError(grpc.StatusCode.INTERNAL, errors.INTERNAL_MESSAGE,
                                              500))


async def _answer(context: grpc.aio.ServicerContext, work: Awaitable[T]) -> T:
    """The result of a unary call's ``work``, or the call ended with the right status."""
    try:
        return await work
    except errors.ServiceError as error:
        await _abort(context, error)
    except Exception as error:
        await _abort_unexpected(context, error)
    raise AssertionError("unreachable: abort raises")


# SynthesizeTextStream's text has not arrived when its config is checked: the engine checks
# everything else (mode, voice, speaker, prompt) on a copy of the request with this text.
_STAND_IN_TEXT = "text"


class Core:
    """What both services share: the engine, the synthesizer, the encoded audio stream and
    speaker registration."""

    def __init__(self, engine: Engine, synthesizer: Synthesizer,
                 text_idle_seconds: float = limits.TEXT_STREAM_IDLE_SECONDS):
        self.engine = engine
        self.synth = synthesizer
        self.text_idle_seconds = text_idle_seconds
        self.sample_rate = engine.capabilities().sample_rate

    @property
    def capabilities(self) -> Capabilities:
        # Asked each time: registering a speaker can enable a mode (sft on a model without
        # presets).
        return self.engine.capabilities()

    async def audio(self, call: _Call, output: convert.OutputSpec
                    ) -> AsyncIterator[tuple[bytes, OutputEncoder]]:
        """Validate ``call.request`` with the engine, then yield encoded audio as it comes.

        With ``call.text_feed``, the engine speaks the pieces fed there (SynthesizeTextStream).
        """
        request, text = call.request, call.text_feed
        await self.synth.validate(request if text is None
                                  else dataclasses.replace(request, text=_STAND_IN_TEXT))
        encoder = OutputEncoder(self.sample_rate, output.sample_rate, output.encoding)
        call.sample_rate = encoder.output_rate
        produced = 0
        # aclosing: leaving early (client gone) stops the engine now, not when GC runs.
        async with aclosing(self.synth.stream(request, text)) as chunks:
            async for chunk in chunks:
                data = encoder.encode(chunk)
                produced += len(chunk)
                if not data:
                    continue
                if not call.chunks:
                    call.first_chunk_at = call.since_start()
                call.chunks += 1
                yield data, encoder
        tail = encoder.finish()
        if tail or not call.chunks:  # always at least one message, so the stream has a type
            if not call.chunks:
                call.first_chunk_at = call.since_start()
            call.chunks += 1
            yield tail, encoder
        call.finished_at = call.since_start()
        call.audio_seconds = produced / float(self.sample_rate)

    async def serve(self, call: _Call, context: grpc.aio.ServicerContext,
                    replies: AsyncIterator[T]) -> AsyncIterator[T]:
        """Pass ``replies`` on; end the call with the right status on failure; log it once."""
        failure: BaseException | None = None
        try:
            async with aclosing(replies):
                async for reply in replies:
                    yield reply
        except errors.ServiceError as error:
            failure = error
            await _abort(context, error)
        except Exception as error:
            failure = error
            await _abort_unexpected(context, error)
        except BaseException as error:  # cancelled: the client went away
            failure = error
            raise
        finally:
            self.log_call(call, _outcome(failure))

    def require_registration(self) -> None:
        if not self.capabilities.supports_speaker_registration:
            raise errors.unimplemented(
                f"the {self.engine.name} engine cannot register speakers; start the server "
                "with an engine that can (--engine cosyvoice2)")

    async def register(self, request: tts_pb2.RegisterSpeakerRequest
                       ) -> tts_pb2.RegisterSpeakerResponse:
        """RegisterSpeaker (JSON) and /register_speaker (upload) both end here."""
        self.require_registration()
        speaker_id = request.speaker_id.strip()
        if not speaker_id or len(speaker_id) > limits.MAX_SPEAKER_ID_CHARS:
            raise errors.bad_request(f"speaker_id must have 1 to "
                                     f"{limits.MAX_SPEAKER_ID_CHARS} characters")
        if not request.HasField("prompt_audio"):
            raise errors.bad_request("prompt_audio is required to register a speaker")
        prompt = await asyncio.to_thread(decode_audio, request.prompt_audio.data,
                                         request.prompt_audio.format,
                                         request.prompt_audio.sample_rate)
        prompt_text = request.prompt_text
        if len(prompt_text) > limits.MAX_PROMPT_TEXT_CHARS:
            raise errors.too_large(f"prompt_text has {len(prompt_text)} characters; the "
                                   f"limit is {limits.MAX_PROMPT_TEXT_CHARS}")
        known = {s.id: s for s in await asyncio.to_thread(self.engine.speakers)}
        if speaker_id in known and not known[speaker_id].registered:
            raise errors.already_exists(f"speaker id {speaker_id!r} is a preset speaker of the "
                                        "model; choose another id")
        if speaker_id in known and not request.replace:
            raise errors.already_exists(f"speaker id {speaker_id!r} is already registered; "
                                        "choose another id, or set replace to overwrite it")
        try:
            speaker = await self.synth.run(
                self.engine.register_speaker, speaker_id, prompt, prompt_text,
                language=request.language or None, description=request.description,
                replace=request.replace)
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

    def log_call(self, call: _Call, outcome: str) -> None:
        # Never the text, the prompt or any metadata: only sizes and timings.
        request = call.request
        mode = request.mode.value if request else "-"
        if call.text_feed is not None:
            chars = call.text_feed.chars
        else:
            chars = len(request.text) if request else 0
        log.info("%s mode=%s chars=%d rate=%d -> %s chunks=%d ttfb=%.3fs total=%.3fs audio=%.2fs",
                 call.name, mode, chars, call.sample_rate, outcome, call.chunks,
                 call.first_chunk_at, call.since_start(), call.audio_seconds)


def _outcome(error: BaseException | None) -> str:
    if error is None:
        return "OK"
    if isinstance(error, errors.ServiceError):
        return error.code.name
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    return type(error).__name__


class TextToSpeechService(tts_pb2_grpc.TextToSpeechServiceServicer):
    def __init__(self, core: Core):
        self.core = core

    async def Synthesize(self, request: tts_pb2.SynthesizeRequest,
                         context: grpc.aio.ServicerContext
                         ) -> AsyncIterator[tts_pb2.SynthesizeResponse]:
        call = _Call("Synthesize")
        async with aclosing(self.core.serve(call, context,
                                            self._synthesize(request, call))) as replies:
            async for reply in replies:
                yield reply

    async def _synthesize(self, request: tts_pb2.SynthesizeRequest, call: _Call
                          ) -> AsyncIterator[tts_pb2.SynthesizeResponse]:
        call.request, output = await asyncio.to_thread(convert.to_engine_request, request)
        async with aclosing(self._audio_and_stats(call, output)) as replies:
            async for reply in replies:
                yield reply

    async def SynthesizeTextStream(self, request_iterator: AsyncIterator,
                                   context: grpc.aio.ServicerContext
                                   ) -> AsyncIterator[tts_pb2.SynthesizeResponse]:
        call = _Call("SynthesizeTextStream")
        async with aclosing(self.core.serve(call, context, self._text_stream(
                request_iterator, call))) as replies:
            async for reply in replies:
                yield reply

    async def _text_stream(self, messages: AsyncIterator, call: _Call
                           ) -> AsyncIterator[tts_pb2.SynthesizeResponse]:
        if not self.core.capabilities.supports_text_streaming:
            raise errors.unimplemented(
                f"the {self.core.engine.name} engine cannot speak text while it arrives: "
                "send the whole text to Synthesize, or start the server with an engine "
                "that can (--engine cosyvoice2)")
        config = await _first_config(messages)
        call.request, output = await asyncio.to_thread(convert.to_engine_request, config,
                                                       streamed_text=True)
        call.text_feed = TextFeed(idle_seconds=self.core.text_idle_seconds)
        call.text_feed.put(call.request.text)
        reader = asyncio.create_task(_read_text(messages, call.text_feed))
        try:
            async with aclosing(self._audio_and_stats(call, output)) as replies:
                async for reply in replies:
                    yield reply
        finally:
            reader.cancel()

    async def _audio_and_stats(self, call: _Call, output: convert.OutputSpec
                               ) -> AsyncIterator[tts_pb2.SynthesizeResponse]:
        index = 0
        async with aclosing(self.core.audio(call, output)) as audio:
            async for data, encoder in audio:
                yield tts_pb2.SynthesizeResponse(audio=tts_pb2.AudioChunk(
                    data=data, sample_rate=encoder.output_rate, encoding=encoder.encoding,
                    index=index))
                index += 1
        yield call.stats(self.core.engine.name)

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
                max_text_chars=limits.MAX_TEXT_CHARS, max_upload_bytes=limits.MAX_UPLOAD_BYTES,
                max_prompt_seconds=limits.MAX_PROMPT_SECONDS,
                min_prompt_seconds=limits.MIN_PROMPT_SECONDS,
                output_sample_rates=limits.OUTPUT_SAMPLE_RATES,
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


class RestCompatService(compat_pb2_grpc.RestCompatServiceServicer):
    """The reference server's /inference_* endpoints (reached through the gateway)."""

    def __init__(self, core: Core):
        self.core = core

    async def _run(self, kind: str, request: Message, context: grpc.aio.ServicerContext
                   ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        call = _Call(compat.ENDPOINTS[kind].path)
        async with aclosing(self.core.serve(call, context,
                                            self._bodies(kind, request, call))) as bodies:
            async for body in bodies:
                yield body

    async def _bodies(self, kind: str, request: Message, call: _Call
                      ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        call.request, output = await asyncio.to_thread(_decode_rest, kind, request)
        async with aclosing(self.core.audio(call, output)) as audio:
            async for data, encoder in audio:
                yield httpbody_pb2.HttpBody(content_type=encoder.content_type, data=data)

    # One handler per endpoint, all the same call with the endpoint's kind.
    InferenceSft = functools.partialmethod(_run, "sft")
    InferenceZeroShot = functools.partialmethod(_run, "zero_shot")
    InferenceCrossLingual = functools.partialmethod(_run, "cross_lingual")
    InferenceInstruct = functools.partialmethod(_run, "instruct")
    InferenceInstruct2 = functools.partialmethod(_run, "instruct2")
    InferenceVc = functools.partialmethod(_run, "vc")

    async def RegisterSpeakerUpload(self, request: compat_pb2.RegisterSpeakerUploadRequest,
                                    context: grpc.aio.ServicerContext
                                    ) -> tts_pb2.RegisterSpeakerResponse:
        async def register() -> tts_pb2.RegisterSpeakerResponse:
            native = await asyncio.to_thread(compat.decode_register, request)
            return await self.core.register(native)

        return await _answer(context, register())


def _decode_rest(kind: str, request: Message) -> tuple[SynthesisRequest, convert.OutputSpec]:
    return convert.to_engine_request(compat.decode(kind, request))


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
)


def _batch_status(engine: Engine) -> dict[str, int]:
    """Batch occupancy of an engine with a batch scheduler (``batch_occupancy()``)."""
    occupancy = getattr(engine, "batch_occupancy", None)
    batch, max_batch = occupancy() if occupancy is not None else (0, 1)
    return {"batch_occupancy": batch, "max_batch": max_batch}


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer
    synthesizer: Synthesizer

    async def stop(self, grace: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        self.synthesizer.shutdown()


async def start_server(engine: Engine, *, host: str, port: int, api_keys: list[str],
                       max_concurrent: int = limits.DEFAULT_MAX_CONCURRENT,
                       max_queue: int = limits.DEFAULT_MAX_QUEUE,
                       text_idle_seconds: float = limits.TEXT_STREAM_IDLE_SECONDS
                       ) -> RunningServer:
    """Start serving ``engine``; returns once the port is bound and health says SERVING.

    ``text_idle_seconds``: how long SynthesizeTextStream waits for the next text piece.
    """
    synthesizer = Synthesizer(engine, max_concurrent, max_queue)
    core = Core(engine, synthesizer, text_idle_seconds)
    server = grpc.aio.server(
        interceptors=[ApiKeyInterceptor(KeyChecker(api_keys))],
        options=[("grpc.max_receive_message_length", limits.MAX_GRPC_MESSAGE_BYTES),
                 ("grpc.max_send_message_length", limits.MAX_GRPC_MESSAGE_BYTES),
                 ("grpc.so_reuseport", 0)],
    )
    tts_pb2_grpc.add_TextToSpeechServiceServicer_to_server(TextToSpeechService(core), server)
    compat_pb2_grpc.add_RestCompatServiceServicer_to_server(RestCompatService(core), server)
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
    return RunningServer(server, bound, health, synthesizer)
