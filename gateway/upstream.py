"""``--upstream HOST:PORT,HOST:PORT``: the engine servers a gateway-only Envoy sends to."""

from __future__ import annotations

import re

from gateway.envoy_config import Upstream

_EXAMPLE = "e.g. 10.0.0.5:50051,10.0.0.6:50051 or engine.tts.svc.cluster.local:50051"
# A DNS name (RFC 1123 labels; Kubernetes Service names are of this form).
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")


def parse_upstream(item: str) -> Upstream:
    """One ``HOST:PORT`` (an IPv6 address in brackets: ``[::1]:50051``)."""
    text = item.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        ip_required = True
    else:
        host, sep, port = text.rpartition(":")
        ip_required = False
    if not sep or not host:
        raise ValueError(f"--upstream: {item!r} is not HOST:PORT ({_EXAMPLE})")
    if not re.fullmatch(r"[0-9]{1,5}", port) or not 1 <= int(port) <= 65535:
        raise ValueError(f"--upstream: {item!r} has no valid port (a number from 1 to 65535)")
    upstream = Upstream(host, int(port))
    if ip_required and not upstream.is_ip:
        raise ValueError(f"--upstream: {item!r}: only an IPv6 address goes in brackets")
    if ":" in host and not ip_required:
        raise ValueError(f"--upstream: {item!r}: an IPv6 address goes in brackets "
                         "([::1]:50051)")
    if not upstream.is_ip and ( not _HOSTNAME.fullmatch(host) or len(host) > 253):
        raise ValueError(f"--upstream: {item!r}: {host!r} is neither an IP address nor a DNS "
                         "name (IPv6 addresses go in brackets: [::1]:50051)")
    return upstream


def parse_upstreams(text: str) -> tuple[Upstream, ...]:
    """Comma-separated ``HOST:PORT`` items; each is one engine server, or, for a DNS name,
    every address the name resolves to (a Kubernetes headless Service gives one per pod)."""
    items = text.split(",")
    if not text.strip() or any(not item.strip() for item in items):
        raise ValueError(f"--upstream: an empty item in {text!r} ({_EXAMPLE})")
    upstreams = tuple(parse_upstream(item) for item in items)
    if len(set(upstreams)) != len(upstreams):
        raise ValueError(f"--upstream: {text!r} names the same server twice")
    return upstreams
