"""The adjoint walk's inner step as compiled graphs (``distill.compile: true``).

:func:`~.matching.match_adjoint` runs two computations per inner step: the forward sweep's
``theta - eta * grad L(theta; X_b, Y_b)`` and, walking back, one Hessian-vector product with the
step's Jacobians to the batch's images and target reps. Here each of them is a pure function written
with :mod:`torch.func` (``grad`` and ``vjp``) and compiled once by :func:`torch.compile`, so that
TorchInductor fuses the element-wise work (normalisation, ReLU, pooling, the loss and all their first
and second derivatives) around the convolutions. The numbers are those of the eager walk up to float
rounding; memory stays one step's, whatever ``syn_steps`` is.

The compiled student is a copy of the real one with plain PyTorch layers where the library has
hand-written derivatives (``InstanceNorm2d`` → :class:`torch.nn.GroupNorm`, ``AvgPool2x2`` → a mean
over a reshaped view): the compiler derives and fuses them itself. Batch-norm layers use batch
statistics, as the eager walk does in train mode, without updating running statistics (which an inner
step never reads).

``distill.cuda_graphs: true`` (CUDA only) compiles them in TorchInductor's "reduce-overhead" mode:
each step is replayed as one CUDA graph, without a launch per kernel. A graph's outputs live in
buffers that its next replay overwrites, so each call starts a new "step" for the graph trees and
copies the outputs out (a few MB a step, next to the step's own work).

Compiling takes a while the first time (a minute or two on a CPU core; TorchInductor caches the result
on disk) and needs a C++ compiler on CPU.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vjp, vmap

from ...errors import ConfigError
from ...models.encoders import FlatParams
from ...models.instance_norm import InstanceNorm2d
from ...models.losses import kd_loss
from ...models.pooling import AvgPool2x2
from .matching import autocast

__all__ = ["CompiledSteps", "plain_student"]


def plain_student(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with the library's custom-derivative layers replaced by PyTorch's own
    (same parameter names and order) and batch norm not tracking running statistics."""
    plain = copy.deepcopy(model)
    for mod in list(plain.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, InstanceNorm2d):
                ref = nn.GroupNorm(child.num_groups, child.num_channels, eps=child.eps,
                                   affine=child.affine)
                ref.to(child.weight).load_state_dict(child.state_dict())
                setattr(mod, name, ref)
            elif isinstance(child, AvgPool2x2):
                setattr(mod, name, _WindowMean())
            elif isinstance(child, nn.modules.batchnorm._BatchNorm):
                child.track_running_stats = False
                child.running_mean = child.running_var = child.num_batches_tracked = None
    return plain.train()


class _WindowMean(nn.Module):
    """``nn.AvgPool2d(2)`` as a mean over a reshaped view (odd sizes: the last row / column dropped).
    Its derivatives are broadcasts, which the compiler fuses into vectorised loops; PyTorch's
    ``avg_pool2d_backward`` becomes a scalar gather loop there (a compiled bf16 walk-back step at
    the paper's shapes: 86 ms with ``nn.AvgPool2d``, 77 ms with this, 2 threads)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        x = x[:, :, : h - h % 2, : w - w % 2]
        return x.reshape(n, c, h // 2, 2, w // 2, 2).mean(dim=(3, 5))


class CompiledSteps:
    """``forward(theta, x, y, eta) -> theta'``, ``gradient(theta, x, y) -> g`` and
    ``reverse(theta, x, y, adj, eta) -> (g . adj, H adj, J_x^T adj or None, J_y^T adj)`` of one
    inner step, compiled on first use.

    ``g`` is the step's gradient of the KD loss at ``theta``; ``H`` its Hessian; ``J_x`` / ``J_y`` the
    Jacobians of ``g`` with respect to the batch's images and target reps (``J_x`` only with
    ``image_grads``). ``precision`` is that of :func:`~.matching.autocast`; ``cuda_graphs`` replays
    each computation as a CUDA graph (the student must be on a CUDA device). ``batched``:
    ``forward`` and ``reverse`` take K students at once (a leading dimension K on ``theta``, ``x``,
    ``y`` and ``adj``; one ``eta``; :func:`torch.func.vmap`, for
    :func:`~.matching.match_batched`). ``compile=False`` runs the same functions eagerly (tests).
    """

    def __init__(self, flat: FlatParams, *, precision: str = "fp32", image_grads: bool = True,
                 cuda_graphs: bool = False, batched: bool = False, compile: bool = True) -> None:
        device = next(flat.model.parameters()).device
        if cuda_graphs and device.type != "cuda":
            raise ConfigError(f"distill.cuda_graphs needs a CUDA device (the student is on {device}); set "
                              "distill.cuda_graphs=false")
        model = plain_student(flat.model)
        names, shapes, numels = flat.names, flat.shapes, flat.numels  # the copy keeps them all

        def loss(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            chunks = theta.split(numels)
            params = {names[i]: chunks[i].view(shapes[i]) for i in range(len(names))}
            with autocast(precision, x.device):
                out = functional_call(model, params, (x,))
            return kd_loss(out.to(y.dtype), y)

        step_grad = grad(loss)

        def forward(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, eta: torch.Tensor
                    ) -> torch.Tensor:
            return theta - eta * step_grad(theta, x, y)

        def reverse(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, adj: torch.Tensor,
                    eta: torch.Tensor) -> tuple[torch.Tensor, ...]:
            if image_grads:
                g, pull = vjp(step_grad, theta, x, y)
                hv, jx, jy = pull(adj)
                return (g * adj).sum(), hv, jx, jy
            g, pull = vjp(lambda th, yy: step_grad(th, x, yy), theta, y)
            hv, jy = pull(adj)
            return (g * adj).sum(), hv, jy

        self.image_grads, self.batched = image_grads, batched
        if batched:  # K students at once: a leading dimension on theta, x, y, adj (one eta)
            forward = vmap(forward, in_dims=(0, 0, 0, None))
            reverse = vmap(reverse, in_dims=(0, 0, 0, 0, None))
        mode = "reduce-overhead" if cuda_graphs else None

        def build(fn: Callable[..., Any]) -> Callable[..., Any]:
            return _guarded(torch.compile(fn, dynamic=False, mode=mode) if compile else fn, cuda_graphs)

        self._forward, self._gradient, self._reverse = build(forward), build(step_grad), build(reverse)

    def forward(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, eta: torch.Tensor
                ) -> torch.Tensor:
        """The next parameters ``theta - eta * g``."""
        return self._forward(theta, x, y, eta)

    def gradient(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``g`` (the heavy-ball walk's forward sweep; compiled on first use)."""
        return self._gradient(theta, x, y)

    def reverse(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, adj: torch.Tensor,
                eta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(g . adj, H adj, J_x^T adj, J_y^T adj)`` (``J_x^T adj`` is None without image gradients)."""
        out = self._reverse(theta, x, y, adj, eta)
        if self.image_grads:
            return out
        gdot, hv, jy = out
        return gdot, hv, None, jy


class _NoCudaNotice(logging.Filter):
    """Drops the "No CUDA runtime is found" warning that TorchInductor's C++ build logs on a CPU-only
    machine, where no CUDA runtime is expected."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No CUDA runtime is found" not in record.getMessage()


def _guarded(fn: Callable[..., Any], graphs: bool = False) -> Callable[..., Any]:
    """``fn`` with a compiler failure turned into a one-line ConfigError that says what to do, and
    without two notices of the compiler's: the C++ build's "No CUDA runtime" on CPU, and
    TorchInductor's advice on CUDA to run float32 matrix products in TF32 (the fp32 walk stays exact;
    a user may still call ``torch.set_float32_matmul_precision`` in their own process). With
    ``graphs`` (a CUDA-graph-replayed ``fn``) each call is a new step of the graph trees and returns
    copies of the outputs, which the next replay would overwrite."""
    build_log, quiet = logging.getLogger("torch.utils.cpp_extension"), _NoCudaNotice()

    def run(*args: Any) -> Any:
        if not graphs:
            return fn(*args)
        torch.compiler.cudagraph_mark_step_begin()
        out = fn(*args)
        return tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone()

    compiled = [False]  # the advice comes with the compile, on the first call; later calls leave the
    # warning filters alone (restoring them resets Python's once-per-place warning registry)

    def call(*args: Any) -> Any:
        build_log.addFilter(quiet)
        try:
            if compiled[0]:
                return run(*args)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="TensorFloat32 tensor cores", category=UserWarning)
                out = run(*args)
            compiled[0] = True
            return out
        except Exception as exc:
            if _from_the_compiler(exc):
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ConfigError(f"distill.compile: torch.compile failed ({first[:200]}); set "
                                  "distill.compile=false, or try distill.precision=fp32 (without a C++ "
                                  "compiler: install one, e.g. gcc, for TorchInductor)") from exc
            raise
        finally:
            build_log.removeFilter(quiet)

    return call


def _from_the_compiler(exc: BaseException) -> bool:
    """Whether ``exc`` comes from TorchDynamo / TorchInductor (their exceptions, and the C++ build
    errors of the generated code, e.g. ``InductorError: CppCompileError``)."""
    return any(c.__module__.startswith(("torch._dynamo", "torch._inductor")) or "Compiler" in c.__name__
               for c in type(exc).__mro__)
