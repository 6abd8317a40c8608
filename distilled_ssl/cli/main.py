"""The ``distilled-ssl`` group: ``run``, one command per stage, ``demo`` and ``presets``; the
``evaluate`` (:mod:`.evaluate`), ``export`` (:mod:`.export`) and Hub (:mod:`.hub`) commands join it here."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from .._version import __version__
from ..config import list_presets, load_preset
from ..distributed import is_main
from ..layout import DISTILLED_FILE, GRID_FILE, PLOT_FILE, RESULTS_FILE
from ..stages.context import RunContext
from ._errors import user_errors
from ._options import non_empty_path, run_options, start
from .evaluate import evaluate
from .export import export
from .hub import HUB_COMMANDS

DEMO_PRESET = "cpu-fmnist-2pct"


@click.group()
@click.version_option(__version__, prog_name="distilled-ssl")
def main() -> None:
    """distilled_ssl: distil unlabeled image sets for self-supervised pre-training (MKDT)."""


@main.command()
@run_options
@click.option("--no-eval", is_flag=True, help="Skip the quick evaluation after distillation.")
@user_errors
def run(out: Path, preset: str | None, config_file: Path | None, overrides: tuple[str, ...],
        device: str | None, seed: int | None, force: bool, quiet: bool, no_eval: bool) -> None:
    """Run the whole pipeline (teacher → targets → experts → init → distill → eval)."""
    ctx = start(out, preset, config_file, overrides, device, seed, quiet, force)
    _run_all(ctx, force=force, evaluate=not no_eval)


def _run_all(ctx: RunContext, *, force: bool, evaluate: bool) -> None:
    from ..pipeline import run_pipeline
    from ..sets.results import format_table

    t0 = time.perf_counter()
    times = run_pipeline(ctx, force=force, evaluate=evaluate)
    if not is_main():
        return
    result = json.loads(ctx.path(RESULTS_FILE).read_text()) if "eval" in times else None
    click.echo(f"\nrun directory: {ctx.run_dir}")
    click.echo("stage wall times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
               + f" (total {time.perf_counter() - t0:.0f} s)")
    if result is not None:
        p = result["protocol"]
        click.echo(f"\nKD pre-training of a fresh encoder on each set ({p['epochs']} epochs), then "
                   "teacher fidelity on unseen test images and linear probe / kNN with "
                   f"{', '.join(f'{100 * f:g}%' for f in p['label_fractions'])} of the labels:\n")
        click.echo(format_table(result))
        click.echo(f"plot: {ctx.path(PLOT_FILE)}")
    click.echo(f"\ndistilled set: {ctx.path(DISTILLED_FILE)}")
    click.echo(f"picture:       {ctx.path(GRID_FILE)}")


def _stage_command(name: str, help_text: str) -> None:
    @main.command(name=name, help=help_text)
    @run_options
    @user_errors
    def command(out: Path, preset: str | None, config_file: Path | None,
                overrides: tuple[str, ...], device: str | None, seed: int | None, force: bool,
                quiet: bool) -> None:
        from ..pipeline import run_pipeline

        ctx = start(out, preset, config_file, overrides, device, seed, quiet, force)
        times = run_pipeline(ctx, stages=[name], force=force)
        if is_main():
            click.echo(f"{name}: done in {times[name]:.1f} s ({ctx.run_dir})")


STAGE_HELP = {  # the building stages of pipeline.STAGES
    "teacher": "Stage 1: train (Barlow Twins) or load the SSL teacher.",
    "targets": "Stage 2: teacher representations of every source image.",
    "experts": "Stage 3: KD expert trajectories (several processes may share --out).",
    "init": "Stage 4: pick the initial synthetic set (high-loss, random or k-means).",
    "distill": "Stage 5: trajectory matching → distilled.safetensors + distilled.png.",
}  # stage 6 is the `evaluate` command
for _name, _help in STAGE_HELP.items():
    _stage_command(_name, _help)


@main.command()
@click.option("--out", default="runs/demo", show_default=True, callback=non_empty_path,
              help="Run directory.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Config override.")
@click.option("--force", is_flag=True, help="Re-run every stage.")
@click.option("--quiet", "-q", is_flag=True, help="Only warnings and the final summary.")
@user_errors
def demo(out: Path, overrides: tuple[str, ...], force: bool, quiet: bool) -> None:
    """The README's main job: the cpu-fmnist-2pct preset end to end, then the results table."""
    ctx = start(out, DEMO_PRESET, None, overrides, None, None, quiet, force)
    _run_all(ctx, force=force, evaluate=True)


@main.group()
def presets() -> None:
    """Shipped configurations."""


@presets.command("list")
@user_errors
def presets_list() -> None:
    """Names of the shipped presets."""
    for name in list_presets():
        click.echo(name)


@presets.command("show")
@click.argument("name")
@user_errors
def presets_show(name: str) -> None:
    """Print a preset as YAML (a starting point for --config)."""
    click.echo(load_preset(name).to_yaml(), nl=False)


main.add_command(evaluate)
main.add_command(export)
for _command in HUB_COMMANDS:
    main.add_command(_command)
