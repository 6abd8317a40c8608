"""Stage 3 — expert trajectories: students trained by knowledge distillation, checkpointed.

Each expert is a fresh, seeded student trained with SGD on MSE to the target representations (no
augmentation). Its parameters (and float buffers, for BN students) at step 0 and every
``checkpoint_every_steps`` (default: every epoch) up to the last one stage 5 or 4 reads are stored
as rows of ``params`` [T, P] in ``experts/expert_NNNNN.safetensors``. Experts are independent:
each is claimed with a lock file, written atomically and resumable per epoch, so several processes
can fill one directory. ``experts.extra_students`` adds the experts of more architectures, each in
its own folder (:func:`student_views`), for cross-architecture matching.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..data.sources import normalize
from ..distributed import rank, world_size
from ..errors import ArtifactError, ConfigError, DivergenceError
from ..io import load_rows, load_tensors, read_metadata, save_tensors, verify_tensors
from ..layout import EXPERT_PATTERN, EXTRA_EXPERTS_PATTERN, TARGETS_FILE
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
    needed = max(cfg.distill.last_start_epoch + cfg.distill.expert_epochs, cfg.init.loss_epoch)
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
            f"{needs:.3g} (distill.max_start_epoch(_end) + distill.expert_epochs, init.loss_epoch): re-run "
            "the experts stage with --force, or use a new --out directory")
    raise ArtifactError(f"{path} was made with a different configuration; re-run the experts stage "
                        "with --force, or use a new --out directory")


def expert_path(ctx: RunContext, k: int) -> Path:
    return ctx.path(ctx.experts_dir) / EXPERT_PATTERN.format(k)


def architecture_tag(model: ModelConfig) -> str:
    """A folder-safe name of an architecture and its kwargs: ``resnet10_width0.125``."""
    parts = [model.arch, *(f"{k}{v}" for k, v in sorted(model.kwargs.items()))]
    return re.sub(r"[^A-Za-z0-9._-]+", "", "_".join(parts))


def student_views(ctx: RunContext) -> list[RunContext]:
    """The run as each architecture whose experts it trains: the run itself (``student``), then one
    view per ``experts.extra_students`` entry, whose ``cfg.student`` is that architecture and
    whose experts live in their own folder. Views share the run's loaded source images."""
    views = [ctx]
    if ctx.cfg.experts.extra_students:
        _ = ctx.train_set  # loaded once, before the copies take the cached split
    for model in ctx.cfg.experts.extra_students:
        view = copy.copy(ctx)  # the cached source split is shared, not loaded again
        view.cfg = dataclasses.replace(ctx.cfg, student=model)
        view.experts_dir = EXTRA_EXPERTS_PATTERN.format(architecture_tag(model))
        views.append(view)
    return views


def run_experts(ctx: RunContext, *, force: bool = False) -> list[Path]:
    """Stage 3: train every expert no other live process is training, wait for those that one is;
    return the finished expert files in index order.

    Several processes (``run`` or ``experts`` on one ``--out``) share the work through lock files;
    a lock whose holder died, or that was not renewed for ``LOCK_LEASE_S``, is taken over. Under
    torchrun, rank r trains (or waits for) only the experts k = r mod world size; the caller ends
    the stage with a barrier.
    """
    fp = experts_fingerprint(ctx)
    reps = load_targets(ctx)
    done: dict[int, Path] = {}
    busy: list[int] = []
    for k in range(rank(), ctx.cfg.experts.num_experts, world_size()):
        if _claim_or_reuse(ctx, k, reps, fp, force=force, done=done) is None:
            busy.append(k)
    if busy:
        holders = "; ".join(f"expert {k}: {_ExpertLock.describe(_lock_path(ctx, k))}" for k in busy)
        ctx.log.info("experts: waiting for %s, trained by other processes (%s)", busy, holders)
    while busy:
        time.sleep(WAIT_POLL_S)
        busy = [k for k in busy if _claim_or_reuse(ctx, k, reps, fp, force=False, done=done) is None]
    return [done[k] for k in sorted(done)]


def _claim_or_reuse(ctx: RunContext, k: int, reps: torch.Tensor, fp: str, *, force: bool,
                    done: dict[int, Path]) -> Path | None:
    """Expert ``k``'s file: reused (checked), or trained under its lock; None while another live
    process holds the lock."""
    path = expert_path(ctx, k)
    if path.exists() and not force:
        _check_reuse(ctx, path, fp)
        done[k] = path
        return path
    with _ExpertLock(_lock_path(ctx, k)) as lock:
        if not lock.acquired:
            return None
        if path.exists() and not force:  # another process finished it meanwhile
            _check_reuse(ctx, path, fp)
        else:
            train_expert(ctx, k, reps, fp, resume=not force)
    done[k] = path
    return path


def _check_reuse(ctx: RunContext, path: Path, fp: str) -> None:
    check_expert(ctx, path, read_metadata(path), fp)
    verify_tensors(path)


def _lock_path(ctx: RunContext, k: int) -> Path:
    return expert_path(ctx, k).with_suffix(".lock")


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
            ctx.log.info("%s: resuming after epoch %d", _name(ctx, k), start_epoch)
    reps_dev = reps.to(dev)
    mean, std = data.mean, data.std
    epochs = math.ceil(last_step / sched.steps_per_epoch)
    step = start_epoch * sched.steps_per_epoch
    bar = ctx.bar(total=last_step, initial=step, desc=_name(ctx, k, of=ec.num_experts))
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
        ctx.log.info("%s epoch %d: KD loss %.5f, %.0f images/s", _name(ctx, k), epoch + 1,
                     epoch_losses[-1], seen / dt)
        if not math.isfinite(epoch_losses[-1]):
            raise DivergenceError(f"{_name(ctx, k)} diverged (loss {epoch_losses[-1]}); lower experts.lr")
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


def _name(ctx: RunContext, k: int, of: int | None = None) -> str:
    """``expert 3`` (``expert 4/12`` with ``of``), with the architecture for an extra student's."""
    name = f"expert {k}" if of is None else f"expert {k + 1}/{of}"
    extra = ctx.cfg.student in ctx.cfg.experts.extra_students
    return f"{name} ({architecture_tag(ctx.cfg.student)})" if extra else name


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


LOCK_LEASE_S = 120.0  # a lock not renewed for this long is stale (its holder died, hangs or is elsewhere)
LOCK_HEARTBEAT_S = 10.0  # how often a holder renews its lock (the lock file's mtime)
WAIT_POLL_S = 2.0  # how often a process waiting for another's expert looks again


class _ExpertLock:
    """An exclusive lock file naming its holder (host, pid, process start time), created whole with
    ``os.link`` and renewed every ``LOCK_HEARTBEAT_S`` by a background thread.

    A lock is stale, and taken over, when its holder is gone on this host (dead pid, or a pid now
    used by another process) or when it was not renewed for ``LOCK_LEASE_S`` (any host).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.acquired = False
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> _ExpertLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": _started(os.getpid())})
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(me)
        try:
            for _ in range(2):
                try:
                    os.link(tmp, self.path)  # appears with its content, or not at all
                except FileExistsError:
                    st = _stat(self.path)
                    if st is not None and not self._stale(st):
                        return self
                    if st is not None:
                        self._take_over(st)
                    continue
                self.acquired = True
                self._beat = threading.Thread(target=self._renew, daemon=True, name=f"lock {self.path.name}")
                self._beat.start()
                return self
        finally:
            tmp.unlink(missing_ok=True)
        return self

    def _renew(self) -> None:
        while not self._stop.wait(LOCK_HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def _stale(self, st: os.stat_result) -> bool:
        if time.time() - st.st_mtime > LOCK_LEASE_S:
            return True
        holder = _read_holder(self.path)
        if holder is None:  # unreadable: stale once its lease is over (above)
            return False
        host, pid, started = holder
        if host != socket.gethostname():
            return False
        if pid == os.getpid():
            return True  # left by this process (it does not nest locks)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # alive, another user's
        return started is not None and _started(pid) not in (None, started)  # pid reused

    def _take_over(self, st: os.stat_result) -> None:
        grave = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
        try:
            os.replace(self.path, grave)
        except FileNotFoundError:
            return
        moved = _stat(grave)
        if moved is not None and moved.st_ino != st.st_ino:
            with contextlib.suppress(OSError):  # another process took it over first: give it back
                os.link(grave, self.path)
        grave.unlink(missing_ok=True)

    @staticmethod
    def describe(path: Path) -> str:
        """Who holds the lock, and where it is (for messages)."""
        holder = _read_holder(path)
        who = f"process {holder[1]} on {holder[0]}" if holder else "an unknown process"
        return (f"held by {who}, lock file {path}, taken over {LOCK_LEASE_S:g} s after its last "
                "renewal; delete it if no process is training that expert")

    def __exit__(self, *exc: object) -> None:
        if self.acquired:
            self._stop.set()
            if self._beat is not None:
                self._beat.join()
            self.path.unlink(missing_ok=True)


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:
        return None


def _read_holder(path: Path) -> tuple[str, int, int | None] | None:
    """(host, pid, process start time) from a lock file; also reads the older ``host pid`` form."""
    try:
        text = path.read_text()
    except OSError:
        return None
    try:
        data = json.loads(text)
        return str(data["host"]), int(data["pid"]), data.get("started")
    except (ValueError, KeyError, TypeError):
        pass
    try:
        host, pid = text.split()
        return host, int(pid), None
    except ValueError:
        return None


def _started(pid: int) -> int | None:
    """A process's start time (clock ticks after boot) on Linux, to tell a reused pid; else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


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


def list_experts(ctx: RunContext, *, verify: bool = True) -> list[ExpertFile]:
    """The finished experts of the run, in index order (their checksums verified unless
    ``verify=False``); errors when fewer than configured, naming the locks of those in training."""
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
        if verify:
            verify_tensors(path)
        files.append(ef)
    if missing:
        locked = [k for k in missing if _lock_path(ctx, k).exists()]
        held = "".join(f"; expert {k} is {_ExpertLock.describe(_lock_path(ctx, k))}" for k in locked[:3])
        raise ArtifactError(f"experts {missing[:10]}{'...' if len(missing) > 10 else ''} are not "
                            f"finished in {ctx.path(ctx.experts_dir)}; run the experts stage first (it "
                            f"waits for experts other processes are training){held}")
    return files
