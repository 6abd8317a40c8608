"""The ``distilled-ssl`` command line: ``main`` is the click group (the console entry point)."""

from __future__ import annotations

from .main import main

__all__ = ["main"]
