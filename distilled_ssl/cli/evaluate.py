"""``distilled-ssl evaluate``: stage 6 from the command line (see :mod:`distilled_ssl.evaluation`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
import yaml

from ..config import ModelConfig, RunConfig
from ..distributed import init_from_env, is_main
from ..errors import ConfigError
from ..layout import CONFIG_FILE, PLOT_FILE, RESULTS_FILE, TABLE_FILE
from ..sets.artifact import is_set_dir, read_set
from ..sets.results import format_table
from ..stages.context import RunContext
from ._errors import user_errors
from ._options import setup_console


def parse_arch(spec: str, student: ModelConfig) -> ModelConfig:
    """``resnet10:width=0.125`` / ``convnet:depth=3,width=32`` / ``student`` → a ModelConfig."""
    if spec == "student":
        return student
    arch, kwargs = spec, {}
    head, sep, tail = spec.rpartition(":")
    if sep and "=" in tail:
        arch = head
        for item in tail.split(","):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ConfigError(f"--arch {spec!r}: expected ARCH:key=value,key=value")
            kwargs[key.strip()] = yaml.safe_load(value)
    return ModelConfig(arch, kwargs)


def _csv(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def _overrides(baselines: str | None, downstream: str | None, fractions: str | None,
               seeds: int | None, epochs: int | None, full_epochs: int | None, knn_k: int | None,
               finetune_epochs: int | None, split: str | None, precise_bn: bool | None = None,
               baseline_lr: str | None = None, lr_grid: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if baselines is not None:
        out["baselines"] = _csv(baselines)
    if downstream is not None:
        out["downstream"] = _csv(downstream)
    if fractions is not None:
        try:
            out["label_fractions"] = [float(f) for f in _csv(fractions) or []]
        except ValueError as exc:
            raise ConfigError(f"--label-fractions {fractions!r}: {exc}") from exc
    if lr_grid is not None:
        try:
            out["lr_grid"] = [float(f) for f in _csv(lr_grid) or []]
        except ValueError as exc:
            raise ConfigError(f"--lr-grid {lr_grid!r}: {exc}") from exc
    for key, value in (("seeds", seeds), ("epochs", epochs), ("full_epochs", full_epochs),
                       ("knn_k", knn_k), ("finetune_epochs", finetune_epochs), ("split", split),
                       ("precise_bn", precise_bn), ("baseline_lr", baseline_lr)):
        if value is not None:
            out[key] = value
    return out


@click.command()
@click.argument("run_or_set", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--baselines", help="Comma-separated: none, random, init, high_loss, "
              "high_loss_balanced, full, full_steps (full data, the set's step count), full:TEACHER "
              "(builtin:NAME or a teacher file), teacher.")
@click.option("--downstream", help="Comma-separated downstream sets, e.g. fashion-mnist,mnist-5k "
              "(a trailing ? = skip when missing). Default: the source set.")
@click.option("--label-fractions", "fractions", help="Comma-separated, e.g. 0.01,0.05.")
@click.option("--seeds", type=int, help="Seeds 0..N-1 (init, random subset, label subsets).")
@click.option("--arch", "archs", multiple=True, metavar="ARCH[:k=v,...]",
              help="Evaluation encoder (repeat for several; 'student' = the distillation "
              "student), e.g. --arch resnet10:width=0.125 --arch student.")
@click.option("--compare", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="Another distilled set (run directory or set folder) to evaluate beside.")
@click.option("--epochs", type=int, help="KD pre-training epochs on the small sets.")
@click.option("--full-epochs", type=int, help="KD pre-training epochs of the full-data baseline.")
@click.option("--knn-k", type=int, help="k of the kNN classifier (0 = no kNN).")
@click.option("--precise-bn/--no-precise-bn", default=None,
              help="Re-estimate batch-norm statistics on each pre-training set's images after "
              "pre-training (default: on); --no-precise-bn is the paper's protocol.")
@click.option("--baseline-lr", type=click.Choice(["init", "set", "tuned"]),
              help="lr of the subset baselines: distill.lr_init (default, the paper's comparison), "
              "the evaluated set's lr (how much of a gain is the lr alone), or each one's best "
              "among --lr-grid on the run's source.holdout images (the fair bar).")
@click.option("--lr-grid", help="Comma-separated lrs that --baseline-lr tuned chooses among "
              "(default: eval.lr_grid, 0.1,0.2,0.35,0.5,0.7,1.0).")
@click.option("--finetune-epochs", type=int, help="Also fine-tune for this many epochs.")
@click.option("--split", type=click.Choice(["test", "validation"]),
              help="Measure on test splits, or (for tuning) on the run's source.holdout images "
              "and a share of each other downstream set's train split.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Where results go (default: the run directory; required for a set folder).")
@click.option("--device", help="cpu, cuda, cuda:N.")
@click.option("--quiet", "-q", is_flag=True, help="Only warnings and the final table.")
@user_errors
def evaluate(run_or_set: Path, baselines: str | None, downstream: str | None,
             fractions: str | None, seeds: int | None, archs: tuple[str, ...],
             compare: tuple[Path, ...], epochs: int | None, full_epochs: int | None,
             knn_k: int | None, precise_bn: bool | None, baseline_lr: str | None,
             lr_grid: str | None, finetune_epochs: int | None,
             split: str | None, out: Path | None, device: str | None, quiet: bool) -> None:
    """Pre-train fresh encoders on a distilled set and its baselines; probe downstream sets.

    Writes results.json, results.md (mean ± std over seeds) and results.png."""
    from ..evaluation.run import evaluate_run
    from ..pipeline import check_device, run_log, set_allocator

    setup_console(quiet)
    own = None
    if is_set_dir(run_or_set):
        if out is None:
            raise ConfigError("evaluating a set folder needs --out DIR (the folder itself is "
                              "checksummed and stays untouched)")
        own = read_set(run_or_set)
        cfg = RunConfig.from_dict(own.metadata["config"])
        cfg.eval.baselines = ["none"]
    elif (run_or_set / CONFIG_FILE).is_file():
        cfg = RunConfig.from_yaml(run_or_set / CONFIG_FILE)
    else:
        raise ConfigError(f"{run_or_set} is neither a run directory (config.yaml) nor a set folder")
    for key, value in _overrides(baselines, downstream, fractions, seeds, epochs, full_epochs,
                                 knn_k, finetune_epochs, split, precise_bn, baseline_lr,
                                 lr_grid).items():
        setattr(cfg.eval, key, value)
    if archs:
        models = [parse_arch(a, cfg.student) for a in archs]
        cfg.eval.model, cfg.eval.extra_models = models[0], models[1:]
    if device:
        cfg.device = device
    cfg.validate()
    check_device(cfg.device)
    set_allocator(cfg)
    init_from_env(cfg.device)  # under torchrun: the jobs are spread over the ranks
    setup_console(quiet)
    # A run is read in place (its teacher, reps, init); results go to --out when given.
    ctx = RunContext(cfg, run_or_set if own is None else out,
                     progress=not quiet and sys.stderr.isatty() and is_main())
    out_dir = out or run_or_set
    with run_log(ctx):
        result = evaluate_run(ctx, compare=compare, own=own, out=out_dir)
    if not is_main():
        return
    click.echo(format_table(result))
    click.echo(f"results: {out_dir / RESULTS_FILE}, {out_dir / TABLE_FILE}, "
               f"{out_dir / PLOT_FILE}")
