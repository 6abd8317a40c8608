"""The MKDT pipeline: stages 1-6 from one table (:data:`STAGES`), in order.

Stages 1-5 are each skipped when their artifact is already there; stage 6 (``eval``) runs when
asked for (``evaluate=True`` or by name). With ``distill.method: krr_st`` stage 5 runs KRR-ST, and
stage 3 is skipped unless the high-loss init needs the experts.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from .config import RunConfig
from .errors import ConfigError
from .evaluation.run import evaluate_run
from .io import atomic_path
from .layout import CONFIG_FILE, EXPERTS_DIR, LOG_FILE, RESULTS_FILE
from .registry import Registry
from .stages.context import LOGGER_NAME, RunContext
from .stages.distill import run_distill
from .stages.experts import list_experts, run_experts
from .stages.init import run_init
from .stages.targets import run_targets
from .stages.teacher import run_teacher

__all__ = ["BUILD_STAGES", "STAGES", "prepare_run", "run_log", "run_pipeline"]


def _experts_then_check(ctx: RunContext, *, force: bool = False) -> Path:
    cfg = ctx.cfg
    if cfg.distill.method == "krr_st" and cfg.init.method == "random":
        ctx.log.info("experts: skipped: distill.method=krr_st needs no expert trajectories and "
                     "init.method=random needs no expert losses")
        return ctx.path(EXPERTS_DIR)
    run_experts(ctx, force=force)
    list_experts(ctx)  # all experts finished (others may be trained by other processes)
    return ctx.path(EXPERTS_DIR)


def _evaluate(ctx: RunContext, *, force: bool = False) -> Path:
    """Stage 6: always runs (``force`` has nothing to redo); writes ``results.json`` and co."""
    evaluate_run(ctx)
    return ctx.path(RESULTS_FILE)


STAGES: Registry[Callable[..., Path]] = Registry("stage", {
    "teacher": run_teacher,
    "targets": run_targets,
    "experts": _experts_then_check,
    "init": run_init,
    "distill": run_distill,
    "eval": _evaluate,
})
BUILD_STAGES = ("teacher", "targets", "experts", "init", "distill")  # what makes the distilled set


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


def run_pipeline(ctx: RunContext, *, stages: list[str] | None = None, force: bool = False,
                 evaluate: bool = False) -> dict[str, float]:
    """Run stages in order (default: stages 1-5, then the evaluation when ``evaluate`` and
    ``eval.enabled``); return each stage's wall time in seconds."""
    names = list(BUILD_STAGES) if stages is None else stages
    if stages is None and evaluate and ctx.cfg.eval.enabled:
        names.append("eval")
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; stages: {list(STAGES)}")
    times: dict[str, float] = {}
    with run_log(ctx):
        for name in names:
            t0 = time.perf_counter()
            STAGES[name](ctx, force=force)
            times[name] = time.perf_counter() - t0
            ctx.log.info("stage %s done in %.1f s", name, times[name])
    return times
