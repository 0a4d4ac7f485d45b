"""Placeholder: filled in shortly."""
MODELS = {}
