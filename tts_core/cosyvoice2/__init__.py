"""CosyVoice 2 inference, written from scratch: LM, flow, HiFT vocoder, front end."""
