"""Stage 3 — expert trajectories: students trained by knowledge distillation, checkpointed.

Each expert is a fresh, seeded student trained with SGD on MSE to the target representations (no
augmentation). Its parameters (and float buffers, for BN students) at step 0 and every
``checkpoint_every_steps`` (default: every epoch) up to the last one stage 5 or 4 reads are stored
as rows of ``params`` [T, P] in ``experts/expert_NNNNN.safetensors``. Experts are independent:
each is claimed with a lock file, written atomically and resumable per epoch, so several processes
can fill one directory.
"""

from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.sources import normalize
from ..errors import ArtifactError, ConfigError, DivergenceError
from ..io import load_rows, load_tensors, read_metadata, save_tensors
from ..layout import EXPERT_PATTERN, EXPERTS_DIR, TARGETS_FILE
from ..models.encoders import FlatParams, seeded
from ..models.losses import kd_loss
from .context import RunContext, combine, student_for
from .targets import load_targets


@dataclass(frozen=True)
class ExpertSchedule:
    """Where checkpoints fall: ``every`` steps apart, ``count`` of them from step 0."""

    steps_per_epoch: int
    every: int
    count: int

    def step_of(self, epoch: float) -> int:
        return round(epoch * self.steps_per_epoch)

    def index_near(self, epoch: float) -> int:
        """The stored checkpoint nearest to an epoch (fractional epochs allowed)."""
        return min(self.count - 1, max(0, round(self.step_of(epoch) / self.every)))


def schedule_for(ctx: RunContext, n: int | None = None) -> ExpertSchedule:
    cfg = ctx.cfg
    n = len(ctx.train_set) if n is None else n
    spe = math.ceil(n / cfg.experts.batch_size)
    every = cfg.experts.checkpoint_every_steps or spe
    needed = max(cfg.distill.max_start_epoch + cfg.distill.expert_epochs, cfg.init.loss_epoch)
    last = min(round(needed * spe), cfg.experts.epochs * spe)
    if every > last:
        raise ConfigError(f"experts.checkpoint_every_steps={every} is more than the {last} steps the experts "
                         f"train ({n} images, batch {cfg.experts.batch_size}); lower it")
    return ExpertSchedule(spe, every, math.ceil(last / every) + 1)


def experts_fingerprint(ctx: RunContext, count: int | None = None) -> str:
    """The experts' fingerprint; ``count`` = the trajectory length (default: what the config needs)."""
    tpath = ctx.path(TARGETS_FILE)
    if not tpath.exists():
        raise ArtifactError(f"{tpath} is missing: run the targets stage first")
    cfg = ctx.cfg
    sched = schedule_for(ctx)
    return combine(read_metadata(tpath)["fingerprint"], "experts", str(cfg.seed),
                   cfg.section_hash("student", "experts.epochs", "experts.batch_size", "experts.lr",
                                    "experts.momentum", "experts.weight_decay"),
                   f"{sched.every}:{sched.count if count is None else count}")


def check_expert(ctx: RunContext, path: Path, meta: dict[str, Any], fp: str) -> None:
    """Raise unless the expert file fits the config: same training, and a trajectory at least as
    long as distillation reads (a longer one, made for a later start or span, is reused)."""
    if meta.get("fingerprint") == fp:
        return
    n = int(meta.get("num_checkpoints", 0))
    if n and meta.get("fingerprint") == experts_fingerprint(ctx, count=n):
        sched = schedule_for(ctx)
        if n >= sched.count:
            return
        stops = (n - 1) * sched.every / sched.steps_per_epoch
        needs = (sched.count - 1) * sched.every / sched.steps_per_epoch
        raise ArtifactError(
            f"{path} stops at epoch {stops:.3g}; this configuration reads checkpoints up to epoch "
            f"{needs:.3g} (distill.max_start_epoch + distill.expert_epochs, init.loss_epoch): re-run "
            "the experts stage with --force, or use a new --out directory")
    raise ArtifactError(f"{path} was made with a different configuration; re-run the experts stage "
                        "with --force, or use a new --out directory")


def expert_path(ctx: RunContext, k: int) -> Path:
    return ctx.path(EXPERTS_DIR) / EXPERT_PATTERN.format(k)


def run_experts(ctx: RunContext, *, force: bool = False) -> list[Path]:
    """Stage 3: train the experts this process can claim; return the finished expert files.

    Experts held by another live process are left to it; the caller can check that all
    ``experts.num_experts`` files exist before distilling.
    """
    fp = experts_fingerprint(ctx)
    reps = load_targets(ctx)
    done: list[Path] = []
    busy: list[int] = []
    for k in range(ctx.cfg.experts.num_experts):
        path = expert_path(ctx, k)
        if path.exists() and not force:
            check_expert(ctx, path, read_metadata(path), fp)
            done.append(path)
            continue
        with _ExpertLock(path.with_suffix(".lock")) as lock:
            if not lock.acquired:
                busy.append(k)
                continue
            if path.exists() and not force:  # another process finished it meanwhile
                done.append(path)
                continue
            train_expert(ctx, k, reps, fp, resume=not force)
            done.append(path)
    if busy:
        ctx.log.info("experts: %s are being trained by other processes", busy)
    return done


def train_expert(ctx: RunContext, k: int, reps: torch.Tensor, fingerprint: str, *,
                 resume: bool = True) -> Path:
    """Train expert ``k`` and write its trajectory file (resuming from its partial file if any)."""
    cfg, ec = ctx.cfg, ctx.cfg.experts
    data = ctx.train_set
    dev = ctx.device
    n = len(data)
    sched = schedule_for(ctx)
    last_step = (sched.count - 1) * sched.every
    with seeded(ctx.seed_for("expert", k)):
        model = student_for(ctx, reps.shape[1]).to(dev)
    flat = FlatParams(model)
    opt = torch.optim.SGD(model.parameters(), lr=ec.lr, momentum=ec.momentum,
                          weight_decay=ec.weight_decay)
    params_rows = [flat.flatten().cpu()]
    buffer_rows = [flat.flatten_buffers().cpu()]
    epoch_losses: list[float] = []
    start_epoch = 0
    partial = expert_path(ctx, k).with_suffix(".partial.safetensors")
    if resume and partial.exists():
        state = _read_partial(partial, fingerprint)
        if state is not None:
            flat.load(state["theta"].to(dev), state["buffers"].to(dev))
            for p, m in zip(model.parameters(), torch.split(state["momentum"], flat.numels), strict=True):
                opt.state[p]["momentum_buffer"] = m.view_as(p).clone().to(dev)
            params_rows = list(state["params"])
            buffer_rows = list(state["buffers_rows"])
            epoch_losses = state["meta"]["epoch_losses"]
            start_epoch = state["meta"]["epoch"]
            ctx.log.info("expert %d: resuming after epoch %d", k, start_epoch)
    reps_dev = reps.to(dev)
    mean, std = data.mean, data.std
    epochs = math.ceil(last_step / sched.steps_per_epoch)
    step = start_epoch * sched.steps_per_epoch
    bar = ctx.bar(total=last_step, initial=step, desc=f"expert {k + 1}/{ec.num_experts}")
    for epoch in range(start_epoch, epochs):
        model.train()
        order = torch.randperm(n, generator=ctx.generator("expert", k, "epoch", epoch))
        t0, total_loss, seen = time.perf_counter(), torch.zeros((), device=dev), 0
        for i in range(sched.steps_per_epoch):
            if step >= last_step:
                break
            idx = order[i * ec.batch_size:(i + 1) * ec.batch_size]
            x = normalize(data.images[idx].to(dev, non_blocking=True), mean, std)
            loss = kd_loss(model(x), reps_dev[idx.to(dev)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total_loss += loss.detach() * len(idx)
            seen += len(idx)
            step += 1
            if step % sched.every == 0:
                params_rows.append(flat.flatten().cpu())
                buffer_rows.append(flat.flatten_buffers().cpu())
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
        dt = time.perf_counter() - t0
        epoch_losses.append(float(total_loss) / max(seen, 1))
        ctx.log.info("expert %d epoch %d: KD loss %.5f, %.0f images/s", k, epoch + 1,
                     epoch_losses[-1], seen / dt)
        if not math.isfinite(epoch_losses[-1]):
            raise DivergenceError(f"expert {k} diverged (loss {epoch_losses[-1]}); lower experts.lr")
        if step < last_step:
            _write_partial(partial, model, flat, opt, params_rows, buffer_rows,
                           {"epoch": epoch + 1, "epoch_losses": epoch_losses,
                            "fingerprint": fingerprint})
    bar.close()
    c, h, _ = data.shape
    meta: dict[str, Any] = {
        "kind": "expert", "index": k, "fingerprint": fingerprint, "arch": cfg.student.arch,
        "kwargs": cfg.student.kwargs, "in_channels": c, "image_size": h, "output_dim": reps.shape[1],
        "steps_per_epoch": sched.steps_per_epoch, "checkpoint_every": sched.every,
        "num_checkpoints": len(params_rows), "epoch_losses": epoch_losses, "mean": list(mean),
        "std": list(std), "seed": ctx.seed_for("expert", k)}
    tensors = {"params": torch.stack(params_rows)}
    if buffer_rows[0].numel():
        tensors["buffers"] = torch.stack(buffer_rows)
    out = expert_path(ctx, k)
    save_tensors(out, tensors, meta)
    partial.unlink(missing_ok=True)
    return out


def _write_partial(path: Path, model: torch.nn.Module, flat: FlatParams, opt: torch.optim.SGD,
                   params_rows: list[torch.Tensor], buffer_rows: list[torch.Tensor],
                   meta: dict[str, Any]) -> None:
    momentum = torch.cat([opt.state[p]["momentum_buffer"].reshape(-1) if p in opt.state
                          else torch.zeros_like(p).reshape(-1) for p in model.parameters()])
    save_tensors(path, {"theta": flat.flatten(), "buffers": flat.flatten_buffers(),
                        "momentum": momentum, "params": torch.stack(params_rows),
                        "buffers_rows": torch.stack(buffer_rows)}, meta)


def _read_partial(path: Path, fingerprint: str) -> dict[str, Any] | None:
    try:
        tensors, meta = load_tensors(path)
    except ArtifactError:
        return None
    if meta.get("fingerprint") != fingerprint:
        return None
    return {**tensors, "meta": meta}


class _ExpertLock:
    """An exclusive lock file (O_EXCL); a lock left by a dead process on this host is taken over."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.acquired = False

    def __enter__(self) -> _ExpertLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._stale():
                    self.path.unlink(missing_ok=True)
                    continue
                return self
            with os.fdopen(fd, "w") as fh:
                fh.write(me)
            self.acquired = True
            return self
        return self

    def _stale(self) -> bool:
        try:
            host, pid = self.path.read_text().split()
        except (OSError, ValueError):
            return True
        if host != socket.gethostname():
            return False
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return int(pid) == os.getpid()

    def __exit__(self, *exc: object) -> None:
        if self.acquired:
            self.path.unlink(missing_ok=True)


# ---------------------------------------------------------------------- reading experts
@dataclass
class ExpertFile:
    """A lazily read expert trajectory."""

    path: Path
    meta: dict[str, Any]

    @classmethod
    def open(cls, path: Path) -> ExpertFile:
        meta = read_metadata(path)
        if meta.get("kind") != "expert":
            raise ArtifactError(f"{path} is not an expert trajectory file")
        return cls(path, meta)

    @property
    def num_checkpoints(self) -> int:
        return int(self.meta["num_checkpoints"])

    @property
    def schedule(self) -> ExpertSchedule:
        return ExpertSchedule(self.meta["steps_per_epoch"], self.meta["checkpoint_every"],
                              self.num_checkpoints)

    def params(self, *rows: int) -> torch.Tensor:
        return load_rows(self.path, "params", list(rows))

    def buffers(self, row: int) -> torch.Tensor | None:
        try:
            return load_rows(self.path, "buffers", [row])[0]
        except ArtifactError:
            return None


def list_experts(ctx: RunContext) -> list[ExpertFile]:
    """The finished experts of the run, in index order; errors when fewer than configured."""
    fp = experts_fingerprint(ctx)
    files = []
    missing = []
    for k in range(ctx.cfg.experts.num_experts):
        path = expert_path(ctx, k)
        if not path.exists():
            missing.append(k)
            continue
        ef = ExpertFile.open(path)
        check_expert(ctx, path, ef.meta, fp)
        files.append(ef)
    if missing:
        raise ArtifactError(f"experts {missing[:10]}{'...' if len(missing) > 10 else ''} are not "
                            f"finished in {ctx.path(EXPERTS_DIR)}; run the experts stage first "
                            "(other processes may still be training them)")
    return files
