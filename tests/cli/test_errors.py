"""The CLI's one table of library errors: every error class maps to a one-line message and exit code."""

from __future__ import annotations

import inspect
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

import distilled_ssl.errors as errors
from distilled_ssl.cli import main
from distilled_ssl.cli._errors import ERROR_TABLE, exit_code, user_errors
from distilled_ssl.config import RunConfig

LIBRARY_ERRORS = [cls for _, cls in inspect.getmembers(errors, inspect.isclass)
                  if issubclass(cls, errors.DistilledSSLError)]


@pytest.mark.parametrize("cls", LIBRARY_ERRORS, ids=lambda c: c.__name__)
def test_every_library_error_is_one_line_and_non_zero(cls: type[errors.DistilledSSLError]) -> None:
    assert any(issubclass(cls, row) for row, _, _ in ERROR_TABLE)

    @user_errors
    def fails() -> None:
        raise cls("first line\nsecond line")

    with pytest.raises(click.ClickException) as info:
        fails()
    assert info.value.message == "first line second line"
    assert info.value.exit_code == exit_code(cls("x")) != 0


def test_the_first_matching_row_wins() -> None:
    rows = [row for row, _, _ in ERROR_TABLE]
    assert rows[-1] is errors.DistilledSSLError  # the catch-all comes last
    for i, row in enumerate(rows):  # no row is hidden behind an earlier, broader one
        assert not any(issubclass(row, earlier) for earlier in rows[:i]), row


def test_a_bug_is_not_caught_and_keeps_its_traceback() -> None:
    @user_errors
    def buggy() -> None:
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        buggy()


def test_old_builtin_bases_still_catch() -> None:
    assert issubclass(errors.ConfigError, ValueError)
    assert issubclass(errors.DataNotFoundError, RuntimeError)
    assert issubclass(errors.DivergenceError, FloatingPointError)
    assert issubclass(errors.OutputExistsError, FileExistsError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_one_line_error(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(tiny_cfg.to_yaml())
    res = CliRunner().invoke(main, ["teacher", "--config", str(cfg_file), "--out", str(tmp_path / "run"),
                                    "--device", "cuda"])
    assert res.exit_code == 1
    assert "CUDA is not available" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1, res.output
