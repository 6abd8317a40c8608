from pathlib import Path

import yaml
from click.testing import CliRunner

from distilled_ssl.cli import main
from distilled_ssl.config import RunConfig


def _config_file(cfg: RunConfig, tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(cfg.to_yaml())
    return path


def test_run_writes_a_distilled_set_and_prints_the_table(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", "--config", str(_config_file(tiny_cfg, tmp_path)),
                                       "--out", str(out), "--set", "distill.iterations=2",
                                       "--seed", "3", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (out / "distilled.safetensors").is_file() and (out / "distilled.png").is_file()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["seed"] == 3 and saved["distill"]["iterations"] == 2
    assert "| MKDT (high-loss init, class-balanced) |" in result.output
    assert "fidelity R²" in result.output and "toy/probe@25%" in result.output
    assert "stage wall times: teacher" in result.output
    assert (out / "results.json").is_file()


def test_stage_commands_run_one_stage_each(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    out = tmp_path / "run"
    runner = CliRunner()
    cfg_file = _config_file(tiny_cfg, tmp_path)
    res = runner.invoke(main, ["targets", "--config", str(cfg_file), "--out", str(out)])
    assert res.exit_code == 1 and "run the teacher stage first" in res.output
    for stage in ("teacher", "targets", "experts", "init", "distill"):
        res = runner.invoke(main, [stage, "--out", str(out)])  # reuses out/config.yaml
        assert res.exit_code == 0, res.output
        assert f"{stage}: done" in res.output
    assert (out / "distilled.safetensors").is_file()
    res = runner.invoke(main, ["teacher", "--out", str(out), "--set", "teacher.epochs=5"])
    assert res.exit_code == 1 and "different configuration" in res.output
    res = runner.invoke(main, ["teacher", "--out", str(out), "--set", "teacher.epochs=5", "--force"])
    assert res.exit_code == 0, res.output


def test_bad_input_is_a_one_line_error(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(main, ["run", "--preset", "nope", "--out", str(tmp_path)])
    assert res.exit_code == 1 and "unknown preset 'nope'" in res.output and "Traceback" not in res.output
    res = runner.invoke(main, ["run", "--preset", "smoke", "--out", str(tmp_path),
                               "--set", "distill.syn_steps=-1"])
    assert res.exit_code == 1 and "distill.syn_steps must be > 0" in res.output
    res = runner.invoke(main, ["distill", "--out", str(tmp_path / "empty")])
    assert res.exit_code == 1 and "--preset NAME or --config FILE" in res.output


def test_presets_list_and_show() -> None:
    runner = CliRunner()
    res = runner.invoke(main, ["presets", "list"])
    assert res.exit_code == 0 and "cpu-fmnist-2pct" in res.output.split()
    res = runner.invoke(main, ["presets", "show", "cifar10-2pct"])
    assert yaml.safe_load(res.output)["distill"]["syn_steps"] == 40


def test_ctrl_c_says_how_to_resume(tiny_cfg: RunConfig, tmp_path: Path, monkeypatch) -> None:
    import distilled_ssl.pipeline as pipeline

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_pipeline", interrupted)
    res = CliRunner().invoke(main, ["run", "--config", str(_config_file(tiny_cfg, tmp_path)),
                                    "--out", str(tmp_path / "run")])
    assert res.exit_code == 130
    assert "run the same command again to resume" in res.output


def _one_line_error(res, text: str) -> None:
    assert res.exit_code == 1, res.output
    assert text in res.output and "Traceback" not in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1, res.output


def test_bad_run_directories_are_one_line_errors(tiny_cfg: RunConfig, tmp_path: Path,
                                                 monkeypatch) -> None:
    import errno
    import tempfile

    cfg = str(_config_file(tiny_cfg, tmp_path))
    runner = CliRunner()
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    _one_line_error(runner.invoke(main, ["teacher", "--config", cfg, "--out", ""]), "empty path")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing in the working directory
    (tmp_path / "afile").write_text("")
    _one_line_error(runner.invoke(main, ["teacher", "--config", cfg, "--out", "afile/run"]),
                    "a file is in the way")
    _one_line_error(runner.invoke(main, ["teacher", "--config", cfg, "--out", "afile"]), "is a file")
    _one_line_error(runner.invoke(main, ["teacher", "--config", cfg, "--out", "x" * 300]),
                    "File name too long")

    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkstemp", read_only)
        _one_line_error(runner.invoke(main, ["teacher", "--config", cfg, "--out", "ro"]),
                        "Read-only file system")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr("os.fsync", full)
        _one_line_error(runner.invoke(main, ["teacher", "--config", cfg, "--out", "full", "-q"]),
                        "No space left on device")
    assert not list((tmp_path / "full").glob("*.safetensors"))


def test_unavailable_devices_are_one_line_errors(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    import torch

    cfg = str(_config_file(tiny_cfg, tmp_path))
    if not torch.backends.mps.is_available():
        _one_line_error(CliRunner().invoke(main, ["teacher", "--config", cfg, "--out",
                                                  str(tmp_path / "m"), "--device", "mps"]), "no MPS")
        assert not (tmp_path / "m").exists()
    if not torch.cuda.is_available():
        _one_line_error(CliRunner().invoke(main, ["run", "--config", cfg, "--out", str(tmp_path / "c"),
                                                  "--device", "cuda:1"]), "CUDA is not available")


def test_values_that_used_to_break_late_are_refused_up_front(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    cfg = str(_config_file(tiny_cfg, tmp_path))
    for override, message in (("threads=0", "threads must be >= 1"),
                              ("distill.expert_epochs=.nan", "distill.expert_epochs must be a finite"),
                              ("teacher.projector=[0]", "teacher.projector must be a non-empty list")):
        res = CliRunner().invoke(main, ["run", "--config", cfg, "--out", str(tmp_path / "r"),
                                        "--set", override])
        _one_line_error(res, message)
    assert not (tmp_path / "r").exists()


def test_a_refused_rerun_writes_nothing(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    out = tmp_path / "run"
    runner = CliRunner()
    cfg = str(_config_file(tiny_cfg, tmp_path))
    res = runner.invoke(main, ["teacher", "--config", cfg, "--out", str(out)])
    assert res.exit_code == 0, res.output
    before = (out / "config.yaml").read_text()
    res = runner.invoke(main, ["teacher", "--out", str(out), "--set", "teacher.epochs=5"])
    _one_line_error(res, "different configuration")
    assert (out / "config.yaml").read_text() == before
    res = runner.invoke(main, ["teacher", "--out", str(out)])  # the plain rerun still works
    assert res.exit_code == 0, res.output


def test_export_writes_a_set_folder_or_an_image_folder(tmp_path: Path) -> None:
    import json

    from hub_fixtures import make_distilled_file
    from torchvision.datasets import ImageFolder

    from distilled_ssl import DistilledDataset, write_set

    run = make_distilled_file(tmp_path / "run")
    runner = CliRunner()
    res = runner.invoke(main, ["export", str(run), "--out", str(tmp_path / "set"), "--repo-id", "me/x"])
    assert res.exit_code == 0, res.output
    ds = DistilledDataset.from_local(tmp_path / "set")
    assert len(ds) == 12 and 'from_hub("me/x")' in ds.card
    assert callable(write_set)
    _one_line_error(runner.invoke(main, ["export", str(run), "--out", str(tmp_path / "set")]), "not empty")
    res = runner.invoke(main, ["export", str(run), "--out", str(tmp_path / "set"), "--force"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["export", str(tmp_path / "set"), "--out", str(tmp_path / "img"),
                               "--image-folder"])
    assert res.exit_code == 0 and "12 images in 3 class folder(s)" in res.output, res.output
    assert ImageFolder(str(tmp_path / "img")).classes == ["Pullover", "T-shirt_top", "Trouser"]
    assert len(json.loads((tmp_path / "img" / "files.json").read_text())["files"]) == 12
    _one_line_error(runner.invoke(main, ["export", str(run), "--out", str(tmp_path / "img"),
                                         "--image-folder"]), "not empty")
    _one_line_error(runner.invoke(main, ["export", str(run), "--out", ""]), "empty path")


def test_info_reports_the_set_size_and_missing_paths(tmp_path: Path) -> None:
    import json

    from hub_fixtures import make_distilled_file

    run = make_distilled_file(tmp_path / "run")
    (run / "experts").mkdir()
    (run / "experts" / "expert_00000.safetensors").write_bytes(b"x" * 5_000_000)  # a big run
    res = CliRunner().invoke(main, ["info", str(run), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["size_bytes"] == (run / "distilled.safetensors").stat().st_size
    _one_line_error(CliRunner().invoke(main, ["info", str(tmp_path / "nope" / "x")]), "does not exist")
