import pytest
import torch

from distilled_ssl.errors import ConfigError
from distilled_ssl.models.encoders import FlatParams, build_model
from distilled_ssl.stages.distill.matching import match_adjoint, match_unrolled, minibatches


@pytest.mark.parametrize("arch, kwargs", [
    ("convnet", {"depth": 2, "width": 6, "norm": "instance"}),
    ("convnet", {"depth": 2, "width": 6, "norm": "batch", "pooling": "gap"}),
    ("resnet10", {"width": 0.0625}),
])
def test_adjoint_gradients_equal_unrolled(arch: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    model = build_model(arch, in_channels=1, image_size=12, output_dim=5, **kwargs).double().train()
    flat = FlatParams(model)
    theta0 = flat.flatten()
    target = theta0 + 0.05 * torch.randn_like(theta0)
    images = torch.randn(10, 1, 12, 12, dtype=torch.float64)
    reps = torch.randn(10, 5, dtype=torch.float64)
    lr = torch.tensor(0.05, dtype=torch.float64)
    batches = minibatches(10, 4, 6, torch.Generator().manual_seed(1))
    a = match_adjoint(flat, theta0, target, images, reps, lr, batches)
    u = match_unrolled(flat, theta0, target, images, reps, lr, batches)
    torch.testing.assert_close(a.loss, u.loss, rtol=1e-12, atol=0)
    for name in ("grad_images", "grad_targets", "grad_lr"):
        ga, gu = getattr(a, name), getattr(u, name)
        assert gu.abs().sum() > 0
        torch.testing.assert_close(ga, gu, rtol=1e-9, atol=1e-12)


def test_adjoint_matches_unrolled_in_float32() -> None:
    torch.manual_seed(0)
    model = build_model("convnet", in_channels=1, image_size=16, output_dim=8, depth=2, width=8)
    flat = FlatParams(model)
    theta0 = flat.flatten()
    target = theta0 + 0.01 * torch.randn_like(theta0)
    images, reps = torch.randn(16, 1, 16, 16), torch.randn(16, 8)
    batches = minibatches(16, 8, 10, torch.Generator().manual_seed(0))
    a = match_adjoint(flat, theta0, target, images, reps, torch.tensor(0.1), batches)
    u = match_unrolled(flat, theta0, target, images, reps, torch.tensor(0.1), batches)
    for name in ("grad_images", "grad_targets", "grad_lr"):
        ga, gu = getattr(a, name), getattr(u, name)
        assert float((ga - gu).norm() / gu.norm()) < 1e-4


def test_matching_gradient_is_a_descent_direction() -> None:
    torch.manual_seed(0)
    model = build_model("convnet", in_channels=1, image_size=8, output_dim=3, depth=1, width=4).double()
    flat = FlatParams(model)
    theta0 = flat.flatten()
    target = theta0 + 0.05 * torch.randn_like(theta0)
    images, reps = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    lr = torch.tensor(0.1, dtype=torch.float64)
    batches = minibatches(6, 3, 4, torch.Generator().manual_seed(0))
    res = match_adjoint(flat, theta0, target, images, reps, lr, batches)
    step = 1e-3 / float(res.grad_targets.norm())
    moved = match_adjoint(flat, theta0, target, images, reps - step * res.grad_targets, lr, batches)
    assert moved.loss < res.loss


def test_minibatches_cycle_through_every_image() -> None:
    batches = minibatches(10, 4, 5, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [4] * 5
    assert set(torch.cat(batches[:2]).tolist()) | set() <= set(range(10))
    assert len(set(torch.cat(batches[:2]).tolist())) == 8  # no repeats within a permutation
    assert len(minibatches(3, 8, 2, torch.Generator())[0]) == 3  # batch capped at the set size


def _float32_problem(steps: int = 6) -> tuple:
    torch.manual_seed(0)
    model = build_model("convnet", in_channels=3, image_size=16, output_dim=8, depth=2, width=8)
    flat = FlatParams(model)
    theta0 = flat.flatten()
    target = theta0 + 0.01 * torch.randn_like(theta0)
    images, reps = torch.randn(24, 3, 16, 16), torch.randn(24, 8)
    batches = minibatches(24, 8, steps, torch.Generator().manual_seed(0))
    return flat, theta0, target, images, reps, torch.tensor(0.1), batches


@pytest.mark.parametrize("keep", [1, 3, 6, 50])
def test_keep_graphs_gives_the_same_bits(keep: int) -> None:
    args = _float32_problem()
    ref = match_adjoint(*args)
    kept = match_adjoint(*args, keep_graphs=keep)
    for name in ("loss", "grad_images", "grad_targets", "grad_lr"):
        assert torch.equal(getattr(kept, name), getattr(ref, name)), name


@pytest.mark.parametrize("matcher", [match_adjoint, match_unrolled])
def test_bf16_gradients_agree_with_fp32(matcher) -> None:
    args = _float32_problem()
    exact = matcher(*args)
    fast = matcher(*args, precision="bf16")
    for name in ("grad_images", "grad_targets"):
        a, b = getattr(fast, name), getattr(exact, name)
        assert a.dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
    assert not torch.equal(fast.grad_images, exact.grad_images)  # it did run in bf16
    torch.testing.assert_close(fast.loss, exact.loss, rtol=1e-2, atol=0)


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ConfigError, match="precision"):
        match_adjoint(*_float32_problem(), precision="fp8")


@pytest.mark.parametrize("matcher", [match_adjoint, match_unrolled])
def test_without_image_grads_targets_and_lr_grads_are_unchanged(matcher) -> None:
    args = _float32_problem()
    full = matcher(*args)
    lean = matcher(*args, image_grads=False, **({"keep_graphs": 2} if matcher is match_adjoint else {}))
    assert torch.equal(lean.grad_images, torch.zeros_like(full.grad_images))
    torch.testing.assert_close(lean.loss, full.loss, rtol=1e-6, atol=0)
    for name in ("grad_targets", "grad_lr"):
        torch.testing.assert_close(getattr(lean, name), getattr(full, name), rtol=1e-5, atol=1e-9)
