"""Continuous batching of speech-LM requests (one scheduler per engine process)."""
