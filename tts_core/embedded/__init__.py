"""The embedded engine: Kokoro-82M int8 ONNX with multilingual G2P, shipped entirely on PyPI.

Import :class:`tts_core.embedded.engine.EmbeddedEngine`; this package itself imports nothing
heavy so that listing engines stays cheap.
"""
