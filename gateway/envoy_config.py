"""Builds the Envoy configuration of the REST gateway (nothing is hand-edited per machine).

One HTTP listener serves:
  * the web page: every file under web/ as a direct response (no key needed to load it);
  * /healthz: 200 while Envoy's active gRPC health check passes for at least one engine server
    (replica), else 503;
  * the REST API: gRPC-JSON transcoding to the gRPC server (X-API-TOKEN checked here and
    again by the server), with audio streamed through as it is produced.
Error bodies are JSON ``{"code": <gRPC code>, "message": "..."}`` (the transcoder writes them
for server errors, ``local_reply_config`` for Envoy's own: 401, 413, ...), except under the
OpenAI-compatible paths, where they are OpenAI's ``{"error": {"message", "type", "param",
"code"}}`` (the server writes its own; ``local_reply_config`` Envoy's), and to gRPC clients
of the same port, where Envoy's own errors carry the plain message as grpc-message.
The engine servers form one cluster (build_cluster): health-checked, least-request balanced,
retried only before a response began, with outlier ejection and per-replica circuit breakers.
"""

from __future__ import annotations

import ipaddress
import mimetypes
from dataclasses import dataclass, field
from pathlib import Path

from gateway.json_fields import LUA_CHECKER, json_schema, lua_tables
from service import limits
from service.errors import HTTP_STATUS_KEY

GRPC_CLUSTER = "tts_grpc"
TRANSCODED_SERVICES = ("cosyvoice.v1.TextToSpeechService", "cosyvoice.v1.RestCompatService",
                       "cosyvoice.v1.OpenAiSpeechService")
# Paths of the OpenAI-compatible API: Envoy's own errors there take OpenAI's error shape.
OPENAI_PATH_PREFIXES = ("/v1/audio/", "/v1/models")
API_KEY_HEADER = "X-API-TOKEN"
STREAM_IDLE_TIMEOUT = "300s"  # no byte for this long ends a stream (a queued request waits)
REQUEST_HEADERS_TIMEOUT = "10s"
# HTTP/1.1 trailer closing every streamed REST reply: the gRPC status the stream ended with
# ("0": complete). A stream cut off by a crash has no terminating chunk at all.
STREAM_STATUS_TRAILER = "x-cosyvoice-status"

_TYPES = "type.googleapis.com/envoy.extensions"
_TEXT_TYPES = {".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript",
               ".css": "text/css", ".json": "application/json", ".svg": "image/svg+xml",
               ".txt": "text/plain", ".map": "application/json"}

# The server puts the HTTP status it means in trailing metadata: gRPC has no code for 413, and
# the transcoder would answer RESOURCE_EXHAUSTED (overload) with 429, where we promise 503.
# The request hook keeps the client's method for the access log (the transcoder rewrites it),
# and applies the key rule of service/auth.py (presented_key) before api_key_auth sees the
# request: a non-empty X-API-TOKEN is the key (an Authorization header is then dropped);
# without one, "Authorization: Bearer KEY" with the scheme in any case (RFC 7235) and one or
# more spaces is rewritten to the exact "Bearer KEY" form the filter knows.
_STATUS_LUA = f"""
function envoy_on_request(handle)
  local headers = handle:headers()
  local method = headers:get(":method")
  handle:streamInfo():dynamicMetadata():set("cosyvoice", "method", method)
  local content_type = headers:get("content-type") or ""
  if string.sub(content_type, 1, 16) == "application/grpc" then  -- before the transcoder's
    handle:streamInfo():dynamicMetadata():set("cosyvoice", "client", "grpc")
  end
  local token = headers:get("{API_KEY_HEADER.lower()}")
  if token ~= nil and string.match(token, "^[ \t]*$") then
    headers:remove("{API_KEY_HEADER.lower()}")
    token = nil
  end
  local authorization = headers:get("authorization")
  if authorization ~= nil then
    local key = string.match(authorization, "^[ \t]*[Bb][Ee][Aa][Rr][Ee][Rr] +([^ \t]+)[ \t]*$")
    if token ~= nil or key == nil then
      headers:remove("authorization")
    else
      headers:replace("authorization", "Bearer " .. key)
    end
  end
end

function envoy_on_response(handle)
  local headers = handle:headers()
  local grpc = headers:get("grpc-status")
  local status = headers:get("{HTTP_STATUS_KEY}")
  if status ~= nil then
    if string.match(status, "^[1-5][0-9][0-9]$") then
      headers:replace(":status", status)
    end
    headers:remove("{HTTP_STATUS_KEY}")
  end
  if grpc ~= nil then
    handle:streamInfo():dynamicMetadata():set("cosyvoice", "grpc", grpc)
  end
  if headers:get(":status") ~= "200" then
    if grpc == nil then  -- the transcoder moved the code into the JSON error body
      local body = handle:body()
      local text = body and body:getBytes(0, math.min(body:length(), 512)) or ""
      grpc = string.match(text, '"code"%s*:%s*(%d+)')
      if grpc ~= nil then
        handle:streamInfo():dynamicMetadata():set("cosyvoice", "grpc", grpc)
      end
    end
    return  -- an error, answered before any audio
  end
  if grpc ~= nil then
    return  -- a reply in one piece (trailers-only)
  end
  -- A streamed reply: pass the chunks through as they come (not buffered), then say in a
  -- trailer how the gRPC stream ended, so a client can tell a broken stream from a whole one.
  headers:add("trailer", "{STREAM_STATUS_TRAILER}")
  for _ in handle:bodyChunks() do end
  local trailers = handle:trailers()
  if trailers ~= nil then
    local code = trailers:get("grpc-status") or "2"
    handle:streamInfo():dynamicMetadata():set("cosyvoice", "grpc", code)
    trailers:add("{STREAM_STATUS_TRAILER}", code)
  end
end
"""

# After the key check (an unauthenticated caller learns nothing of the body): a JSON body the
# transcoder would turn into a message must name only that message's fields, at every level;
# the transcoder itself drops unknown ones silently (see gateway/json_fields.py).
_JSON_FIELDS_LUA = LUA_CHECKER + """
function envoy_on_request(handle)
  local headers = handle:headers()
  local message = json_body_message(headers:get(":method") or "", headers:get(":path") or "")
  if message == nil then
    return
  end
  local body = handle:body()
  if body == nil or body:length() == 0 then
    return
  end
  local field = scan_json(body:getBytes(0, body:length()), message)
  if field ~= nil then
    local info = handle:streamInfo():dynamicMetadata()
    info:set("cosyvoice", "grpc", "3")
    info:set("cosyvoice", "reply", "json_fields")
    local short = string.match(message, "[^.]+$")
    handle:respond({[":status"] = "400", ["content-type"] = "application/json"},
      "unknown field '" .. field .. "' in the JSON body: this endpoint takes a " .. short ..
      " (proto/cosyvoice/v1), whose fields may be written as in the proto or in lowerCamelCase")
  end
end
"""

# (HTTP status of an Envoy-made reply, gRPC code for the JSON body, message or None to keep
# the filter's own text).
_LOCAL_REPLIES = (
    # The transcoder's own 400s carry parser text and proto type names: say what to fix instead.
    (400, 3, "the request does not match this endpoint: an unknown field or query parameter, "
             "a value of the wrong type or out of range (numbers are 32-bit), malformed JSON, or "
             "text that is not UTF-8; the README lists each endpoint's fields"),
    (401, 16, f"missing or wrong API key: send a valid key in the {API_KEY_HEADER} header "
              "(or as 'Authorization: Bearer KEY')"),
    (403, 7, None),
    (404, 5, None),
    (413, 3, f"request body too large: the limit is {limits.MAX_REQUEST_BODY_BYTES} bytes "
              f"(one audio upload at most {limits.MAX_UPLOAD_BYTES // (1024 * 1024)} MiB)"),
    (431, 3, "request headers too large"),
    (503, 14, "the synthesis server is not reachable right now; retry shortly"),
    (504, 4, "the synthesis server did not answer in time"),
)


@dataclass(frozen=True)
class Upstream:
    """One engine server: an IP address (a STATIC host) or a DNS name that Envoy resolves and
    re-resolves (STRICT_DNS: every address it has is one host, as a headless Service gives)."""

    host: str
    port: int

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


@dataclass(frozen=True)
class ClusterOptions:
    """How Envoy spreads requests over the engine servers and stops sending to a broken one."""

    # Active gRPC health checks (grpc.health.v1): a replica that says NOT_SERVING, or does not
    # answer, gets no new requests; one success brings it back (a restarted replica).
    health_interval_s: float = 2.0
    health_timeout_s: float = 3.0  # a busy 2-core machine answers slowly; not a failure yet
    unhealthy_threshold: int = 2
    # Retries (only before the response started, see RETRY_ON): attempts after the first.
    retries: int = 2
    # At most this share of the active requests may be retries at once (so retries cannot
    # multiply an overload), but never fewer than min_retry_concurrency: a replica that dies
    # with that many requests queued in it gets every one of them retried elsewhere.
    retry_budget_percent: float = 50.0
    min_retry_concurrency: int = 64
    # Per-replica circuit breaker: at most this many HTTP/2 connections to a replica (Envoy
    # opens one per worker thread) of at most max_streams_per_replica streams each; more
    # requests wait in Envoy (up to max_pending) or get 503.
    connections_per_replica: int = 4
    max_streams_per_replica: int = 128
    max_pending: int = 1024
    # Passive outlier ejection: this many gateway failures in a row (connect failure, reset,
    # 502/503/504; gRPC UNAVAILABLE counts as 503) take a replica out for a while.
    consecutive_gateway_failures: int = 3
    base_ejection_s: float = 10.0
    max_ejection_percent: int = 50
    # DNS upstreams: how often Envoy re-resolves (replicas come and go with `kubectl scale`).
    dns_refresh_s: float = 5.0
    # Replicas a DNS name is expected to resolve to at most: sizes the cluster-wide limits.
    expected_replicas: int = 16


@dataclass(frozen=True)
class GatewaySettings:
    listen_host: str
    listen_port: int
    upstreams: tuple[Upstream, ...]
    admin_port: int
    descriptor_path: Path
    api_keys: tuple[str, ...]
    web_dir: Path | None
    cluster: ClusterOptions = field(default_factory=ClusterOptions)
    # A listener on this port (all addresses) that serves only /stats/prometheus from the admin
    # interface, which stays on loopback; for a scraper on another machine (Kubernetes).
    stats_port: int | None = None


def web_files(web_dir: Path | None) -> dict[str, Path]:
    """URL path -> file, for every file under web/ (index.html also at /)."""
    if web_dir is None or not web_dir.is_dir():
        return {}
    files = {}
    for path in sorted(web_dir.rglob("*")):
        if path.is_file() and not any(p.startswith(".") for p in path.relative_to(web_dir).parts):
            files["/" + path.relative_to(web_dir).as_posix()] = path.resolve()
    if "/index.html" in files:
        files["/"] = files["/index.html"]
    return files


def content_type(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in _TEXT_TYPES:
        kind = _TEXT_TYPES[suffix]
        return f"{kind}; charset=utf-8" if kind != "image/svg+xml" else kind
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def _disabled() -> dict:
    return {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}


def _static_route(url: str, path: Path) -> dict:
    return {
        "match": {"path": url},
        "direct_response": {"status": 200, "body": {"filename": str(path)}},
        "response_headers_to_add": [
            {"header": {"key": "content-type", "value": content_type(path)},
             "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
            {"header": {"key": "cache-control", "value": "no-cache"},
             "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
        ],
        "typed_per_filter_config": {
            "envoy.filters.http.api_key_auth": _disabled(),
            "envoy.filters.http.grpc_json_transcoder": _disabled(),
        },
    }


def _status_is(status: int) -> dict:
    return {"status_code_filter": {"comparison": {
        "op": "EQ", "value": {"default_value": status,
                              "runtime_key": f"local_reply.status_{status}"}}}}


def _openai_mapper(status: int, message: str | None) -> dict:
    """Envoy's own error ``status`` on an OpenAI path, in OpenAI's error shape."""
    on_openai_path = {"or_filter": {"filters": [
        {"header_filter": {"header": {"name": ":path", "string_match": {"prefix": prefix}}}}
        for prefix in OPENAI_PATH_PREFIXES]}}
    kind = ("authentication_error" if status == 401 else
            "invalid_request_error" if status < 500 else "server_error")
    code = {401: "invalid_api_key", 404: "not_found", 413: "too_large",
            503: "server_unavailable", 504: "timeout"}.get(status, "gateway_error")
    mapper = {
        "filter": {"and_filter": {"filters": [_status_is(status), on_openai_path]}},
        "body_format_override": {"json_format": {"error": {
            "message": "%LOCAL_REPLY_BODY%", "type": kind, "param": None, "code": code}}},
    }
    if message:
        mapper["body"] = {"inline_string": message}
    return mapper


def _grpc_mapper(status: int, message: str | None) -> dict:
    """Envoy's own error ``status`` to a gRPC client (on the gateway's port): Envoy sends the
    body as grpc-message, so it stays the plain sentence, not the REST JSON."""
    # The request hook marks a gRPC client: the transcoder makes every request gRPC upstream.
    is_grpc = {"metadata_filter": {"matcher": {
        "filter": "cosyvoice", "path": [{"key": "client"}],
        "value": {"string_match": {"exact": "grpc"}}},
        "match_if_key_not_found": False}}  # Envoy's default for a missing key: a match
    mapper = {"filter": {"and_filter": {"filters": [_status_is(status), is_grpc]}},
              "body_format_override": {"text_format_source": {
                  "inline_string": "%LOCAL_REPLY_BODY%"}}}
    if message:
        mapper["body"] = {"inline_string": message}
    return mapper


def _local_reply_config() -> dict:
    # First match wins: the unknown-field check's 400 keeps its own message; then gRPC
    # clients' mappers, the OpenAI paths', everyone else's.
    json_fields = {"metadata_filter": {"matcher": {
        "filter": "cosyvoice", "path": [{"key": "reply"}],
        "value": {"string_match": {"exact": "json_fields"}}},
        "match_if_key_not_found": False}}
    mappers = [{
        "filter": {"and_filter": {"filters": [_status_is(400), json_fields]}},
        "body_format_override": {"json_format": {"code": 3, "message": "%LOCAL_REPLY_BODY%"}},
    }]
    mappers += [_grpc_mapper(status, message) for status, _, message in _LOCAL_REPLIES]
    mappers += [_openai_mapper(status, message) for status, _, message in _LOCAL_REPLIES]
    for status, code, message in _LOCAL_REPLIES:
        mapper = {
            "filter": _status_is(status),
            "body_format_override": {"json_format": {"code": code,
                                                     "message": "%LOCAL_REPLY_BODY%"}},
        }
        if message:
            mapper["body"] = {"inline_string": message}
        mappers.append(mapper)
    # Any other Envoy-made error: same JSON shape, gRPC UNKNOWN. Successful direct responses
    # (the web page) are left alone.
    mappers.append({
        "filter": {"status_code_filter": {"comparison": {
            "op": "GE", "value": {"default_value": 400, "runtime_key": "local_reply.errors"}}}},
        "body_format_override": {"json_format": {"code": 2, "message": "%LOCAL_REPLY_BODY%"}},
    })
    return {"mappers": mappers}


# The access log names no header and no query string: keys and texts stay out of it.
_ACCESS_LOG_FORMAT = ('[%START_TIME%] "%DYNAMIC_METADATA(cosyvoice:method)% '
                      '%PATH(NQ:ORIG_OR_PATH)% %PROTOCOL%" '
                      "%RESPONSE_CODE% %RESPONSE_FLAGS% grpc=%DYNAMIC_METADATA(cosyvoice:grpc)% "
                      "in=%BYTES_RECEIVED% out=%BYTES_SENT% %DURATION%ms "
                      "ttfb=%RESPONSE_DURATION%ms\n")


def _seconds(value: float) -> str:
    return f"{value:g}s"


# Retried: the request never reached a replica (connect failure; HTTP/2 REFUSED_STREAM, which a
# draining server sends for streams it did not start), the connection died before the reply's
# headers (reset: a killed replica's queued requests), or the reply is a trailers-only gRPC
# UNAVAILABLE (a replica that is stopping). Envoy's router retries only until it has passed
# the upstream's response headers downstream; after that an upstream reset resets the client's
# stream, so a stream that has sent audio is never replayed (nor silently restarted).
RETRY_ON = "connect-failure,refused-stream,reset,unavailable"


def retry_policy(o: ClusterOptions) -> dict:
    return {
        "retry_on": RETRY_ON,
        "num_retries": o.retries,
        # A retry goes to another replica than the ones already tried, where there is one.
        "retry_host_predicate": [{
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {"@type": f"{_TYPES}.retry.host.previous_hosts.v3"
                                      ".PreviousHostsPredicate"}}],
        "host_selection_retry_max_attempts": 5,
        "retry_back_off": {"base_interval": "0.025s", "max_interval": "0.25s"},
    }


def build_cluster(upstreams: tuple[Upstream, ...], o: ClusterOptions) -> dict:
    """The engine servers' cluster: one host per upstream (STATIC when every upstream is an IP
    address, else STRICT_DNS, which makes one host of every address a name resolves to)."""
    if not upstreams:
        raise ValueError("at least one upstream engine server is needed")
    static = all(u.is_ip for u in upstreams)
    replicas = len(upstreams) if static else max(len(upstreams), o.expected_replicas)
    cluster = {
        "name": GRPC_CLUSTER,
        "type": "STATIC" if static else "STRICT_DNS",
        "connect_timeout": "2s",
        # The replica with the fewest active requests (of two picked at random) gets the next
        # one: syntheses last seconds, so round robin would pile them up on a slow replica.
        "lb_policy": "LEAST_REQUEST",
        "load_assignment": {"cluster_name": GRPC_CLUSTER, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": u.host,
                                                          "port_value": u.port}}}}
            for u in upstreams]}]},
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": f"{_TYPES}.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {
                    "max_concurrent_streams": o.max_streams_per_replica}},
            }},
        # A replica on a machine that vanished sends no RST: TCP keepalive finds it out. (Not
        # HTTP/2 PINGs: grpcio answers frequent PINGs on a connection without data, such as
        # one carrying only queued requests, with GOAWAY "too_many_pings".)
        "upstream_connection_options": {"tcp_keepalive": {
            "keepalive_time": 30, "keepalive_interval": 10, "keepalive_probes": 3}},
        # The one unauthenticated gRPC call; /healthz reflects it. If every replica fails it,
        # Envoy's panic threshold routes to all of them anyway, so a slow check never blocks.
        "health_checks": [{"timeout": _seconds(o.health_timeout_s),
                           "interval": _seconds(o.health_interval_s),
                           "no_traffic_interval": _seconds(o.health_interval_s),
                           "unhealthy_threshold": o.unhealthy_threshold,
                           "healthy_threshold": 1, "grpc_health_check": {}}],
        # A replica added by DNS (scaled up) gets requests once it has said SERVING.
        "common_lb_config": {"ignore_new_hosts_until_first_hc": True},
        "outlier_detection": {
            "consecutive_gateway_failure": o.consecutive_gateway_failures,
            "enforcing_consecutive_gateway_failure": 100,
            "consecutive_5xx": 5,
            "enforcing_success_rate": 0,  # too few replicas for statistics
            "interval": "5s",
            "base_ejection_time": _seconds(o.base_ejection_s),
            "max_ejection_percent": o.max_ejection_percent,
        },
        "circuit_breakers": {
            "thresholds": [{
                "priority": "DEFAULT",
                "max_connections": replicas * o.connections_per_replica,
                "max_pending_requests": o.max_pending,
                "max_requests": replicas * o.max_streams_per_replica,
                "retry_budget": {"budget_percent": {"value": o.retry_budget_percent},
                                 "min_retry_concurrency": o.min_retry_concurrency},
            }],
            "per_host_thresholds": [{"priority": "DEFAULT",
                                     "max_connections": o.connections_per_replica}],
        },
    }
    if not static:
        cluster.update({"dns_refresh_rate": _seconds(o.dns_refresh_s),
                        "dns_lookup_family": "V4_PREFERRED"})
    return cluster


def build_config(s: GatewaySettings) -> dict:
    files = web_files(s.web_dir)
    max_file = max((p.stat().st_size for p in files.values()), default=0)
    routes = [_static_route(url, path) for url, path in files.items()]
    schema = json_schema(s.descriptor_path, TRANSCODED_SERVICES)
    json_tables = lua_tables(schema)
    # No overall timeout: a long text streams for minutes. Idle streams still end.
    upstream = {"cluster": GRPC_CLUSTER, "timeout": "0s", "idle_timeout": STREAM_IDLE_TIMEOUT,
                "retry_policy": retry_policy(s.cluster)}
    # The unknown-field check reads a JSON body whole: on those routes Envoy may hold a body
    # up to the transcoder's limit (elsewhere it streams under the default 1 MiB window).
    routes += [{
        "match": {"safe_regex": {"regex": route.path_regex},
                  "headers": [{"name": ":method", "string_match": {"exact": route.method}}]},
        "route": upstream,
        "request_body_buffer_limit": limits.MAX_REQUEST_BODY_BYTES,
    } for route in schema.routes]
    routes.append({"match": {"prefix": "/"}, "route": upstream})
    # Requests pass these in order, responses in reverse: the Lua filter therefore sees the
    # transcoder's HTTP response (status mapping) and every request, even refused ones.
    http_filters = [
        {"name": "envoy.filters.http.health_check", "typed_config": {
            "@type": f"{_TYPES}.filters.http.health_check.v3.HealthCheck",
            "pass_through_mode": False,
            "headers": [{"name": ":path", "string_match": {"exact": "/healthz"}}],
            # 200 while at least one replica passes its health check: 1 % (Envoy rounds the
            # value down to a whole percent; 0 would always pass) holds up to 100 replicas.
            "cluster_min_healthy_percentages": {GRPC_CLUSTER: {"value": 1}},
        }},
        {"name": "envoy.filters.http.lua", "typed_config": {
            "@type": f"{_TYPES}.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": _STATUS_LUA},
        }},
        {"name": "envoy.filters.http.api_key_auth", "typed_config": {
            "@type": f"{_TYPES}.filters.http.api_key_auth.v3.ApiKeyAuth",
            "credentials": [{"key": key, "client": f"client{i}"}
                            for i, key in enumerate(s.api_keys, 1)],
            # Envoy strips a "Bearer " prefix, so "Authorization: Bearer KEY" works as well.
            "key_sources": [{"header": API_KEY_HEADER}, {"header": "Authorization"}],
        }},
        {"name": "cosyvoice.json_fields", "typed_config": {
            "@type": f"{_TYPES}.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": json_tables + _JSON_FIELDS_LUA},
        }},
        {"name": "envoy.filters.http.grpc_json_transcoder", "typed_config": {
            "@type": f"{_TYPES}.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
            "proto_descriptor": str(s.descriptor_path),
            "services": list(TRANSCODED_SERVICES),
            "print_options": {"add_whitespace": False, "always_print_primitive_fields": True,
                              "always_print_enums_as_ints": False,
                              "preserve_proto_field_names": True,
                              "stream_newline_delimited": True},
            "convert_grpc_status": True,
            "max_request_body_size": limits.MAX_REQUEST_BODY_BYTES,
            "request_validation_options": {"reject_unknown_method": True,
                                           "reject_unknown_query_parameters": True},
        }},
        {"name": "envoy.filters.http.router", "typed_config": {
            "@type": f"{_TYPES}.filters.http.router.v3.Router"}},
    ]
    hcm = {
        "@type": f"{_TYPES}.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "rest",
        # Trailers reach HTTP/1.1 clients (chunked encoding): STREAM_STATUS_TRAILER.
        "http_protocol_options": {"enable_trailers": True},
        "codec_type": "AUTO",
        "stream_idle_timeout": STREAM_IDLE_TIMEOUT,
        "request_timeout": "0s",  # an upload on a slow link may take long; idle ones still end
        # Clients send their headers at once; one that trickles them only holds a connection.
        "request_headers_timeout": REQUEST_HEADERS_TIMEOUT,
        "max_request_headers_kb": limits.MAX_REQUEST_HEADERS_KB,
        "access_log": [{"name": "envoy.access_loggers.stderr", "typed_config": {
            "@type": f"{_TYPES}.access_loggers.stream.v3.StderrAccessLog",
            "log_format": {"text_format_source": {"inline_string": _ACCESS_LOG_FORMAT}},
        }}],
        "local_reply_config": _local_reply_config(),
        "route_config": {
            "name": "rest",
            "max_direct_response_body_size_bytes": max(4096, max_file + 1),
            "virtual_hosts": [{"name": "tts", "domains": ["*"], "routes": routes}],
        },
        "http_filters": http_filters,
    }
    cluster = build_cluster(s.upstreams, s.cluster)
    listeners = [{
        "name": "rest",
        "address": {"socket_address": {"address": s.listen_host, "port_value": s.listen_port}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": hcm}]}],
    }]
    clusters = [cluster]
    if s.stats_port is not None:
        listeners.append(_stats_listener(s.stats_port))
        clusters.append(_admin_cluster(s.admin_port))
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                 "port_value": s.admin_port}}},
        # Envoy accepts any number of connections unless told otherwise; beyond this many it
        # refuses new ones (each idle keep-alive connection costs memory, not engine time).
        "overload_manager": {"resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {
                "@type": f"{_TYPES}.resource_monitors.downstream_connections.v3"
                         ".DownstreamConnectionsConfig",
                "max_active_downstream_connections": limits.MAX_GATEWAY_CONNECTIONS,
            },
        }]},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


_ADMIN_CLUSTER = "envoy_admin"
PROMETHEUS_PATH = "/stats/prometheus"


def _stats_listener(port: int) -> dict:
    """Only Envoy's Prometheus stats, from the admin interface; every other path is 404 (the
    admin interface can change Envoy's state and never leaves loopback)."""
    hcm = {
        "@type": f"{_TYPES}.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "stats",
        "route_config": {"name": "stats", "virtual_hosts": [{
            "name": "stats", "domains": ["*"], "routes": [
                {"match": {"path": PROMETHEUS_PATH}, "route": {"cluster": _ADMIN_CLUSTER}},
                {"match": {"prefix": "/"}, "direct_response": {"status": 404}},
            ]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": f"{_TYPES}.filters.http.router.v3.Router"}}],
    }
    return {
        "name": "stats",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": hcm}]}],
    }


def _admin_cluster(admin_port: int) -> dict:
    return {
        "name": _ADMIN_CLUSTER, "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": _ADMIN_CLUSTER, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                          "port_value": admin_port}}}}]}]},
    }
