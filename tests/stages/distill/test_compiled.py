"""distill.compile: the adjoint walk with each inner step compiled gives the eager walk's gradients."""

import logging

import pytest
import torch

from distilled_ssl.config import load_preset
from distilled_ssl.errors import ConfigError
from distilled_ssl.models.encoders import FlatParams, build_model
from distilled_ssl.stages.distill.compiled import CompiledSteps, _guarded, plain_student
from distilled_ssl.stages.distill.matching import match_adjoint, match_unrolled, minibatches


def _problem(norm: str, dtype: torch.dtype) -> tuple:
    torch.manual_seed(0)
    kwargs = {"pooling": "gap"} if norm == "batch" else {}
    model = build_model("convnet", in_channels=3, image_size=8, output_dim=5, depth=2, width=4,
                        norm=norm, **kwargs).to(dtype).train()
    flat = FlatParams(model)
    theta0 = flat.flatten()
    target = theta0 + 0.05 * torch.randn_like(theta0)
    images, reps = torch.randn(12, 3, 8, 8, dtype=dtype), torch.randn(12, 5, dtype=dtype)
    batches = minibatches(12, 4, 5, torch.Generator().manual_seed(1))
    return flat, theta0, target, images, reps, torch.tensor(0.1, dtype=dtype), batches


@pytest.mark.parametrize("norm, image_grads", [("instance", True), ("batch", False)])
def test_compiled_walk_gives_the_eager_gradients(norm: str, image_grads: bool) -> None:
    args = _problem(norm, torch.float64)
    eager = match_adjoint(*args, image_grads=image_grads)
    steps = CompiledSteps(args[0], image_grads=image_grads)
    fast = match_adjoint(*args, image_grads=image_grads, steps=steps)
    torch.testing.assert_close(fast.loss, eager.loss, rtol=1e-12, atol=0)
    names = ("grad_images", "grad_targets", "grad_lr") if image_grads else ("grad_targets", "grad_lr")
    for name in names:
        ref = getattr(eager, name)
        assert ref.abs().sum() > 0
        torch.testing.assert_close(getattr(fast, name), ref, rtol=1e-9, atol=1e-12)
    if not image_grads:
        assert torch.equal(fast.grad_images, torch.zeros_like(eager.grad_images))
    # the model's own batch-norm statistics are not touched by the compiled walk
    bufs = dict(args[0].model.named_buffers())
    if norm == "batch":
        before = {k: v.clone() for k, v in bufs.items()}
        match_adjoint(*args, image_grads=image_grads, steps=steps)
        assert all(torch.equal(before[k], v) for k, v in bufs.items())


def test_compiled_bf16_agrees_with_fp32() -> None:
    args = _problem("instance", torch.float32)
    exact = match_adjoint(*args)
    fast = match_adjoint(*args, steps=CompiledSteps(args[0], precision="bf16"))
    for name in ("grad_images", "grad_targets"):
        a, b = getattr(fast, name), getattr(exact, name)
        assert a.dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
    assert not torch.equal(fast.grad_targets, exact.grad_targets)  # it did run in bf16


def test_plain_student_is_the_same_function() -> None:
    args = _problem("instance", torch.float64)
    model = args[0].model
    plain = plain_student(model)
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in model.named_parameters()]
    x = args[3]
    torch.testing.assert_close(plain(x), model(x), rtol=1e-12, atol=1e-12)
    assert type(model.body[1]).__name__ == "InstanceNorm2d"  # the original is left as it was


def test_compile_with_unrolled_or_kept_graphs_is_refused() -> None:
    args = _problem("instance", torch.float32)
    steps = CompiledSteps(args[0])
    with pytest.raises(ConfigError, match="mode=adjoint"):
        match_unrolled(*args, steps=steps)
    with pytest.raises(ConfigError, match="keep_graphs"):
        match_adjoint(*args, keep_graphs=2, steps=steps)
    cfg = load_preset("smoke")
    with pytest.raises(ConfigError, match="mode=adjoint"):
        cfg.override(["distill.compile=true", "distill.mode=unrolled"]).validate()
    with pytest.raises(ConfigError, match="keep_graphs"):
        cfg.override(["distill.compile=true", "distill.keep_graphs=3"]).validate()


def test_cuda_graphs_need_compiled_steps_on_a_cuda_device() -> None:
    cfg = load_preset("smoke")
    with pytest.raises(ConfigError, match="needs distill.compile=true"):
        cfg.override(["distill.cuda_graphs=true"]).validate()
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        cfg.override(["distill.compile=true", "distill.cuda_graphs=true", "device=cpu"]).validate()
    cfg.override(["distill.compile=true", "distill.cuda_graphs=true", "device=cuda"]).validate()
    with pytest.raises(ConfigError, match="needs a CUDA device .* on cpu"):
        CompiledSteps(_problem("instance", torch.float32)[0], cuda_graphs=True)


def test_the_compiler_s_tf32_advice_is_dropped_and_nothing_else() -> None:
    """On CUDA, TorchInductor advises every compiling process to run float32 matrix products in TF32;
    the walk keeps fp32 exact, so the compiled steps drop that advice, and only it."""
    import warnings

    def compile_and_run() -> int:
        warnings.warn("TensorFloat32 tensor cores for float32 matrix multiplication available but not "
                      "enabled.", UserWarning, stacklevel=1)
        warnings.warn("a real problem", UserWarning, stacklevel=1)
        return 3

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert _guarded(compile_and_run)() == 3
    assert [str(w.message) for w in seen] == ["a real problem"]


def test_graph_replayed_steps_mark_a_step_and_hand_out_copies(monkeypatch) -> None:
    """A CUDA graph's outputs are overwritten by its next replay: each call marks a new step of the
    graph trees and returns copies, so the walk's stored parameters survive the next step."""
    marks: list[int] = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    static = torch.zeros(3), torch.ones(2)  # the graph's output buffers

    def replay(v: float) -> tuple[torch.Tensor, torch.Tensor]:
        static[0].fill_(v)
        return static

    call = _guarded(replay, graphs=True)
    first = call(1.0)
    second = call(2.0)
    assert marks == [1, 1]
    assert first[0].tolist() == [1.0] * 3 and second[0].tolist() == [2.0] * 3
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(first, static, strict=True))
    single = _guarded(lambda: static[1], graphs=True)()
    assert single.data_ptr() != static[1].data_ptr() and len(marks) == 3
    assert _guarded(lambda: static[1])() is static[1]  # without graphs: no copy, no step


def test_a_compiler_failure_is_one_line_that_says_what_to_do() -> None:
    from torch._dynamo.exc import InternalTorchDynamoError

    def broken(*_: object) -> None:
        raise InternalTorchDynamoError("no C++ compiler found\nlong traceback")

    with pytest.raises(ConfigError, match=r"distill.compile=false") as info:
        _guarded(broken)(1)
    assert "\n" not in str(info.value)

    from torch._inductor.exc import CppCompileError, InductorError

    def bad_code(*_: object) -> None:  # the generated C++ does not build: thousands of gcc lines
        raise InductorError(CppCompileError(["g++", "x.cpp"], "x.cpp:35: error: conflicting\n" * 500),
                            None)

    with pytest.raises(ConfigError, match=r"torch.compile failed \(CppCompileError.*compile=false") as info:
        _guarded(bad_code)(1)
    assert "\n" not in str(info.value) and len(str(info.value)) < 400

    def other(*_: object) -> None:
        raise ValueError("not the compiler")

    with pytest.raises(ValueError):  # anything else passes through unchanged
        _guarded(other)(1)


def test_the_build_s_no_cuda_notice_is_dropped_and_nothing_else() -> None:
    """TorchInductor's C++ build logs "No CUDA runtime is found" on every CPU-only machine; the
    compiled steps drop that one line while they run, and only it."""
    build_log = logging.getLogger("torch.utils.cpp_extension")
    seen: list[str] = []
    catch = logging.Handler(logging.WARNING)
    catch.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]

    def build() -> int:
        build_log.warning("No CUDA runtime is found, using CUDA_HOME='/usr/local'")
        build_log.warning("a real build problem")
        return 3

    build_log.addHandler(catch)
    try:
        assert _guarded(build)() == 3
        build_log.warning("No CUDA runtime is found, outside the compiled steps")
    finally:
        build_log.removeHandler(catch)
    assert seen == ["a real build problem", "No CUDA runtime is found, outside the compiled steps"]
    assert not build_log.filters


def test_the_stage_hands_compiled_steps_to_the_matcher(tiny_cfg, tmp_path, monkeypatch) -> None:
    import distilled_ssl.stages.distill.mkdt as distill_mod
    from distilled_ssl.pipeline import prepare_run, run_pipeline

    made: list[dict] = []
    seen: list[object] = []

    class Spy:
        def __init__(self, flat: FlatParams, **kwargs: object) -> None:
            made.append(kwargs)

    real = distill_mod.MATCHERS["adjoint"]

    def matcher(*args: object, steps: object = None, **kwargs: object) -> object:
        seen.append(steps)
        return real(*args, **kwargs)

    monkeypatch.setattr(distill_mod, "CompiledSteps", Spy)
    monkeypatch.setattr(distill_mod, "MATCHERS", {"adjoint": matcher})
    ctx = prepare_run(tiny_cfg.override(["distill.iterations=2", "distill.compile=true",
                                         "distill.precision=bf16"]), tmp_path / "run", progress=False)
    run_pipeline(ctx, stages=["teacher", "targets", "experts", "init", "distill"])
    assert made == [{"precision": "bf16", "image_grads": ctx.cfg.distill.lr_img > 0, "cuda_graphs": False,
                     "batched": False}]
    assert len(seen) == 2 and all(isinstance(s, Spy) for s in seen)
