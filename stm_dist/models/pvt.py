"""Placeholder until the pvt mixer lands: the registry collects MODELS from every mixer module."""
MODELS = {}
