"""Limits only the service knows: bytes on the wire, output rates, capacity, the gateway.

Limits of what a request may ask for (text lengths, speed, prompt duration, input sample rates)
are shared with the engines and live in ``tts_core/limits.py``; the README's limits table
mirrors both files. The gateway derives its body limit from these values, so Envoy and the gRPC
server agree.
"""

from __future__ import annotations

# One uploaded audio file (prompt or voice-conversion source), in bytes.
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
# A whole HTTP request body at the gateway: two uploads plus room for form fields.
MAX_REQUEST_BODY_BYTES = 2 * MAX_UPLOAD_BYTES + 1024 * 1024
# A gRPC message the server accepts (same budget as an HTTP body).
MAX_GRPC_MESSAGE_BYTES = MAX_REQUEST_BODY_BYTES
# The request line and headers of one HTTP request at the gateway (Envoy's default, set
# explicitly); larger ones get 431. A GET with a long text in its query string is legal within it.
MAX_REQUEST_HEADERS_KB = 60
# gRPC metadata the server accepts. Envoy forwards the original URL (query string and all) as
# x-envoy-original-path, so every request the gateway lets through must fit: gRPC's default
# (8 KiB) refused a 2 000-character Chinese text sent as a GET query (percent-encoded, ~18 KB)
# with RESOURCE_EXHAUSTED, which REST clients saw as a 429 listing the headers.
MAX_GRPC_METADATA_BYTES = 2 * MAX_REQUEST_HEADERS_KB * 1024
# Channels of an uploaded file (down-mixed to mono); bounds the decoded size.
MAX_INPUT_CHANNELS = 8

# Sample rates (Hz) a client may ask for; 0 in gRPC means the engine's native rate.
OUTPUT_SAMPLE_RATES = (8000, 16000, 22050, 24000, 44100, 48000)
# The reference REST API's output rate, which its clients assume.
REST_DEFAULT_SAMPLE_RATE = 22050

# Open client connections the gateway (Envoy) accepts at once; it refuses new ones beyond.
MAX_GATEWAY_CONNECTIONS = 1024

# Server capacity defaults (overridable on the command line).
DEFAULT_MAX_CONCURRENT = 2
DEFAULT_MAX_QUEUE = 4
# Requests a CosyVoice engine's batch scheduler decodes together (1: no scheduler, each
# synthesis on its own thread, at most --max-concurrent at once). Above 1 it is also the number
# of syntheses running at once. The embedded engine has no scheduler: it always gets 1.
DEFAULT_MAX_BATCH = 1
# --max-batch of a CosyVoice engine on a CPU unless given (ServerOptions.resolved_max_batch).
# One scheduler thread owns the cores; threads per request (two at a time, each asking for all
# the cores) lost from two streams on. Same run, full-size directory, 2 cores,
# bench_cv2_concurrency.py --baseline: 1 / 2 / 4 streams made 0.78 / 0.79 / 0.79 audio s/s on
# threads, first audio p95 0.86 / 1.81 / 12.0 s; the scheduler 0.81 / 1.09 / 1.28 audio s/s,
# p95 0.85 / 1.25 / 2.02 s. 2 and not more: each running stream gets 1/N of the flow cache
# memory (half of what is free by default) whether or not the others use theirs, and a segment
# longer than its share recomputes the flow on every chunk. With 24 GB a stream holds 43 s of
# prompt + speech at 2 (as under the threads' --max-concurrent 2), 21.6 s at 4, 10.8 s at 8,
# while one segment of the text frontend (80 text tokens) can be 20-25 s of speech. Where
# memory allows, --max-batch 4 or 8 serve more listeners at once (README, "Many listeners at
# once").
CPU_MAX_BATCH = 2
# --max-batch of a CosyVoice engine on a GPU unless given (ServerOptions.resolved_max_batch;
# generated GPU deployments, gateway/k8s.py --gpus, write it out): on an H200,
# bfloat16, the wide scheduler made 5.4 audio seconds a second at 16 streams and 7.3 at 32, but
# 32 streams each waited 4-4.5 s for first audio against 2.0-2.3 s at 16 (README, cosyvoice2).
GPU_MAX_BATCH = 16
