"""CUDA-only checks of the matchers (skipped without a GPU; `benchmarks/gpu_check.sh` runs them first).

The CPU suite tests the same code paths on the CPU; these catch what only a CUDA kernel refuses (stop
14: the eager bf16 walk failed there in the instance norm) and numbers that drift on the GPU.
"""

import pytest
import torch

from distilled_ssl.models.encoders import FlatParams, build_model
from distilled_ssl.stages.distill.compiled import CompiledSteps
from distilled_ssl.stages.distill.matching import match_adjoint, match_unrolled, minibatches

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _problem(norm: str = "instance", dtype: torch.dtype = torch.float32) -> tuple:
    torch.manual_seed(0)
    kwargs = {"pooling": "gap"} if norm == "batch" else {}
    model = build_model("convnet", in_channels=1, image_size=16, output_dim=8, depth=2, width=8,
                        norm=norm, **kwargs).to("cuda", dtype).train()
    flat = FlatParams(model)
    theta0 = flat.flatten()
    target = theta0 + 0.01 * torch.randn_like(theta0)
    images = torch.randn(16, 1, 16, 16, device="cuda", dtype=dtype)
    reps = torch.randn(16, 8, device="cuda", dtype=dtype)
    batches = [b.cuda() for b in minibatches(16, 8, 6, torch.Generator().manual_seed(0))]
    return flat, theta0, target, images, reps, torch.tensor(0.1, device="cuda", dtype=dtype), batches


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_adjoint_equals_unrolled_in_float64(norm: str) -> None:
    args = _problem(norm, torch.float64)
    a, u = match_adjoint(*args), match_unrolled(*args)
    for name in ("grad_images", "grad_targets", "grad_lr"):
        torch.testing.assert_close(getattr(a, name), getattr(u, name), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("matcher", [match_adjoint, match_unrolled])
def test_bf16_runs_and_agrees_with_fp32(matcher) -> None:
    args = _problem()
    exact, fast = matcher(*args), matcher(*args, precision="bf16")
    for name in ("grad_images", "grad_targets"):
        a, b = getattr(fast, name), getattr(exact, name)
        assert a.dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_walk_agrees_with_the_eager_one(precision: str) -> None:
    args = _problem()
    eager = match_adjoint(*args)
    fast = match_adjoint(*args, steps=CompiledSteps(args[0], precision=precision))
    for name in ("grad_images", "grad_targets"):
        a, b = getattr(fast, name), getattr(eager, name)
        cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
        assert cos > (0.999 if precision == "fp32" else 0.99)  # fp32: cuDNN may use TF32


@pytest.mark.parametrize("image_grads", [True, False])
def test_cuda_graph_replayed_walk_equals_the_compiled_one(image_grads: bool) -> None:
    args = _problem()
    plain = match_adjoint(*args, image_grads=image_grads,
                          steps=CompiledSteps(args[0], image_grads=image_grads))
    graphs = CompiledSteps(args[0], image_grads=image_grads, cuda_graphs=True)
    for _ in range(3):  # warm-up, recording, replays
        replayed = match_adjoint(*args, image_grads=image_grads, steps=graphs)
    names = ("grad_images", "grad_targets", "grad_lr") if image_grads else ("grad_targets", "grad_lr")
    for name in names:
        torch.testing.assert_close(getattr(replayed, name), getattr(plain, name), rtol=1e-4, atol=1e-6)
