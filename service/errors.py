"""Errors the service reports to clients, with their gRPC code and the HTTP status for REST.

gRPC has no code for "payload too large" and the transcoder maps RESOURCE_EXHAUSTED to 429, so
a failed call also carries the intended HTTP status in the trailing metadata key
``HTTP_STATUS_KEY``; the gateway's Lua filter turns it into the response status.
"""

from __future__ import annotations

import grpc

from tts_core.engine import EngineError, SpeakerExists, TooLarge, UnknownSpeaker, UnsupportedMode

HTTP_STATUS_KEY = "x-cosyvoice-http-status"


class ServiceError(Exception):
    """A failure the client is told about: gRPC code, message, and the HTTP status for REST."""

    def __init__(self, code: grpc.StatusCode, message: str, http_status: int | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status
        self.param = param  # the request field at fault, where one is (OpenAI's error shape)

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        if self.http_status is None:
            return ()
        return ((HTTP_STATUS_KEY, str(self.http_status)),)


def bad_request(message: str, param: str | None = None) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message, 400, param)


def too_large(message: str) -> ServiceError:
    # INVALID_ARGUMENT, not RESOURCE_EXHAUSTED: retrying the same request can never succeed.
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message, 413)


def unsupported_media_type(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message, 415)


def overloaded(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, message, 503)


def unavailable(message: str) -> ServiceError:
    """Not now, but retrying (this or another replica) will do: the server is shutting down."""
    return ServiceError(grpc.StatusCode.UNAVAILABLE, message, 503)


def unimplemented(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNIMPLEMENTED, message, 501)


def not_found(message: str, param: str | None = None) -> ServiceError:
    return ServiceError(grpc.StatusCode.NOT_FOUND, message, 404, param)


def already_exists(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.ALREADY_EXISTS, message, 409)


INTERNAL_MESSAGE = "synthesis failed because of an internal server error; see the server log"


def from_engine_error(error: EngineError) -> ServiceError:
    """Map an engine's client-caused error to what the client is told."""
    message = str(error) or type(error).__name__
    if isinstance(error, UnknownSpeaker):
        return not_found(message)
    if isinstance(error, UnsupportedMode):
        return unimplemented(message)
    if isinstance(error, TooLarge):
        return too_large(message)
    if isinstance(error, SpeakerExists):
        return already_exists(message)
    return bad_request(message)  # InvalidRequest, and any other client-caused EngineError
