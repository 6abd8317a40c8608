"""KRR-ST (``distill.method: krr_st``) on the tiny synthetic set: maths, pipeline, resume, config."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import ctrl_c_at_call, same_artifact

import distilled_ssl.stages.distill.krr_st as krr_mod
from distilled_ssl.config import ConfigError, RunConfig
from distilled_ssl.io import ArtifactError, load_tensors, read_metadata
from distilled_ssl.pipeline import prepare_run, run_pipeline
from distilled_ssl.sets.artifact import load_distilled_file
from distilled_ssl.sets.dataset import DistilledDataset
from distilled_ssl.stages.context import RunContext
from distilled_ssl.stages.distill import run_distill
from distilled_ssl.stages.distill.krr_st import KrrSolveError, ModelPool, krr_predict

FAST = ["teacher.epochs=1"]  # any teacher will do here
KRR = ["distill.method=krr_st", "distill.krr_st.pool_size=2", "distill.krr_st.real_batch=64",
       "distill.krr_st.model_steps=3", "distill.krr_st.lr=0.01"]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory, synthetic_npz: Path) -> Path:
    """Teacher and targets of the tiny config, trained once and copied into each test's run."""
    from conftest import tiny_config

    ctx = prepare_run(tiny_config(synthetic_npz).override(FAST), tmp_path_factory.mktemp("upstream"),
                      progress=False)
    run_pipeline(ctx, stages=["teacher", "targets"])
    return ctx.run_dir


def _ctx(cfg: RunConfig, upstream: Path, out: Path, overrides: list[str]) -> RunContext:
    out.mkdir(parents=True, exist_ok=True)
    for name in ("teacher.safetensors", "targets.safetensors"):
        if not (out / name).exists():
            shutil.copy(upstream / name, out / name)
    return prepare_run(cfg.override([*FAST, *overrides]), out, progress=False)


# ---------------------------------------------------------------------- the closed form
@pytest.mark.parametrize("k, p", [(6, 20), (20, 5)])  # dual (k <= p) and primal (p + 1 < k) forms
def test_krr_prediction_equals_float64_closed_form(k: int, p: int) -> None:
    g = torch.Generator().manual_seed(0)
    f_syn = torch.randn(k, p, generator=g) + 0.5
    f_real = torch.randn(9, p, generator=g) + 0.5
    y_syn = torch.randn(k, 3, generator=g)
    ridge = 1e-3
    fs = torch.cat([f_syn, torch.ones(k, 1)], 1).double()
    fr = torch.cat([f_real, torch.ones(9, 1)], 1).double()
    kss = fs @ fs.T
    expected = (fr @ fs.T) @ torch.linalg.solve(kss + ridge * torch.trace(kss) * torch.eye(k),
                                                y_syn.double())
    got = krr_predict(f_real, f_syn, y_syn, ridge)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)
    # a tiny ridge interpolates the synthetic set itself (the paper's 1e-6, well-posed case)
    if k <= p:
        torch.testing.assert_close(krr_predict(f_syn, f_syn, y_syn, 1e-6), y_syn, rtol=1e-3, atol=1e-3)


def test_krr_gradients_reach_features_and_targets() -> None:
    g = torch.Generator().manual_seed(1)
    f_syn = torch.randn(5, 8, generator=g, requires_grad=True)
    y_syn = torch.randn(5, 2, generator=g, requires_grad=True)
    loss = krr_predict(torch.randn(7, 8, generator=g), f_syn, y_syn, 1e-6).pow(2).mean()
    gf, gy = torch.autograd.grad(loss, [f_syn, y_syn])
    assert gf.abs().sum() > 0 and gy.abs().sum() > 0
    assert torch.isfinite(gf).all() and torch.isfinite(gy).all()


def test_unsolvable_system_gets_a_clear_error() -> None:
    f = torch.full((4, 3), float("nan"))
    with pytest.raises(KrrSolveError, match="lower distill.krr_st.lr"):
        krr_predict(torch.ones(2, 3), f, torch.ones(4, 2), 1e-6)
    with pytest.raises(KrrSolveError, match="raise distill.krr_st.ridge"):
        krr_mod._spd_solve(torch.zeros(3, 3), torch.ones(3, 1), 0.0)


# ---------------------------------------------------------------------- the pool
def test_pool_model_is_reinitialised_after_model_steps(tiny_cfg: RunConfig, upstream: Path,
                                                       tmp_path: Path) -> None:
    ctx = _ctx(tiny_cfg, upstream, tmp_path, [*KRR, "distill.krr_st.model_steps=2"])
    x, y = torch.randn(5, 1, 16, 16), torch.randn(5, 4)
    pool = ModelPool(ctx, 4, torch.device("cpu"))
    fresh = [m.state_dict()["head.weight"].clone() for m in pool.models]
    pool.warm_up(x, y)
    assert pool.steps == [1, 1]  # a random count in [1, 2)
    pool.update(0, x, y, it=0)
    assert pool.steps == [2, 1]
    trained = pool.models[0].state_dict()["head.weight"].clone()
    assert not torch.equal(trained, fresh[0])
    pool.update(0, x, y, it=1)  # the step count ran out: a fresh model, and the count restarts
    assert pool.steps == [0, 1]
    reinit = pool.models[0].state_dict()["head.weight"]
    assert not torch.equal(reinit, trained) and not torch.equal(reinit, fresh[0])
    pool.update(0, x, y, it=2)
    assert pool.steps == [1, 1]  # ... and it trains again (the reference kept re-initialising)
    again = ModelPool(ctx, 4, torch.device("cpu"))  # seeded: the same initial models
    assert torch.equal(again.models[1].state_dict()["head.weight"], fresh[1])


# ---------------------------------------------------------------------- the stage
def test_krr_st_end_to_end_writes_a_readable_set(tiny_cfg: RunConfig, upstream: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = _ctx(tiny_cfg, upstream, tmp_path, [*KRR, "init.method=random", "distill.iterations=6"])
    rng_before = torch.get_rng_state()
    run_pipeline(ctx)
    assert torch.equal(torch.get_rng_state(), rng_before)  # no global RNG use leaks out
    log = ctx.path("run.log").read_text()
    assert "experts: skipped" in log and "distill 6/6: KRR loss" in log
    assert not ctx.path("experts").exists()  # random init + KRR-ST: no experts trained
    assert ctx.path("distilled.png").is_file()

    dset = load_distilled_file(ctx.path("distilled.safetensors"))
    meta = dset.metadata
    assert meta["method"] == "krr_st" and meta["iterations"] == 6
    assert meta["krr_loss"]["first"] > 0 and "num_experts" not in meta
    assert meta["config"]["distill"]["krr_st"]["pool_size"] == 2
    assert dset.lr == pytest.approx(tiny_cfg.distill.lr_init)
    assert dset.images.shape == (12, 1, 16, 16) and dset.targets.shape == (12, 4)
    init_index = load_tensors(ctx.path("init.safetensors"))[0]["indices"]
    assert dset.source_index.tolist() == init_index.tolist()
    # images and targets moved away from the real images and teacher reps they started from
    real = ctx.train_set.images[init_index].float() / 255
    assert (dset.images.float() - real).abs().max() > 3e-3  # ~ lr x std per Adam step
    reps = load_tensors(ctx.path("targets.safetensors"))[0]["target_reps"]
    assert (dset.targets - reps[init_index]).abs().max() > 1e-3

    ds = DistilledDataset.from_run(ctx.run_dir, image_format="tensor")
    assert len(ds) == 12 and ds.metadata["method"] == "krr_st"
    x, t = ds[0]
    assert x.shape == (1, 16, 16) and t.shape == (4,)

    # a finished run is not redone
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished KRR-ST run ran again")

    monkeypatch.setattr(krr_mod, "krr_loss", boom)
    monkeypatch.setattr(krr_mod.ModelPool, "warm_up", boom)
    run_pipeline(ctx)


def test_krr_loss_goes_down(tiny_cfg: RunConfig, upstream: Path, tmp_path: Path) -> None:
    """One frozen model and the whole source as the real batch: the same KRR problem every step."""
    ctx = _ctx(tiny_cfg, upstream, tmp_path,
               [*KRR, "init.method=random", "distill.iterations=30", "distill.krr_st.pool_size=1",
                "distill.krr_st.real_batch=240", "distill.krr_st.model_lr=0",
                "distill.krr_st.model_steps=60"])
    run_pipeline(ctx)
    meta = read_metadata(ctx.path("distill_state.safetensors"))
    assert meta["pool_steps"] == [12 + 30]  # seed 0 warms up 12 steps: no re-init within the run
    history = meta["history"]
    assert len(history) == 30
    assert sum(history[-3:]) / 3 < 0.8 * sum(history[:3]) / 3


def test_krr_st_resumes_bit_for_bit(tiny_cfg: RunConfig, upstream: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed mid-run (and right after the pool warm-up), a rerun gives the uninterrupted result.

    High-loss init: the experts stage still runs for KRR-ST. Pool models of 3 steps are
    re-initialised within the run, so the saved pool state (weights, momentum, counts) matters.
    """
    over = [*KRR, "distill.iterations=6", "distill.checkpoint_every=2"]
    ref = _ctx(tiny_cfg, upstream, tmp_path / "ref", over)
    run_pipeline(ref)
    assert len(list(ref.path("experts").glob("expert_*.safetensors"))) == 2
    assert read_metadata(ref.path("init.safetensors"))["method"] == "high_loss"

    real_loss = krr_mod.krr_loss
    for die_at, saved in ((5, 4), (1, 0)):
        ctx = _ctx(tiny_cfg, upstream, tmp_path / f"cut{die_at}", over)
        run_pipeline(ctx, stages=["teacher", "targets", "experts", "init"])
        monkeypatch.setattr(krr_mod, "krr_loss", ctrl_c_at_call(die_at, real_loss))
        with pytest.raises(KeyboardInterrupt):
            run_distill(ctx)
        assert read_metadata(ctx.path("distill_state.safetensors"))["iteration"] == saved
        monkeypatch.setattr(krr_mod, "krr_loss", real_loss)
        run_distill(ctx)
        for name in ("distilled.safetensors", "distill_state.safetensors"):
            assert same_artifact(ctx.path(name), ref.path(name)), (die_at, name)

    # raising the iteration count continues from the saved state
    longer = _ctx(tiny_cfg, upstream, tmp_path / "cut5", [*over, "distill.iterations=8"])
    run_distill(longer)
    assert read_metadata(longer.path("distilled.safetensors"))["iterations"] == 8
    # another KRR-ST setting is another run: the old state is not silently reused
    with pytest.raises(ArtifactError, match="different configuration"):  # refused before config.yaml changes
        _ctx(tiny_cfg, upstream, tmp_path / "cut5", [*over, "distill.krr_st.ridge=0.0001"])


@pytest.mark.parametrize("override, field", [
    ("distill.method=foo", "distill.method"),
    ("distill.krr_st.pool_size=0", "distill.krr_st.pool_size"),
    ("distill.krr_st.real_batch=0", "distill.krr_st.real_batch"),
    ("distill.krr_st.model_steps=0", "distill.krr_st.model_steps"),
    ("distill.krr_st.ridge=0", "distill.krr_st.ridge"),
    ("distill.krr_st.lr=-1", "distill.krr_st.lr"),
    ("distill.krr_st.model_lr=-0.1", "distill.krr_st.model_lr"),
])
def test_bad_krr_st_config_is_refused(tiny_cfg: RunConfig, tmp_path: Path, override: str,
                                      field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        prepare_run(tiny_cfg.override(["distill.method=krr_st", override]), tmp_path, progress=False)
    with pytest.raises(ConfigError, match="unknown key"):
        tiny_cfg.override(["distill.krr_st.pool=3"])
