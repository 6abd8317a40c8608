"""``python -m distilled_ssl.cli ...``: the same as the ``distilled-ssl`` command."""

from __future__ import annotations

from .main import main

if __name__ == "__main__":  # pragma: no branch
    main(prog_name="distilled-ssl")
