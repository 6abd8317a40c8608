"""The MKDT pipeline: stages 1-5 in order, each skipped when its artifact is already there.

With ``distill.method: krr_st`` stage 5 runs KRR-ST, and stage 3 is skipped unless the
high-loss init needs the experts.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from .config import RunConfig
from .context import LOGGER_NAME, RunContext
from .distill import run_distill
from .experts import list_experts, run_experts
from .initial_set import run_init
from .io import atomic_path
from .targets import run_targets
from .teacher import run_teacher

CONFIG_FILE = "config.yaml"
LOG_FILE = "run.log"


def _experts_then_check(ctx: RunContext, *, force: bool = False) -> Path:
    cfg = ctx.cfg
    if cfg.distill.method == "krr_st" and cfg.init.method == "random":
        ctx.log.info("experts: skipped: distill.method=krr_st needs no expert trajectories and "
                     "init.method=random needs no expert losses")
        return ctx.path("experts")
    run_experts(ctx, force=force)
    list_experts(ctx)  # all experts finished (others may be trained by other processes)
    return ctx.path("experts")


STAGES: dict[str, Callable[..., Path]] = {
    "teacher": run_teacher,
    "targets": run_targets,
    "experts": _experts_then_check,
    "init": run_init,
    "distill": run_distill,
}


def prepare_run(cfg: RunConfig, out_dir: str | Path, *, progress: bool = True) -> RunContext:
    """Validate ``cfg``, create ``out_dir`` and write the resolved ``config.yaml`` into it."""
    cfg.validate()
    ctx = RunContext(cfg, Path(out_dir), progress=progress)
    with atomic_path(ctx.path(CONFIG_FILE)) as tmp:
        tmp.write_text(cfg.to_yaml())
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    return ctx


@contextlib.contextmanager
def run_log(ctx: RunContext) -> Iterator[None]:
    """Append the library's log records to ``RUN_DIR/run.log`` while the block runs."""
    logger = logging.getLogger(LOGGER_NAME)
    handler = logging.FileHandler(ctx.path(LOG_FILE))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()


def run_pipeline(ctx: RunContext, *, stages: list[str] | None = None,
                 force: bool = False) -> dict[str, float]:
    """Run stages in order (all by default); return each stage's wall time in seconds."""
    names = list(STAGES) if stages is None else stages
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages: {list(STAGES)}")
    times: dict[str, float] = {}
    with run_log(ctx):
        for name in names:
            t0 = time.perf_counter()
            STAGES[name](ctx, force=force)
            times[name] = time.perf_counter() - t0
            ctx.log.info("stage %s done in %.1f s", name, times[name])
    return times
