"""Encoders (one registry: :data:`distilled_ssl.registry.MODELS`), the losses, and feature probes."""
