"""The MKDT pipeline: stages 1-6 from one table (:data:`STAGES`), in order.

Stages 1-5 are each skipped when their artifact is already there; stage 6 (``eval``) runs when
asked for (``evaluate=True`` or by name). With ``distill.method: krr_st`` stage 5 runs KRR-ST, and
stage 3 is skipped unless the high-loss init needs the experts.

Under torchrun (:mod:`distilled_ssl.distributed`) the stages of :data:`SHARDED_STAGES` run on every
rank and split their work; the others run on rank 0 while the rest wait. Rank 0 writes the shared
artifacts, ``config.yaml`` and ``run.log``; a barrier ends every stage.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from .allocator import reuse_freed_memory
from .config import RunConfig
from .distributed import barrier, init_from_env, is_main, rank, world_size
from .errors import ArtifactError, ConfigError, DeviceError
from .evaluation.run import evaluate_run
from .io import atomic_path, check_fingerprint, read_metadata, storage_error
from .layout import (
    CONFIG_FILE,
    EXPERTS_DIR,
    INIT_FILE,
    LOG_FILE,
    RESULTS_FILE,
    STATE_FILE,
    TARGETS_FILE,
    TEACHER_FILE,
)
from .registry import Registry
from .stages.context import LOGGER_NAME, RunContext
from .stages.distill import run_distill
from .stages.distill.common import distill_fingerprint
from .stages.experts import (
    check_expert,
    expert_path,
    experts_fingerprint,
    list_experts,
    run_experts,
    student_views,
)
from .stages.init import init_fingerprint, run_init
from .stages.targets import run_targets, targets_fingerprint
from .stages.teacher import run_teacher, teacher_fingerprint

__all__ = ["BUILD_STAGES", "STAGES", "check_device", "prepare_run", "run_log", "run_pipeline"]


def _experts_then_check(ctx: RunContext, *, force: bool = False) -> Path:
    cfg = ctx.cfg
    if not cfg.needs_experts:
        ctx.log.info("experts: skipped: distill.method=%s needs no expert trajectories and "
                     "init.method=%s needs no expert losses", cfg.distill.method, cfg.init.method)
        return ctx.path(EXPERTS_DIR)
    for view in student_views(ctx):  # the student's experts, then each extra student's
        run_experts(view, force=force)  # waits for experts that other processes are training
        barrier()  # under torchrun: every rank's experts are written
        list_experts(view, verify=False)  # all experts finished (run_experts verified them)
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


def runs_on_every_rank(ctx: RunContext, stage: str) -> bool:
    """Whether a stage splits its work over the torchrun ranks (else rank 0 runs it alone)."""
    cfg = ctx.cfg
    return (stage in ("targets", "experts", "eval")
            or (stage == "teacher" and cfg.teacher.mode == "train")
            or (stage == "distill" and cfg.distill.method == "mkdt"))


def prepare_run(cfg: RunConfig, out_dir: str | Path, *, progress: bool = True,
                force: bool = False) -> RunContext:
    """Validate ``cfg`` and the device, create ``out_dir`` and write the resolved ``config.yaml``.

    When ``out_dir`` already holds a run made with another configuration, the artifacts the stages
    would reuse are checked first (unless ``force``: they will be rebuilt): a refused change raises
    before anything is written, so a plain rerun still finds the old ``config.yaml``. Under
    torchrun this joins the job; rank 0 writes ``config.yaml``.
    """
    if not str(out_dir).strip():
        raise ConfigError("the run directory (--out) is an empty path; name a folder")
    cfg.validate()
    check_device(cfg.device)
    init_from_env(cfg.device)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"the run directory {out} is a file; name a folder (--out)")
    config_file = out / CONFIG_FILE
    text = cfg.to_yaml()
    changed = config_file.is_file() and config_file.read_text(encoding="utf-8") != text
    try:
        ctx = RunContext(cfg, out, progress=progress and is_main())
        if changed and not force:
            _check_reuse(ctx)
        if is_main() and (not config_file.is_file() or changed):
            with atomic_path(config_file) as tmp:
                tmp.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise (storage_error(exc, out) or exc) from exc
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    set_allocator(cfg)
    barrier()  # no rank reads config.yaml before rank 0 has written it
    return ctx


def set_allocator(cfg: RunConfig) -> None:
    """On a CPU run with ``reuse_freed_memory`` (the default), have glibc keep freed memory for reuse
    (:mod:`~distilled_ssl.allocator`; a process-wide setting, made by the run's entry points)."""
    if cfg.reuse_freed_memory and torch.device(cfg.device).type == "cpu":
        reuse_freed_memory()


def check_device(device: str) -> None:
    """``DeviceError`` unless this machine's PyTorch can run on ``device`` (cpu, cuda[:N], mps)."""
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"device {device!r} is not a device name ({exc}); use cpu, cuda or cuda:N") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r} asked for but CUDA is not available; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device!r} asked for but this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceError(f"device {device!r} asked for but this PyTorch has no MPS (Apple GPU) "
                              "support here; use --device cpu")


def _check_reuse(ctx: RunContext) -> None:
    """Raise the error a stage would raise for an artifact this configuration may not reuse
    (fingerprints only; up to the first stage whose input is missing)."""
    if not ctx.path(TEACHER_FILE).exists():
        return
    check_fingerprint(ctx.path(TEACHER_FILE), teacher_fingerprint(ctx), "teacher", verify=False)
    if not ctx.path(TARGETS_FILE).exists():
        return
    check_fingerprint(ctx.path(TARGETS_FILE), targets_fingerprint(ctx), "targets", verify=False)
    cfg = ctx.cfg
    for view in student_views(ctx) if cfg.needs_experts else []:
        fp = experts_fingerprint(view)
        for k in range(cfg.experts.num_experts):
            path = expert_path(view, k)
            if path.exists():
                check_expert(view, path, read_metadata(path), fp)
    check_fingerprint(ctx.path(INIT_FILE), init_fingerprint(ctx), "init", verify=False)
    state = ctx.path(STATE_FILE)
    if state.exists() and read_metadata(state).get("fingerprint") != distill_fingerprint(ctx):
        raise ArtifactError(f"{state} belongs to a run with a different configuration; re-run with "
                            "--force or use a new --out directory")


@contextlib.contextmanager
def run_log(ctx: RunContext) -> Iterator[None]:
    """Append the library's log records to ``RUN_DIR/run.log`` while the block runs (rank 0's
    under torchrun)."""
    if not is_main():
        yield
        return
    logger = logging.getLogger(LOGGER_NAME)
    try:
        handler = logging.FileHandler(ctx.path(LOG_FILE))
    except OSError as exc:
        raise (storage_error(exc, ctx.path(LOG_FILE)) or exc) from exc
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
    ``eval.enabled``); return each stage's wall time in seconds (under torchrun: this rank's,
    up to the barrier that ends the stage)."""
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
            try:
                if is_main() or runs_on_every_rank(ctx, name):
                    STAGES[name](ctx, force=force)
            except BaseException as exc:
                if world_size() > 1:  # the other ranks are left waiting; torchrun ends them
                    ctx.log.error("rank %d of %d: stage %s failed: %s: %s", rank(), world_size(),
                                  name, type(exc).__name__, exc)
                raise
            barrier()
            times[name] = time.perf_counter() - t0
            ctx.log.info("stage %s done in %.1f s", name, times[name])
    return times
