"""What the run and stage commands share: their options, the console log and the config they run."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from tqdm.auto import tqdm

from ..config import RunConfig, load_preset
from ..distributed import init_from_env, is_main, rank, world_size
from ..errors import ConfigError
from ..layout import CONFIG_FILE
from ..stages.context import LOGGER_NAME, RunContext


class _TqdmHandler(logging.Handler):
    """Log lines that do not tear progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def setup_console(quiet: bool) -> None:
    """Show the library's log on stderr (only warnings when ``quiet``, and on torchrun ranks
    other than 0, whose lines say their rank)."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO)
    if not any(isinstance(h, _TqdmHandler) for h in logger.handlers):
        logger.addHandler(_TqdmHandler())
    prefix = f"[rank {rank()}] " if world_size() > 1 else ""
    for h in logger.handlers:
        if isinstance(h, _TqdmHandler):
            h.setFormatter(logging.Formatter(prefix + "%(message)s"))
            h.setLevel(logging.WARNING if quiet or not is_main() else logging.INFO)


def non_empty_path(ctx: click.Context, param: click.Parameter, value: str | None) -> Path | str | None:
    """A path option that keeps "" as it is (``Path("")`` would silently mean the working
    directory), for :func:`start` to refuse as a one-line error."""
    return Path(value) if value and value.strip() else value


def run_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--out --preset --config --set --device --seed --force --quiet``."""
    options = [
        click.option("--out", "out", required=True, callback=non_empty_path,
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


def resolve_config(out: Path, preset: str | None, config_file: Path | None,
                   overrides: tuple[str, ...], device: str | None, seed: int | None) -> RunConfig:
    """The run's config: a preset, a file, or the run directory's own ``config.yaml``, overridden."""
    if preset and config_file:
        raise ConfigError("give --preset or --config, not both")
    if preset:
        cfg = load_preset(preset)
    elif config_file:
        cfg = RunConfig.from_yaml(config_file)
    elif (out / CONFIG_FILE).is_file():
        cfg = RunConfig.from_yaml(out / CONFIG_FILE)
    else:
        raise ConfigError(f"{out} holds no {CONFIG_FILE}: give --preset NAME or --config FILE")
    extra = list(overrides)
    if device:
        extra.append(f"device={device}")
    if seed is not None:
        extra.append(f"seed={seed}")
    return cfg.override(extra) if extra else cfg


def start(out: Path, preset: str | None, config_file: Path | None, overrides: tuple[str, ...],
          device: str | None, seed: int | None, quiet: bool, force: bool = False) -> RunContext:
    """Set up the console, resolve the config and prepare the run directory (nothing is written
    when the run directory refuses the configuration)."""
    from ..pipeline import prepare_run

    setup_console(quiet)
    if not str(out).strip():
        raise ConfigError("--out is an empty path; name the run directory")
    cfg = resolve_config(out, preset, config_file, overrides, device, seed)
    init_from_env(cfg.device)  # under torchrun: join the job, then let rank 0 alone talk
    setup_console(quiet)
    return prepare_run(cfg, out, progress=not quiet and sys.stderr.isatty(), force=force)
