"""The ``distilled-ssl`` command line."""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from tqdm.auto import tqdm

from ._version import __version__
from .config import ConfigError, RunConfig, list_presets, load_preset
from .context import LOGGER_NAME, RunContext
from .data import DataNotFoundError
from .eval_cli import register as register_eval_command
from .hub import HubError
from .hub_cli import register as register_hub_commands
from .io import ArtifactError
from .models import UnknownArchError

DEMO_PRESET = "cpu-fmnist-2pct"
_USER_ERRORS = (ConfigError, ArtifactError, DataNotFoundError, UnknownArchError, HubError, ValueError,
                FloatingPointError, FileNotFoundError, FileExistsError)


class _TqdmHandler(logging.Handler):
    """Log lines that do not tear progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def _setup_console(quiet: bool) -> None:
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO)
    if not any(isinstance(h, _TqdmHandler) for h in logger.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    for h in logger.handlers:
        if isinstance(h, _TqdmHandler):
            h.setLevel(logging.WARNING if quiet else logging.INFO)


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one-line CLI errors; Ctrl-C says how to resume."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except _USER_ERRORS as exc:
            raise click.ClickException(str(exc)) from exc
        except KeyboardInterrupt:
            click.echo("\ninterrupted: finished work is saved; run the same command again to "
                       "resume", err=True)
            sys.exit(130)

    return wrapper


def _run_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
                     help="Run directory (created; holds config.yaml, run.log and every artifact)."),
        click.option("--preset", help="A shipped preset (see `distilled-ssl presets list`)."),
        click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
                     help="A YAML config file."),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override a config value, e.g. --set distill.iterations=500."),
        click.option("--device", help="cpu, cuda, cuda:N (overrides the config)."),
        click.option("--seed", type=int, help="Run seed (overrides the config)."),
        click.option("--force", is_flag=True, help="Re-run even when the artifact exists."),
        click.option("--quiet", "-q", is_flag=True, help="Only warnings and the final summary."),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def _resolve_config(out: Path, preset: str | None, config_file: Path | None,
                    overrides: tuple[str, ...], device: str | None, seed: int | None) -> RunConfig:
    if preset and config_file:
        raise ConfigError("give --preset or --config, not both")
    if preset:
        cfg = load_preset(preset)
    elif config_file:
        cfg = RunConfig.from_yaml(config_file)
    elif (out / "config.yaml").is_file():
        cfg = RunConfig.from_yaml(out / "config.yaml")
    else:
        raise ConfigError(f"{out} holds no config.yaml: give --preset NAME or --config FILE")
    extra = list(overrides)
    if device:
        extra.append(f"device={device}")
    if seed is not None:
        extra.append(f"seed={seed}")
    return cfg.override(extra) if extra else cfg


def _start(out: Path, preset: str | None, config_file: Path | None, overrides: tuple[str, ...],
           device: str | None, seed: int | None, quiet: bool) -> RunContext:
    from .pipeline import prepare_run

    _setup_console(quiet)
    cfg = _resolve_config(out, preset, config_file, overrides, device, seed)
    return prepare_run(cfg, out, progress=not quiet and sys.stderr.isatty())


@click.group()
@click.version_option(__version__, prog_name="distilled-ssl")
def main() -> None:
    """distilled_ssl: distil unlabeled image sets for self-supervised pre-training (MKDT)."""


@main.command()
@_run_options
@click.option("--no-eval", is_flag=True, help="Skip the quick evaluation after distillation.")
@_user_errors
def run(out: Path, preset: str | None, config_file: Path | None, overrides: tuple[str, ...],
        device: str | None, seed: int | None, force: bool, quiet: bool, no_eval: bool) -> None:
    """Run the whole pipeline (teacher → targets → experts → init → distill → eval)."""
    ctx = _start(out, preset, config_file, overrides, device, seed, quiet)
    _run_all(ctx, force=force, evaluate=not no_eval)


def _run_all(ctx: RunContext, *, force: bool, evaluate: bool) -> None:
    from .pipeline import run_log, run_pipeline

    t0 = time.perf_counter()
    times = run_pipeline(ctx, force=force)
    result = None
    if evaluate and ctx.cfg.eval.enabled:
        from .report import evaluate_run, format_table

        t1 = time.perf_counter()
        with run_log(ctx):
            result = evaluate_run(ctx)
        times["eval"] = time.perf_counter() - t1
    click.echo(f"\nrun directory: {ctx.run_dir}")
    click.echo("stage wall times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
               + f" (total {time.perf_counter() - t0:.0f} s)")
    if result is not None:
        p = result["protocol"]
        click.echo(f"\nKD pre-training of a fresh encoder on each set ({p['epochs']} epochs), then "
                   "teacher fidelity on unseen test images and linear probe / kNN with "
                   f"{', '.join(f'{100 * f:g}%' for f in p['label_fractions'])} of the labels:\n")
        click.echo(format_table(result))
        click.echo(f"plot: {ctx.path('results.png')}")
    click.echo(f"\ndistilled set: {ctx.path('distilled.safetensors')}")
    click.echo(f"picture:       {ctx.path('distilled.png')}")


def _stage_command(name: str, help_text: str) -> None:
    @main.command(name=name, help=help_text)
    @_run_options
    @_user_errors
    def command(out: Path, preset: str | None, config_file: Path | None,
                overrides: tuple[str, ...], device: str | None, seed: int | None, force: bool,
                quiet: bool) -> None:
        from .pipeline import run_pipeline

        ctx = _start(out, preset, config_file, overrides, device, seed, quiet)
        times = run_pipeline(ctx, stages=[name], force=force)
        click.echo(f"{name}: done in {times[name]:.1f} s ({ctx.run_dir})")


_stage_command("teacher", "Stage 1: train (Barlow Twins) or load the SSL teacher.")
_stage_command("targets", "Stage 2: teacher representations of every source image.")
_stage_command("experts", "Stage 3: KD expert trajectories (several processes may share --out).")
_stage_command("init", "Stage 4: pick the initial synthetic set (high-loss or random).")
_stage_command("distill", "Stage 5: trajectory matching → distilled.safetensors + distilled.png.")


@main.command()
@click.option("--out", default="runs/demo", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="Run directory.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Config override.")
@click.option("--force", is_flag=True, help="Re-run every stage.")
@click.option("--quiet", "-q", is_flag=True, help="Only warnings and the final summary.")
@_user_errors
def demo(out: Path, overrides: tuple[str, ...], force: bool, quiet: bool) -> None:
    """The README's main job: the cpu-fmnist-2pct preset end to end, then the results table."""
    ctx = _start(out, DEMO_PRESET, None, overrides, None, None, quiet)
    _run_all(ctx, force=force, evaluate=True)


@main.group()
def presets() -> None:
    """Shipped configurations."""


@presets.command("list")
def presets_list() -> None:
    """Names of the shipped presets."""
    for name in list_presets():
        click.echo(name)


@presets.command("show")
@click.argument("name")
@_user_errors
def presets_show(name: str) -> None:
    """Print a preset as YAML (a starting point for --config)."""
    click.echo(load_preset(name).to_yaml(), nl=False)


register_hub_commands(main, _user_errors)
register_eval_command(main, _user_errors, _setup_console)

if __name__ == "__main__":  # pragma: no cover
    main()
