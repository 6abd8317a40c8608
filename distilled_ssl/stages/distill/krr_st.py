"""Stage 5 with ``distill.method: krr_st`` — KRR-ST (Lee et al., ICLR 2024, arXiv 2310.06511).

The baseline MKDT compares against: kernel ridge regression on self-supervised targets. No experts
and no unrolled training.

Learnable: images X [k, C, H, W] (normalised pixel space) and target reps Y [k, D], initialised from
the init stage's images and their teacher reps. Each outer step:

1. pick one model of a pool of ``pool_size`` students (uniformly at random);
2. features (the encoder's ``features``: the representation before its linear head, as the
   reference's ``embed``) of X, with gradient, and of ``real_batch`` real images, without, each with
   a column of ones appended; the pool model is in eval mode for this;
3. kernel ridge regression in closed form, pred = K_rs (K_ss + lambda I)^-1 Y with
   lambda = ``ridge`` * trace(K_ss) (the trace is not differentiated, as in the reference);
4. loss = MSE(pred, teacher reps of the real batch); AdamW on X and Y, lr decayed linearly to 0;
5. the chosen pool model takes one SGD step on MSE(model(X), Y) over the whole synthetic set, or is
   re-initialised (and its step count restarts) once it has taken ``model_steps`` steps.

Before the first step every pool model is trained for a random number of steps in
[1, model_steps) on the initial set (the reference's warm-up), so the pool holds models at
different stages of training. Every random choice derives from the run seed and the step, and the
state (X, Y, AdamW moments, every pool model's weights, buffers, momentum and step count) is
checkpointed every ``checkpoint_every`` steps (and once after the warm-up): a killed run continues
bit for bit. Raising ``distill.iterations`` continues a finished run; the linear decay is then
recomputed for the new total, so the lr rises again.

The output has MKDT's format (``distilled.safetensors``, ``distilled.png``) with
``method: krr_st``; its "lr" is ``distill.lr_init`` since KRR-ST learns no learning rate.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ...data.sources import normalize
from ...errors import ArtifactError, DivergenceError, KrrSolveError
from ...io import read_metadata, save_tensors
from ...layout import DISTILLED_FILE, STATE_FILE
from ...models.encoders import Encoder, seeded
from ...models.losses import kd_loss
from ..context import RunContext, student_for
from ..init import load_init
from ..targets import load_targets
from .common import (
    IterationLog,
    distill_fingerprint,
    initial_state,
    lr_grid_done,
    rounded_mean,
    select_lr,
    write_distilled,
)

__all__ = ["KrrSolveError", "ModelPool", "krr_predict", "run_krr_st"]

TAG = "krr_st"


# ---------------------------------------------------------------------- kernel ridge regression
def krr_predict(f_real: torch.Tensor, f_syn: torch.Tensor, y_syn: torch.Tensor,
                ridge: float) -> torch.Tensor:
    """``K_rs (K_ss + lambda I)^-1 y_syn`` for linear kernels on features with a ones column.

    ``f_real`` [m, p], ``f_syn`` [k, p] (gradients flow through ``f_syn`` and ``y_syn``), ``y_syn``
    [k, D]; lambda = ``ridge`` * trace(K_ss), treated as a constant. When the features are narrower
    than the synthetic set (p + 1 < k) the identical primal form
    ``F_r (F_sᵀ F_s + lambda I)^-1 F_sᵀ y_syn`` is solved instead: a (p+1)² system, not a k² one.
    """
    ones = f_syn.new_ones(f_syn.shape[0], 1)
    fs = torch.cat([f_syn, ones], dim=1)
    fr = torch.cat([f_real, f_real.new_ones(f_real.shape[0], 1)], dim=1)
    lam = ridge * fs.detach().pow(2).sum()  # trace(F_s F_sᵀ)
    k, p = fs.shape
    if p < k:
        gram = fs.T @ fs
        w = _spd_solve(gram + lam * torch.eye(p, dtype=gram.dtype, device=gram.device), fs.T @ y_syn,
                       ridge)
        return fr @ w
    gram = fs @ fs.T
    alpha = _spd_solve(gram + lam * torch.eye(k, dtype=gram.dtype, device=gram.device), y_syn, ridge)
    return (fr @ fs.T) @ alpha


def _spd_solve(a: torch.Tensor, b: torch.Tensor, ridge: float) -> torch.Tensor:
    """Solve ``a x = b`` for a symmetric positive-definite ``a``: Cholesky, else LU, else an error."""
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        x = torch.cholesky_solve(b, chol)
        if bool(torch.isfinite(x).all()):
            return x
    x, info = torch.linalg.solve_ex(a, b)  # the reference's solver: tolerates a lost Cholesky
    if int(info) == 0 and bool(torch.isfinite(x).all()):
        return x
    finite = bool(torch.isfinite(a).all())
    raise KrrSolveError(
        f"KRR-ST: the {a.shape[0]}x{a.shape[0]} kernel ridge system could not be solved in float32 "
        + ("(it is singular: the features or the ridge are zero); raise distill.krr_st.ridge "
           f"(now {ridge:g})" if finite else
           "(the features hold NaN/inf: the synthetic images diverged); lower distill.krr_st.lr"))


def krr_loss(model: Encoder, x_syn: torch.Tensor, y_syn: torch.Tensor, x_real: torch.Tensor,
             y_real: torch.Tensor, ridge: float) -> torch.Tensor:
    """MSE of the KRR prediction from ``(x_syn, y_syn)`` to the real batch's teacher reps."""
    model.eval()
    with torch.no_grad():
        f_real = model.features(x_real)
    pred = krr_predict(f_real, model.features(x_syn), y_syn, ridge)
    return F.mse_loss(pred, y_real)


# ---------------------------------------------------------------------- the model pool
class ModelPool:
    """``pool_size`` students trained online on the synthetic set, each with its own SGD state."""

    def __init__(self, ctx: RunContext, output_dim: int, device: torch.device) -> None:
        self.ctx = ctx
        self.kc = ctx.cfg.distill.krr_st
        self.output_dim = output_dim
        self.device = device
        self.models: list[Encoder] = []
        self.opts: list[torch.optim.SGD] = []
        self.steps: list[int] = []
        for slot in range(self.kc.pool_size):
            model, opt = self._fresh(slot, "start")
            self.models.append(model)
            self.opts.append(opt)
            self.steps.append(0)

    def _fresh(self, slot: int, tag: object) -> tuple[Encoder, torch.optim.SGD]:
        with seeded(self.ctx.seed_for(TAG, "model", slot, tag)):
            model = student_for(self.ctx, self.output_dim).to(self.device)
        opt = torch.optim.SGD(model.parameters(), lr=self.kc.model_lr, momentum=self.kc.model_momentum,
                              weight_decay=self.kc.model_weight_decay)
        return model, opt

    def train_step(self, slot: int, x: torch.Tensor, y: torch.Tensor) -> None:
        model, opt = self.models[slot], self.opts[slot]
        model.train()
        loss = kd_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        self.steps[slot] += 1

    def warm_up(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Train model i for a random number of steps in [1, model_steps) on (x, y)."""
        m = self.kc.model_steps
        counts = [int(torch.randint(1, m, (1,), generator=self.ctx.generator(TAG, "warmup", i)))
                  if m > 1 else 0 for i in range(len(self.models))]
        bar = self.ctx.bar(total=sum(counts), desc="krr_st: pool warm-up")
        for slot, count in enumerate(counts):
            for _ in range(count):
                self.train_step(slot, x, y)
                bar.update(1)
        bar.close()

    def update(self, slot: int, x: torch.Tensor, y: torch.Tensor, it: int) -> None:
        """One SGD step for the model in ``slot``, or a fresh model once it has had its steps."""
        if self.steps[slot] >= self.kc.model_steps:
            self.models[slot], self.opts[slot] = self._fresh(slot, it)
            self.steps[slot] = 0
        else:
            self.train_step(slot, x, y)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i, (model, opt) in enumerate(zip(self.models, self.opts, strict=True)):
            out.update({f"pool.{i}.model.{n}": t for n, t in model.state_dict().items()})
            for n, p in model.named_parameters():
                buf = opt.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    out[f"pool.{i}.momentum.{n}"] = buf
        return out

    def load(self, tensors: dict[str, torch.Tensor], steps: list[int]) -> None:
        if len(steps) != len(self.models):
            raise ArtifactError(f"the saved pool holds {len(steps)} models, the config {len(self.models)}")
        for i, (model, opt) in enumerate(zip(self.models, self.opts, strict=True)):
            prefix = f"pool.{i}.model."
            model.load_state_dict({n[len(prefix):]: t for n, t in tensors.items()
                                   if n.startswith(prefix)})
            for n, p in model.named_parameters():
                buf = tensors.get(f"pool.{i}.momentum.{n}")
                if buf is not None:
                    opt.state[p]["momentum_buffer"] = buf.to(p.device).clone()
        self.steps = list(steps)


# ---------------------------------------------------------------------- the stage
def run_krr_st(ctx: RunContext, *, force: bool = False) -> Path:
    """Stage 5 by KRR-ST: write ``distilled.safetensors`` and ``distilled.png`` (resumable)."""
    out = ctx.path(DISTILLED_FILE)
    fp = distill_fingerprint(ctx)
    d, kc = ctx.cfg.distill, ctx.cfg.distill.krr_st
    if not force and out.exists():
        meta = read_metadata(out)
        if meta.get("fingerprint") == fp and meta.get("iterations", -1) >= d.iterations \
                and lr_grid_done(meta, ctx):
            ctx.log.info("distill: %s exists (%d iterations), skipping", out, meta["iterations"])
            return out
    dev = ctx.device
    data = ctx.train_set
    index = load_init(ctx)
    reps = load_targets(ctx)
    k, n = len(index), len(data)
    state = initial_state(ctx, index, reps, fp, dev, force)
    images = state["images"].detach().clone().requires_grad_(True)
    targets = state["targets"].detach().clone().requires_grad_(True)
    opt = torch.optim.AdamW([images, targets], lr=kc.lr, weight_decay=kc.weight_decay)
    pool = ModelPool(ctx, reps.shape[1], dev)
    history: list[float] = state["meta"].get("history", [])
    start = int(state["meta"].get("iteration", 0))
    batch = min(kc.real_batch, n)
    if "pool_steps" in state["meta"]:
        for name, p in (("images", images), ("targets", targets)):
            if f"adam.{name}.step" in state:  # absent when saved right after the warm-up
                opt.state[p] = {key: state[f"adam.{name}.{key}"].clone()
                                for key in ("exp_avg", "exp_avg_sq")}
                opt.state[p]["step"] = state[f"adam.{name}.step"].cpu().clone()
        pool.load(state, state["meta"]["pool_steps"])
    else:
        ctx.log.info("distill (krr_st): %d images, pool of %d x %s, real batch %d of %d, "
                     "ridge %g, AdamW lr %g; warming up the pool (%d steps each at most)", k,
                     kc.pool_size, ctx.cfg.student.arch, batch, n, kc.ridge, kc.lr, kc.model_steps - 1)
        if batch < kc.real_batch:
            ctx.log.info("distill (krr_st): krr_st.real_batch=%d is more than the %d source images: "
                         "every real batch is the whole source", kc.real_batch, n)
        t_warm = time.perf_counter()
        pool.warm_up(images.detach(), targets.detach())
        ctx.log.info("distill (krr_st): pool warmed up in %.1f s", time.perf_counter() - t_warm)
        _save(ctx, images, targets, opt, pool, {"iteration": start, "history": history,
                                                 "fingerprint": fp, "method": TAG})
    reps_dev = reps.to(dev)
    real = _RealBatches(ctx, n, batch)
    bar = ctx.bar(total=d.iterations, initial=start, desc="distill (krr_st)")
    progress = IterationLog(d.iterations, d.log_every, bar)
    for it in range(start, d.iterations):
        slot = int(torch.randint(kc.pool_size, (1,), generator=ctx.generator(TAG, "pick", it)))
        idx = real.indices(it)
        x_real = normalize(data.images[idx].to(dev), data.mean, data.std)
        loss_t = krr_loss(pool.models[slot], images, targets, x_real, reps_dev[idx.to(dev)], kc.ridge)
        g_img, g_tgt = torch.autograd.grad(loss_t, [images, targets])
        loss = float(loss_t.detach())
        if not (math.isfinite(loss) and torch.isfinite(g_img).all() and torch.isfinite(g_tgt).all()):
            raise DivergenceError(f"distill (krr_st) iteration {it}: non-finite KRR loss or "
                                     "gradient; lower distill.krr_st.lr or raise distill.krr_st.ridge")
        for group in opt.param_groups:
            group["lr"] = kc.lr * (1 - it / d.iterations)
        images.grad, targets.grad = g_img, g_tgt
        opt.step()
        opt.zero_grad(set_to_none=True)
        pool.update(slot, images.detach(), targets.detach(), it)
        history.append(loss)
        done = it + 1
        report = progress.record(done, loss)
        if report is not None:
            mean, sec, eta = report
            ctx.log.info("distill %d/%d: KRR loss %.4f, outer lr %.3g, %.2f s/it, ETA %s", done,
                         d.iterations, mean, kc.lr * (1 - it / d.iterations), sec, eta)
            bar.set_postfix(loss=f"{mean:.4f}")
        if done % d.checkpoint_every == 0 or done == d.iterations:
            _save(ctx, images, targets, opt, pool, {"iteration": done, "history": history,
                                                     "fingerprint": fp, "method": TAG})
    bar.close()
    lr, chosen = select_lr(ctx, images.detach(), targets.detach(), torch.tensor(d.lr_init))
    write_distilled(ctx, out, fp, index, images.detach(), targets.detach(), lr, history,
                     method=TAG, extra={"krr_loss": {"first": rounded_mean(history[:10]),
                                                     "last": rounded_mean(history[-10:])}, **chosen})
    return out


class _RealBatches:
    """Real batch ``it``: consecutive slices of a seeded permutation per epoch (no repeats within
    an epoch; the remainder of an epoch is dropped), a pure function of the step."""

    def __init__(self, ctx: RunContext, n: int, batch: int) -> None:
        self.ctx, self.n, self.batch = ctx, n, batch
        self.per_epoch = n // batch
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def indices(self, it: int) -> torch.Tensor:
        epoch, pos = divmod(it, self.per_epoch)
        if epoch != self._epoch:
            self._perm = torch.randperm(self.n, generator=self.ctx.generator(TAG, "real", epoch))
            self._epoch = epoch
        return self._perm[pos * self.batch:(pos + 1) * self.batch]


def _save(ctx: RunContext, images: torch.Tensor, targets: torch.Tensor, opt: torch.optim.AdamW,
          pool: ModelPool, meta: dict[str, Any]) -> None:
    tensors = {"images": images.detach(), "targets": targets.detach()}
    for name, p in (("images", images), ("targets", targets)):
        for key, value in opt.state.get(p, {}).items():
            tensors[f"adam.{name}.{key}"] = value
    tensors.update(pool.state_tensors())
    save_tensors(ctx.path(STATE_FILE), tensors, {**meta, "pool_steps": pool.steps})
