"""Placeholder until the dcnv3 mixer lands: the registry collects MODELS from every mixer module."""
MODELS = {}
