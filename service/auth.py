"""API keys: where they come from, how they are checked, and the gRPC interceptor.

Keys come from ``--api-key-file`` (one per line, ``#`` comments allowed), else from the
environment variable ``COSYVOICE_API_KEYS`` (comma-separated), else from the file ``api_keys``
in the state directory, which is created with one random key on first start. Keys are compared
in constant time against every configured key, and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from service.errors import HTTP_STATUS_KEY

ENV_KEYS = "COSYVOICE_API_KEYS"
ENV_STATE_DIR = "COSYVOICE_STATE_DIR"
GENERATED_KEY_FILE = "api_keys"
HEADER = "x-api-token"  # what the reference clients send (X-API-TOKEN)
MIN_KEY_CHARS = 16
_KEY_RE = re.compile(r"^[A-Za-z0-9._~+/=-]+$")
# Health is the one call a load balancer makes without a key.
UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.Health/",)


def default_state_dir() -> Path:
    env = os.environ.get(ENV_STATE_DIR)
    return Path(env) if env else Path(__file__).resolve().parents[1] / "var"


def ensure_private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def write_private_file(path: Path, text: str) -> None:
    """Write ``text`` so that only the owner can ever read it (created 0600, not chmod later)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@dataclass(frozen=True)
class ApiKeys:
    keys: tuple[str, ...]
    source: str  # where they came from, for the start-up message (never the keys)
    generated: str | None = None  # the key created just now, to show the operator once


def _check_keys(keys: Sequence[str], source: str) -> tuple[str, ...]:
    for index, key in enumerate(keys, 1):
        if len(key) < MIN_KEY_CHARS or not _KEY_RE.match(key):
            raise ValueError(f"API key #{index} from {source} is unusable: keys need at least "
                             f"{MIN_KEY_CHARS} characters from A-Z a-z 0-9 . _ ~ + / = -")
    if not keys:
        raise ValueError(f"{source} holds no API key")
    return tuple(dict.fromkeys(keys))


def _read_key_file(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def load_api_keys(key_file: Path | None = None, state_dir: Path | None = None) -> ApiKeys:
    if key_file is not None:
        return ApiKeys(_check_keys(_read_key_file(key_file), str(key_file)), str(key_file))
    env = os.environ.get(ENV_KEYS, "").strip()
    if env:
        keys = [k.strip() for k in env.split(",") if k.strip()]
        return ApiKeys(_check_keys(keys, ENV_KEYS), f"${ENV_KEYS}")
    state = ensure_private_dir(state_dir or default_state_dir())
    path = state / GENERATED_KEY_FILE
    if path.exists():
        return ApiKeys(_check_keys(_read_key_file(path), str(path)), str(path))
    key = secrets.token_urlsafe(32)
    write_private_file(path, "# API key generated on first start; add more keys one per line\n"
                             f"{key}\n")
    return ApiKeys((key,), str(path), generated=key)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyChecker:
    """Constant-time key checks: digests of equal length, compared against every key."""

    def __init__(self, keys: Sequence[str]):
        # compare_digest's time still depends on the lengths; digests hide a key's length.
        self._digests = [_digest(k) for k in keys]

    def is_valid(self, presented: str | None) -> bool:
        if not presented:
            return False
        candidate = _digest(presented)
        matched = False
        for digest in self._digests:  # no early exit: the time says nothing of which matched
            matched |= hmac.compare_digest(candidate, digest)
        return matched

    def from_metadata(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        return self.is_valid(presented_key(metadata))


# RFC 7235: credentials = auth-scheme [ 1*SP token68 ]; the scheme is case-insensitive.
_BEARER = re.compile(r"bearer +([^\s]+)", re.IGNORECASE)


def bearer_token(value: str) -> str | None:
    """The key of an ``Authorization`` value ``Bearer KEY`` (scheme in any case, one or more
    spaces; surrounding white space ignored), else None."""
    match = _BEARER.fullmatch(value.strip(" \t"))
    return match.group(1) if match else None


def presented_key(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The one rule, the same at the gateway (see gateway/envoy_config.py): a non-empty
    ``x-api-token`` is the key; without one, ``authorization: Bearer KEY`` is."""
    token = authorization = None
    for name, value in metadata or ():
        if isinstance(value, bytes):
            continue
        if name == HEADER and token is None and value.strip(" \t"):
            token = value.strip(" \t")
        elif name == "authorization" and authorization is None:
            authorization = value
    if token is not None:
        return token
    return bearer_token(authorization) if authorization is not None else None


UNAUTHENTICATED_MESSAGE = (f"missing or wrong API key: send it in the {HEADER} metadata "
                           "(REST: the X-API-TOKEN header) or as 'authorization: Bearer KEY'")


# Never parse what an unauthenticated caller sent: a refused call's body is not read at all.
def _unread(raw: bytes) -> None:
    return None


def _deny_like(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def deny(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)

    async def deny_stream(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
        yield  # pragma: no cover - makes this an async generator like the real handler

    kwargs = dict(request_deserializer=_unread, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
    return grpc.stream_stream_rpc_method_handler(deny_stream, **kwargs)


MALFORMED_MESSAGE = ("the request could not be read: a text field is not valid UTF-8 (in a "
                     "query string, percent-encode UTF-8 bytes), or the bytes are not the message "
                     "this method takes (see proto/cosyvoice/v1)")


class _Malformed:
    """Stands for a request message that did not parse."""


_MALFORMED = _Malformed()


def _tolerant(deserializer: Callable | None) -> Callable | None:
    """The method's parser, answering _MALFORMED instead of raising (grpcio would answer a parse
    failure with a status that is not INVALID_ARGUMENT)."""
    if deserializer is None:
        return None

    def parse(raw: bytes):
        try:
            return deserializer(raw)
        except Exception:  # DecodeError, invalid UTF-8, ...: the client's bytes, not our bug
            return _MALFORMED
    return parse


async def _refuse_malformed(context) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, MALFORMED_MESSAGE,
                        trailing_metadata=((HTTP_STATUS_KEY, "400"),))


async def _checked_messages(messages, context):
    async for message in messages:
        if message is _MALFORMED:
            await _refuse_malformed(context)
        yield message


def _parse_checked(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """``handler`` whose request messages are checked: one that does not parse ends the call with
    INVALID_ARGUMENT and a message a person can act on (no parser text, no type names)."""
    kwargs = dict(request_deserializer=_tolerant(handler.request_deserializer),
                  response_serializer=handler.response_serializer)
    if handler.unary_unary:
        behaviour = handler.unary_unary

        async def unary_unary(request, context):
            if request is _MALFORMED:
                await _refuse_malformed(context)
            return await behaviour(request, context)
        return grpc.unary_unary_rpc_method_handler(unary_unary, **kwargs)
    if handler.unary_stream:
        behaviour = handler.unary_stream

        async def unary_stream(request, context):
            if request is _MALFORMED:
                await _refuse_malformed(context)
            async for reply in behaviour(request, context):
                yield reply
        return grpc.unary_stream_rpc_method_handler(unary_stream, **kwargs)
    if handler.stream_unary:
        behaviour = handler.stream_unary

        async def stream_unary(messages, context):
            return await behaviour(_checked_messages(messages, context), context)
        return grpc.stream_unary_rpc_method_handler(stream_unary, **kwargs)
    behaviour = handler.stream_stream

    async def stream_stream(messages, context):
        async for reply in behaviour(_checked_messages(messages, context), context):
            yield reply
    return grpc.stream_stream_rpc_method_handler(stream_stream, **kwargs)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call without a valid key, except health checks, before its message is read
    (an unauthenticated caller never reaches the parser); checks that messages parse."""

    def __init__(self, checker: KeyChecker):
        self._checker = checker

    async def intercept_service(
        self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method.startswith(UNAUTHENTICATED_PREFIXES):
            return handler
        if self._checker.from_metadata(handler_call_details.invocation_metadata):
            return _parse_checked(handler)
        return _deny_like(handler)
