"""CosyVoice 3 (Fun-CosyVoice3-0.5B): model parts, model-directory loader and engine."""
