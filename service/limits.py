"""Every limit the service enforces, in one place (the README's limits table mirrors this).

The gateway derives its own body limit from these values, so Envoy and the gRPC server agree.
"""

from __future__ import annotations

# Text to speak, in characters (code points), surrounding whitespace included.
MAX_TEXT_CHARS = 2000
# SynthesizeTextStream: all pieces of one call together, and how long the engine waits for
# the next piece before the call fails (so an abandoned stream cannot hold a slot forever).
# A whole stream is one LM context (Synthesize splits text into sentences): with about 6
# positions per Chinese character (its text token plus ~5 speech tokens) 4000 characters stay
# well inside CosyVoice 2's 32k positions.
MAX_STREAM_TEXT_CHARS = 4000
TEXT_STREAM_IDLE_SECONDS = 60.0
# Other text fields (prompt transcript, instruction, speaker id).
MAX_PROMPT_TEXT_CHARS = 500
MAX_INSTRUCT_TEXT_CHARS = 500
MAX_SPEAKER_ID_CHARS = 128

# One uploaded audio file (prompt or voice-conversion source), in bytes.
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
# A whole HTTP request body at the gateway: two uploads plus room for form fields.
MAX_REQUEST_BODY_BYTES = 2 * MAX_UPLOAD_BYTES + 1024 * 1024
# A gRPC message the server accepts (same budget as an HTTP body).
MAX_GRPC_MESSAGE_BYTES = MAX_REQUEST_BODY_BYTES

# Prompt audio duration in seconds (the reference server refuses prompts over 30 s).
MAX_PROMPT_SECONDS = 30.0
MIN_PROMPT_SECONDS = 0.5

# Sample rates (Hz) a client may ask for; 0 in gRPC means the engine's native rate.
OUTPUT_SAMPLE_RATES = (8000, 16000, 22050, 24000, 44100, 48000)
# Sample rates of uploaded audio (any value in this range; the engine resamples).
MIN_INPUT_SAMPLE_RATE = 8000
MAX_INPUT_SAMPLE_RATE = 48000
# Channels of an uploaded file (down-mixed to mono); bounds the decoded size.
MAX_INPUT_CHANNELS = 8

# Speaking rate.
MIN_SPEED = 0.5
MAX_SPEED = 2.0

# The reference REST API's output rate, which its clients assume.
REST_DEFAULT_SAMPLE_RATE = 22050

# Open client connections the gateway (Envoy) accepts at once; it refuses new ones beyond.
MAX_GATEWAY_CONNECTIONS = 1024

# Server capacity defaults (overridable on the command line).
DEFAULT_MAX_CONCURRENT = 2
DEFAULT_MAX_QUEUE = 4
# Requests the cosyvoice2 engine's batch scheduler decodes together (1: no scheduler, each
# synthesis on its own thread). Above 1 it is also the number of syntheses running at once.
DEFAULT_MAX_BATCH = 1
