"""distilled_ssl: distil a large unlabeled image set into a tiny synthetic one for SSL pre-training.

Implements MKDT (Matching Knowledge-Distillation Trajectories, Joshi et al., ICLR 2025):
teacher → target reps → expert trajectories → init → trajectory matching → distilled set →
evaluation against baselines (incl. KRR-ST, ``distill.method: krr_st``).

The public names below are imported lazily (PEP 562, as huggingface_hub does): ``from distilled_ssl
import DistilledDataset`` loads the set reader and none of the training stages.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

# public name → the module (below distilled_ssl) that defines it
_LAZY: dict[str, str] = {
    "ArtifactError": "errors",
    "ConfigError": "errors",
    "DataNotFoundError": "errors",
    "DistilledSSLError": "errors",
    "RunConfig": "config",
    "list_presets": "config",
    "load_preset": "config",
    "FlatParams": "models.encoders",
    "build_model": "models.encoders",
    "list_models": "models.encoders",
    "barlow_twins_loss": "models.losses",
    "kd_loss": "models.losses",
    "linear_probe": "models.probe",
    "ImageSet": "data.sources",
    "load_source": "data.sources",
    "load_downstream": "data.downstream",
    "RunContext": "stages.context",
    "run_teacher": "stages.teacher",
    "load_teacher": "stages.teacher",
    "run_targets": "stages.targets",
    "run_experts": "stages.experts",
    "run_init": "stages.init",
    "run_distill": "stages.distill",
    "match_adjoint": "stages.distill.matching",
    "match_unrolled": "stages.distill.matching",
    "DistilledDataset": "sets.dataset",
    "push_to_hub": "sets.hub",
    "write_set": "sets.artifact",
    "format_table": "sets.results",
    "PretrainSet": "models.pretrain",
    "downstream_metrics": "evaluation.protocol",
    "knn_accuracy": "evaluation.protocol",
    "pretrain_kd": "models.pretrain",
    "reestimate_bn_stats": "models.bn_stats",
    "probe_accuracy": "evaluation.protocol",
    "teacher_fidelity": "evaluation.protocol",
    "Baselines": "evaluation.baselines",
    "evaluate_run": "evaluation.run",
    "STAGES": "pipeline",
    "prepare_run": "pipeline",
    "run_pipeline": "pipeline",
}

__all__ = [
    "STAGES",
    "ArtifactError",
    "Baselines",
    "ConfigError",
    "DataNotFoundError",
    "DistilledDataset",
    "DistilledSSLError",
    "FlatParams",
    "ImageSet",
    "PretrainSet",
    "RunConfig",
    "RunContext",
    "__version__",
    "barlow_twins_loss",
    "build_model",
    "downstream_metrics",
    "evaluate_run",
    "format_table",
    "kd_loss",
    "knn_accuracy",
    "linear_probe",
    "list_models",
    "list_presets",
    "load_downstream",
    "load_preset",
    "load_source",
    "load_teacher",
    "match_adjoint",
    "match_unrolled",
    "prepare_run",
    "pretrain_kd",
    "probe_accuracy",
    "push_to_hub",
    "reestimate_bn_stats",
    "run_distill",
    "run_experts",
    "run_init",
    "run_pipeline",
    "run_targets",
    "run_teacher",
    "teacher_fidelity",
    "write_set",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .config import RunConfig, list_presets, load_preset
    from .data.downstream import load_downstream
    from .data.sources import ImageSet, load_source
    from .errors import ArtifactError, ConfigError, DataNotFoundError, DistilledSSLError
    from .evaluation.baselines import Baselines
    from .evaluation.protocol import downstream_metrics, knn_accuracy, probe_accuracy, teacher_fidelity
    from .evaluation.run import evaluate_run
    from .models.bn_stats import reestimate_bn_stats
    from .models.encoders import FlatParams, build_model, list_models
    from .models.losses import barlow_twins_loss, kd_loss
    from .models.pretrain import PretrainSet, pretrain_kd
    from .models.probe import linear_probe
    from .pipeline import STAGES, prepare_run, run_pipeline
    from .sets.artifact import write_set
    from .sets.dataset import DistilledDataset
    from .sets.hub import push_to_hub
    from .sets.results import format_table
    from .stages.context import RunContext
    from .stages.distill import run_distill
    from .stages.distill.matching import match_adjoint, match_unrolled
    from .stages.experts import run_experts
    from .stages.init import run_init
    from .stages.targets import run_targets
    from .stages.teacher import load_teacher, run_teacher
