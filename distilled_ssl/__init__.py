"""distilled_ssl: distil a large unlabeled image set into a tiny synthetic one for SSL pre-training.

Implements MKDT (Matching Knowledge-Distillation Trajectories, Joshi et al., ICLR 2025):
teacher → target reps → expert trajectories → init → trajectory matching → distilled set →
evaluation against baselines (incl. KRR-ST, ``distill.method: krr_st``).
"""

from ._version import __version__
from .baselines import Baselines
from .config import ConfigError, RunConfig, list_presets, load_preset
from .context import RunContext
from .data import DataNotFoundError, ImageSet, load_source
from .dataset import DistilledDataset
from .distill import run_distill
from .downstream import load_downstream
from .evaluate import (
                       PretrainSet,
                       downstream_metrics,
                       knn_accuracy,
                       pretrain_kd,
                       probe_accuracy,
                       teacher_fidelity,
)
from .experts import run_experts
from .hub import push_to_hub
from .initial_set import run_init
from .io import ArtifactError
from .losses import barlow_twins_loss, kd_loss
from .matching import match_adjoint, match_unrolled
from .models import FlatParams, build_model, list_models
from .pipeline import STAGES, prepare_run, run_pipeline
from .probe import linear_probe
from .report import evaluate_run, format_table
from .targets import run_targets
from .teacher import load_teacher, run_teacher

__all__ = [
    "STAGES",
    "ArtifactError",
    "Baselines",
    "ConfigError",
    "DataNotFoundError",
    "DistilledDataset",
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
    "run_distill",
    "run_experts",
    "run_init",
    "run_pipeline",
    "run_targets",
    "run_teacher",
    "teacher_fidelity",
]
