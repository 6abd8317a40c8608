"""Stage 5: distil the init subset into the synthetic set, by ``distill.method`` (a registry:
:data:`distilled_ssl.registry.DISTILL_METHODS`). MKDT (:mod:`.mkdt`, the library's method) and
KRR-ST (:mod:`.krr_st`, the baseline) share the loop's bookkeeping (:mod:`.common`)."""

from __future__ import annotations

from pathlib import Path

from ...registry import DISTILL_METHODS
from ..context import RunContext


def run_distill(ctx: RunContext, *, force: bool = False) -> Path:
    """Stage 5: write ``distilled.safetensors`` and ``distilled.png`` (resumable) with the method
    that ``distill.method`` names."""
    return DISTILL_METHODS[ctx.cfg.distill.method](ctx, force=force)
