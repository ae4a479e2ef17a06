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
