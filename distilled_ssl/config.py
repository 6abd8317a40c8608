"""Run configuration: typed dataclasses, YAML round trip, presets and ``a.b=c`` overrides.

One :class:`RunConfig` describes a whole MKDT run (MKDT.md stages 1-5). Every field has the
paper's default unless a preset says otherwise; :meth:`RunConfig.validate` turns bad values into
a :class:`ConfigError` that names the field and what to do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .registry import BASELINES, DISTILL_METHODS, MATCHERS, MODELS, SOURCES, TEACHER_METHODS

__all__ = ["ConfigError", "RunConfig", "list_presets", "load_preset"]


@dataclass
class SourceConfig:
    """Where the unlabeled source images come from (labels are used only for reporting)."""

    name: str = "fashion-mnist"  # a registered name, "imagefolder:PATH" or "npz:PATH"
    root: str | None = None  # dataset root; None = the library's search path
    download: bool = False  # let torchvision download when the data is missing
    subset: int | None = None  # use a seeded random subset of this many training images
    holdout: int = 0  # hold out this many (seeded) training images as a validation split, unseen
    # by every stage; `eval.split: validation` measures on them (tune there, never on test)


@dataclass
class ModelConfig:
    """An architecture from the model registry (:func:`distilled_ssl.models.encoders.build_model`)."""

    arch: str = "convnet"
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``'resnet10(width=0.125)'``: the architecture and its kwargs (sorted), as results tables and
        logs name an encoder; the evaluation also seeds each encoder's init by it."""
        return f"{self.arch}(" + ",".join(f"{k}={v}" for k, v in sorted(self.kwargs.items())) + ")"


@dataclass
class TeacherInputConfig:
    """Overrides of what a loaded teacher expects (None = what the teacher declares)."""

    channels: int | None = None
    size: int | None = None  # square images of this side
    mean: list[float] | None = None  # per channel, on pixels in [0, 1]
    std: list[float] | None = None
    layer: str | None = None  # the module whose (pooled) output is the representation


@dataclass
class TeacherConfig:
    """Stage 1: train an SSL teacher (Barlow Twins or SimCLR) or load one (README "Use your own
    teacher")."""

    mode: str = "train"  # "train" | "load"
    method: str = "barlow_twins"  # mode=train: "barlow_twins" | "simclr"
    model: ModelConfig = field(default_factory=lambda: ModelConfig("resnet18", {}))
    weights: str | None = None  # mode=load: a teacher spec: "builtin:NAME", a .safetensors/.pth/.ckpt
    # file (a teacher file, or a state dict for teacher.model), "hf:ORG/REPO[/FILE][@REV]",
    # "timm:MODEL", "torchvision:MODEL" or "package.module:function" (your own code)
    checkpoint: str | None = None  # weights file for timm:/torchvision:/module specs
    key_map: dict[str, str] = field(default_factory=dict)  # checkpoint key prefix → replacement;
    # keys that match no prefix are dropped (e.g. {"backbone.": ""} for solo-learn)
    input: TeacherInputConfig | None = None  # override the loaded teacher's declared input
    epochs: int = 100
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-5
    warmup_epochs: int = 2
    projector: list[int] = field(default_factory=lambda: [2048, 2048, 2048])
    lambda_offdiag: float = 5e-3  # Barlow Twins
    temperature: float = 0.5  # SimCLR's NT-Xent
    probe: bool = True  # report a linear-probe accuracy on the source test split


@dataclass
class TargetsConfig:
    """Stage 2: teacher representations of every source image."""

    batch_size: int = 512


@dataclass
class ExpertsConfig:
    """Stage 3: knowledge-distillation expert trajectories."""

    num_experts: int = 100
    epochs: int = 20
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    checkpoint_every_steps: int | None = None  # None = one checkpoint per epoch
    # Cross-architecture matching: more student architectures whose experts are trained too
    # (num_experts each, in experts-<arch>/); stage 5 (mkdt) matches them in turn with the student's.
    extra_students: list[ModelConfig] = field(default_factory=list)


@dataclass
class InitConfig:
    """Stage 4: which real images start the synthetic set."""

    method: str = "high_loss"  # "high_loss" | "random" | "kmeans" (representative, label-free)
    fraction: float = 0.02  # of the source set; ignored when num_images is set
    num_images: int | None = None
    class_balanced: bool = False  # needs labels
    loss_epoch: float = 1.0  # expert checkpoint whose loss ranks the examples


@dataclass
class KrrStConfig:
    """Stage 5 with ``distill.method: krr_st`` (Lee et al., ICLR 2024; MKDT.md, last section)."""

    pool_size: int = 10  # models in the pool (the student architecture)
    real_batch: int = 1024  # real images per outer step (teacher reps as regression targets)
    lr: float = 1e-3  # AdamW on images and target reps, decayed linearly to 0
    weight_decay: float = 0.0  # AdamW weight decay on images and target reps
    ridge: float = 1e-6  # lambda = ridge * trace(K_ss)
    model_lr: float = 0.1  # each pool model's SGD step on MSE(model(X_syn), Y_syn)
    model_momentum: float = 0.9
    model_weight_decay: float = 1e-3
    model_steps: int = 1000  # a pool model is re-initialised after this many SGD steps


@dataclass
class DistillConfig:
    """Stage 5: trajectory matching (MKDT), the KRR-ST baseline (``method: krr_st``), or the
    set optimised for a KD training's outcome (``method: fidelity``, stages/distill/objectives.py)."""

    method: str = "mkdt"  # "mkdt" | "krr_st" | "fidelity"
    iterations: int = 5000
    syn_steps: int = 40
    expert_epochs: float = 2.0  # matched span, in epochs of expert training
    max_start_epoch: float = 2.0  # start checkpoints are drawn from [min_start_epoch, max_start_epoch)
    min_start_epoch: float = 0.0
    # Difficulty-aligned sampling (DATM): the window's upper bound grows linearly from
    # max_start_epoch to max_start_epoch_end over the first start_window_iterations iterations
    max_start_epoch_end: float | None = None  # None = a fixed window
    start_window_iterations: int = 0
    batch_syn: int = 256
    lr_img: float = 1e3
    lr_targets: float = 1.0
    lr_lr: float = 1e-4
    lr_init: float = 0.1
    momentum: float = 0.5
    clip_grad: float | None = None  # clip each meta-gradient tensor to this norm
    mode: str = "adjoint"  # "adjoint" (exact, memory constant in syn_steps) | "unrolled"
    checkpoint_every: int = 50
    log_every: int = 10
    # Keeping the set a good stand-in for real data (README "Distillation quality").
    clamp: bool = False  # keep image pixels in [0, 1] after every update
    smooth: float = 0.0  # each iteration, a diffusion step of this size (0-0.25) on what
    # distillation changed in the images (a smoothness prior on the change)
    image_optimizer: str = "sgd"  # "sgd" (momentum) | "adam" (lr_img: a step in normalised units)
    targets_anchor: float = 0.0  # each iteration, move target reps this fraction of the way to the
    # teacher's reps of the current images (0 = free, 1 = relabel by the teacher)
    eval_every: int = 0  # score a snapshot on the source.holdout images every N iterations (0 = off)
    eval_seeds: int = 1  # encoder inits each score averages (one seed's score is noisy: README)
    eval_lr: float = 0.0  # pre-train each snapshot at this lr to score it (0 = the snapshot's learned
    # lr; with lr_grid, a grid value scores snapshots near the lr the set is stored with)
    keep: str = "last"  # "last" | "best": keep the snapshot with the best held-out score ...
    keep_metric: str = "fidelity_r2"  # ... of this metric: "fidelity_r2" | "probe" (labelled sources)
    patience: int = 0  # keep: best: stop once this many scores in a row are below the best so far
    # (0 = run every iteration; like iterations, not in the fingerprint: raise it to carry on)
    lr_grid: list[float] = field(default_factory=list)  # after matching, score the final set at
    # each of these lrs (and its learned one) on the held-out images and store the best-scoring lr
    # ([] = the learned lr; not in the fingerprint: a new grid re-chooses without re-matching)
    samples_per_iteration: int = 1  # MKDT: average the meta-gradients of this many trajectory
    # samples per iteration (split over torchrun ranks; the result is the same for any number)
    precision: str = "fp32"  # "fp32" (exact) | "bf16": the inner steps under bfloat16 autocast
    # (fp32 master copies of images, targets, lr and parameters; faster on AMX CPUs and GPUs)
    keep_graphs: int = 0  # adjoint mode: keep the graphs of the last N inner steps from the
    # forward sweep instead of recomputing them (memory for time; same result)
    compile: bool = False  # adjoint mode: each inner step's computations as torch.compile graphs
    # (same numbers up to float rounding, faster; the first iteration compiles; needs a C++ compiler on CPU)
    cuda_graphs: bool = False  # with compile, on CUDA: replay each compiled step as a CUDA graph
    # (torch.compile mode "reduce-overhead": no per-kernel launch cost; same numbers)
    batch_samples: bool = False  # with compile and samples_per_iteration K > 1: walk this rank's K
    # trajectory samples together, each inner step one torch.func.vmap call over the K students
    # (larger kernels for a GPU; the same gradients up to float rounding; plain SGD inner steps)
    real_batch: int = 512  # method fidelity / match_space outputs: real training images per sample
    match_space: str = "params"  # mkdt: match the expert's end point in parameter space (the paper) or
    # "outputs": the student's outputs on real_batch real images against the expert's end point's
    # (normalised by the span's own change of outputs; any architecture, no parameter coordinates)
    inner_momentum: float = 0.0  # the inner steps as heavy-ball SGD with this momentum (the evaluation
    # trains with 0.9); 0 = plain SGD, the paper's inner loop. Exact gradients in every mode
    seed: int | None = None  # re-seed the loop's own draws (trajectory samples, expert order, fresh
    # students, real batches) for a replicate run on the same teacher, experts and init (None: the run seed)
    krr_st: KrrStConfig = field(default_factory=KrrStConfig)

    @property
    def last_start_epoch(self) -> float:
        """The start window's largest upper bound (what the experts must cover, with the span)."""
        return max(self.max_start_epoch, self.max_start_epoch_end or 0.0)

    def start_window(self, iteration: int) -> tuple[float, float]:
        """The start epochs sampled at ``iteration``: ``[low, high)``."""
        high = self.max_start_epoch
        if self.max_start_epoch_end is not None:
            frac = min(1.0, iteration / self.start_window_iterations)
            high += (self.max_start_epoch_end - self.max_start_epoch) * frac
        return self.min_start_epoch, high


@dataclass
class EvalConfig:
    """Stage 6 (:mod:`distilled_ssl.evaluation`): pre-train fresh encoders on the distilled set and
    on baselines, then measure teacher fidelity, linear probes and kNN on downstream sets."""

    enabled: bool = True  # run the evaluation at the end of `distilled-ssl run` / `demo`
    epochs: int = 20  # KD pre-training epochs on a distilled set or a subset of its size
    full_epochs: int = 2  # KD pre-training epochs of the full-data baseline
    batch_size: int = 256
    # after KD pre-training, re-estimate a batch-norm encoder's running statistics on the set's own
    # images (models/bn_stats.py); false = the paper's protocol (the EMA statistics as trained)
    precise_bn: bool = True
    # the lr of the random / init / high-loss baselines: "init" = distill.lr_init (the paper's
    # comparison), "set" = the evaluated set's learned lr (how much of a gain is the lr alone)
    # "tuned" = each subset baseline's lr chosen on the held-out images among eval.lr_grid (the
    # fair bar: what a user who tunes the lr of a random subset would get; needs source.holdout)
    baseline_lr: str = "init"
    lr_grid: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.35, 0.5, 0.7, 1.0])
    model: ModelConfig | None = None  # the evaluation encoder; None = the distillation student
    extra_models: list[ModelConfig] = field(default_factory=list)  # more encoders (cross-arch)
    baselines: list[str] = field(default_factory=lambda: ["none", "random", "init"])
    downstream: list[str] = field(default_factory=list)  # [] = the source; "name?" = if present
    label_fractions: list[float] = field(default_factory=lambda: [0.01])
    seeds: int = 1  # a seed fixes the pre-training init, the random subset and the label subsets
    knn_k: int = 20  # 0 = no kNN
    finetune_epochs: int = 0  # 0 = no fine-tuning
    split: str = "test"  # "test" | "validation": measure on held-out train images (source.holdout)
    validation_fraction: float = 0.2  # split=validation: share of other downstream sets' train split


@dataclass
class RunConfig:
    """A whole MKDT run."""

    seed: int = 0
    device: str = "cpu"
    threads: int | None = None  # torch intra-op threads; None = torch's default
    # CPU runs: glibc keeps freed memory for reuse (no page faults per inner step; allocator.py)
    reuse_freed_memory: bool = True
    source: SourceConfig = field(default_factory=SourceConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    student: ModelConfig = field(
        default_factory=lambda: ModelConfig("convnet", {"depth": 3, "width": 128})
    )
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    init: InitConfig = field(default_factory=InitConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        return _build(cls, data, "")

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping at top level")
        return cls.from_dict(data)

    def override(self, assignments: list[str]) -> RunConfig:
        """Return a copy with ``section.key=value`` assignments applied (values parsed as YAML)."""
        data = self.to_dict()
        for item in assignments:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like section.key=value")
            dotted, raw = item.split("=", 1)
            keys = dotted.strip().split(".")
            node = data
            for i, key in enumerate(keys[:-1]):
                if not isinstance(node, dict) or key not in node:
                    raise ConfigError(f"override {item!r}: unknown key {'.'.join(keys[: i + 1])!r}")
                if node[key] is None:
                    node[key] = {}
                node = node[key]
            if not isinstance(node, dict) or (keys[-1] not in node and not _is_free_mapping(keys)):
                raise ConfigError(f"override {item!r}: unknown key {dotted!r}")
            try:
                node[keys[-1]] = yaml.safe_load(raw)
            except yaml.YAMLError as exc:
                raise ConfigError(f"override {item!r}: cannot parse value: {exc}") from exc
        return RunConfig.from_dict(data)

    @property
    def needs_experts(self) -> bool:
        """Whether a run trains experts: MKDT matches their trajectories, the high-loss init ranks
        images by their losses; KRR-ST and ``method: fidelity`` from a random or k-means init need
        none."""
        return self.distill.method == "mkdt" or self.init.method == "high_loss"

    # ------------------------------------------------------------------ checks
    def _needs_scores(self) -> list[str]:
        """The overrides that turn off what needs validation scores (keep: best, a patience, the
        lr they pre-train at)."""
        return ((["distill.keep=last"] if self.distill.keep == "best" else [])
                + (["distill.patience=0"] if self.distill.patience else [])
                + (["distill.eval_lr=0"] if self.distill.eval_lr else []))

    def _needs_holdout(self) -> list[str]:
        """The overrides that turn off everything that scores on held-out images."""
        return ((["distill.eval_every=0", *self._needs_scores()] if self.distill.eval_every else [])
                + (["distill.lr_grid=[]"] if self.distill.lr_grid else [])
                + (["eval.baseline_lr=init"] if self.eval.baseline_lr == "tuned" else []))

    def validate(self) -> RunConfig:
        """Check ranges and cross-field constraints; return self for chaining."""
        _positive(self, "experts.num_experts", "experts.epochs", "experts.batch_size",
                  "targets.batch_size", "distill.syn_steps", "distill.batch_syn",
                  "distill.log_every", "distill.checkpoint_every", "distill.samples_per_iteration",
                  "teacher.batch_size",
                  "eval.epochs", "eval.batch_size")
        _non_negative(self, "distill.iterations", "teacher.epochs", "experts.lr",
                      "experts.momentum", "experts.weight_decay", "distill.lr_img",
                      "distill.lr_targets", "distill.lr_lr", "distill.momentum")
        _choice(self, "teacher.mode", {"train", "load"})
        TEACHER_METHODS.check(self.teacher.method, "teacher.method")
        _positive(self, "teacher.temperature")
        self._validate_teacher_load()
        _choice(self, "init.method", {"high_loss", "random", "kmeans"})
        _choice(self, "distill.mode", set(MATCHERS))
        _choice(self, "distill.method", set(DISTILL_METHODS))
        _choice(self, "distill.image_optimizer", {"sgd", "adam"})
        _choice(self, "distill.keep", {"last", "best"})
        _choice(self, "distill.keep_metric", {"fidelity_r2", "probe"})
        _choice(self, "distill.precision", {"fp32", "bf16"})
        _non_negative(self, "distill.keep_graphs")
        if self.distill.compile and self.distill.mode != "adjoint":
            raise ConfigError("distill.compile needs distill.mode=adjoint")
        if self.distill.cuda_graphs and not self.distill.compile:
            raise ConfigError("distill.cuda_graphs needs distill.compile=true (it replays the compiled "
                              "steps)")
        if self.distill.cuda_graphs and not self.device.startswith("cuda"):
            raise ConfigError("distill.cuda_graphs needs a CUDA device (set device=cuda, or "
                              "distill.cuda_graphs=false)")
        if self.distill.batch_samples:
            if not self.distill.compile:
                raise ConfigError("distill.batch_samples needs distill.compile=true (the batched walk is "
                                  "the compiled one, vmapped); set it, or distill.batch_samples=false")
            if self.distill.samples_per_iteration < 2:
                raise ConfigError("distill.batch_samples batches the samples of an iteration: set distill."
                                  "samples_per_iteration to 2 or more, or distill.batch_samples=false")
            if self.distill.inner_momentum:
                raise ConfigError("distill.batch_samples walks plain SGD inner steps only: set "
                                  "distill.inner_momentum=0, or distill.batch_samples=false")
        if self.distill.compile and self.distill.keep_graphs:
            raise ConfigError("distill.keep_graphs has no effect with distill.compile (the compiled "
                              "walk recomputes every step); set one of them")
        _non_negative(self, "distill.eval_every")
        _positive(self, "distill.eval_seeds")
        _non_negative(self, "distill.eval_lr")
        if not 0 <= self.distill.inner_momentum < 1:
            raise ConfigError(f"distill.inner_momentum must be in [0, 1), got {self.distill.inner_momentum}")
        _choice(self, "distill.match_space", {"params", "outputs"})
        if self.distill.match_space != "params" and self.distill.method != "mkdt":
            raise ConfigError(f"distill.match_space is how method mkdt matches an expert's end point; "
                              f"distill.method={self.distill.method} matches no experts: remove it")
        if self.distill.inner_momentum and self.distill.method == "krr_st":
            raise ConfigError("distill.inner_momentum is for the unrolled inner loop of methods mkdt and "
                              "fidelity; KRR-ST has none: remove it")
        if not 0 <= self.distill.smooth <= 0.25:
            raise ConfigError(f"distill.smooth must be in [0, 0.25] (a stable diffusion step), got "
                              f"{self.distill.smooth}")
        if not 0 <= self.distill.targets_anchor <= 1:
            raise ConfigError(f"distill.targets_anchor must be in [0, 1], got {self.distill.targets_anchor}")
        _non_negative(self, "distill.patience")
        if self.distill.eval_every == 0 and self._needs_scores():
            off = self._needs_scores()
            what = " and ".join(o.split("=")[0] for o in off)
            raise ConfigError(f"{what} need{'s' if len(off) == 1 else ''} validation scores: set "
                              "distill.eval_every > 0 (how often to score), or turn them off with "
                              + " ".join(off))
        if self.distill.patience and self.distill.keep != "best":
            raise ConfigError("distill.patience stops a run that keeps its best snapshot: set "
                              "distill.keep=best, or distill.patience=0")
        _choice(self, "eval.baseline_lr", {"init", "set", "tuned"})
        if self.source.holdout == 0 and self._needs_holdout():
            off = self._needs_holdout()
            what = ", ".join(dict.fromkeys(o.split("=")[0] for o in off if "keep" not in o
                                           and "patience" not in o))
            raise ConfigError(f"{what} score{'s' if ',' not in what else ''} on held-out training "
                              f"images: set source.holdout (e.g. 5000), or turn that off with "
                              f"{' '.join(off)}")
        for name, grid in (("distill.lr_grid", self.distill.lr_grid), ("eval.lr_grid", self.eval.lr_grid)):
            if not isinstance(grid, list) or not all(
                    isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in grid):
                raise ConfigError(f"{name} must be a list of learning rates > 0 (e.g. [0.25, 0.5, 1.0]), "
                                  f"got {grid!r}")
        if self.eval.baseline_lr == "tuned" and not self.eval.lr_grid:
            raise ConfigError("eval.baseline_lr=tuned chooses each baseline's lr among eval.lr_grid: give "
                              "it some (e.g. [0.1, 0.3, 0.5, 1.0]), or set eval.baseline_lr=init")
        _choice(self, "eval.split", {"test", "validation"})
        _positive(self, "distill.real_batch")
        _positive(self, "distill.krr_st.pool_size", "distill.krr_st.real_batch",
                  "distill.krr_st.model_steps", "distill.krr_st.lr", "distill.krr_st.ridge",
                  "eval.seeds", "eval.full_epochs")
        _non_negative(self, "distill.krr_st.weight_decay", "distill.krr_st.model_lr",
                      "distill.krr_st.model_momentum", "distill.krr_st.model_weight_decay",
                      "eval.knn_k", "eval.finetune_epochs")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1 or null (torch's default), got {self.threads}")
        if not self.teacher.projector or not all(d >= 1 for d in self.teacher.projector):
            raise ConfigError("teacher.projector must be a non-empty list of layer widths >= 1, got "
                              f"{self.teacher.projector}")
        if self.device != "cpu" and not self.device.startswith(("cuda", "mps")):
            raise ConfigError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'mps', got {self.device!r}")
        if self.teacher.mode == "load" and not self.teacher.weights:
            raise ConfigError("teacher.mode=load needs teacher.weights (a teacher spec: 'builtin:NAME', "
                              "a weights file, 'hf:ORG/REPO', 'timm:MODEL', ...); or set "
                              "teacher.mode=train")
        if self.distill.lr_init <= 0:
            raise ConfigError("distill.lr_init must be > 0")
        if self.distill.expert_epochs <= 0:
            raise ConfigError("distill.expert_epochs must be > 0")
        if self.distill.max_start_epoch < 0:
            raise ConfigError("distill.max_start_epoch must be >= 0")
        if self.distill.clip_grad is not None and self.distill.clip_grad <= 0:
            raise ConfigError("distill.clip_grad must be > 0 or null")
        d = self.distill
        if not 0 <= d.min_start_epoch <= d.max_start_epoch:
            raise ConfigError("distill.min_start_epoch must be in [0, distill.max_start_epoch], got "
                              f"{d.min_start_epoch:g}")
        if d.max_start_epoch_end is not None:
            if d.max_start_epoch_end < d.max_start_epoch:
                raise ConfigError("distill.max_start_epoch_end must be >= distill.max_start_epoch (the "
                                  "start window only moves later)")
            if d.start_window_iterations < 1:
                raise ConfigError("distill.max_start_epoch_end needs distill.start_window_iterations >= 1 "
                                  "(how many iterations the window takes to reach it)")
        elif d.start_window_iterations:
            raise ConfigError("distill.start_window_iterations needs distill.max_start_epoch_end (where "
                              "the start window's upper bound ends)")
        needed = d.last_start_epoch + d.expert_epochs
        if self.experts.epochs < needed:
            raise ConfigError(
                f"experts.epochs={self.experts.epochs} is too short: distillation reads checkpoints "
                f"up to max_start_epoch(_end) + expert_epochs = {needed:g}; raise experts.epochs or "
                "lower distill.max_start_epoch(_end) / distill.expert_epochs")
        if self.init.method == "high_loss" and not 0 < self.init.loss_epoch <= self.experts.epochs:
            raise ConfigError("init.loss_epoch must be in (0, experts.epochs]")
        if self.init.num_images is None and not 0 < self.init.fraction < 1:
            raise ConfigError(f"init.fraction must be in (0, 1), got {self.init.fraction}")
        if self.init.num_images is not None and self.init.num_images < 1:
            raise ConfigError("init.num_images must be >= 1")
        if self.experts.checkpoint_every_steps is not None and self.experts.checkpoint_every_steps < 1:
            raise ConfigError("experts.checkpoint_every_steps must be >= 1 or null")
        if self.source.subset is not None and self.source.subset < 2:
            raise ConfigError("source.subset must be >= 2 or null")
        if self.source.holdout < 0:
            raise ConfigError(f"source.holdout must be >= 0, got {self.source.holdout}")
        if self.eval.split == "validation" and self.source.holdout == 0:
            raise ConfigError("eval.split=validation measures on held-out training images: set "
                              "source.holdout to how many (e.g. 5000), or use eval.split=test")
        if not 0 < self.eval.validation_fraction < 1:
            raise ConfigError("eval.validation_fraction must be in (0, 1), got "
                              f"{self.eval.validation_fraction}")
        if not self.eval.label_fractions or not all(0 < f <= 1 for f in self.eval.label_fractions):
            raise ConfigError(f"eval.label_fractions must be a non-empty list of numbers in (0, 1], "
                              f"got {self.eval.label_fractions}")
        for name in self.eval.baselines:
            BASELINES.check(name, "eval.baselines")
        SOURCES.check(self.source.name, "source.name")
        models = [("teacher.model", self.teacher.model), ("student", self.student)]
        if self.eval.model is not None:
            models.append(("eval.model", self.eval.model))
        models += [(f"eval.extra_models[{i}]", m) for i, m in enumerate(self.eval.extra_models)]
        models += [(f"experts.extra_students[{i}]", m) for i, m in enumerate(self.experts.extra_students)]
        self._validate_extra_students()
        for where, model in models:
            MODELS.check(model.arch, where)
        return self

    def _validate_extra_students(self) -> None:
        extra = self.experts.extra_students
        if not extra:
            return
        if self.distill.method != "mkdt":
            raise ConfigError(f"experts.extra_students are matched in turn by distill.method=mkdt; "
                              f"distill.method={self.distill.method} matches no experts: remove them")
        seen = [self.student, *extra]
        for i, m in enumerate(extra):
            if any(m.arch == o.arch and m.kwargs == o.kwargs for o in seen[:i + 1]):
                raise ConfigError(f"experts.extra_students[{i}] ({m.arch} {m.kwargs}) repeats the student "
                                  "or an earlier entry; list each architecture once")

    def _validate_teacher_load(self) -> None:
        tc = self.teacher
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in tc.key_map.items()):
            raise ConfigError(f"teacher.key_map maps key prefixes to replacements (strings), got "
                              f"{tc.key_map!r}")
        inp = tc.input
        if inp is None:
            return
        for name in ("channels", "size"):
            value = getattr(inp, name)
            if value is not None and value < 1:
                raise ConfigError(f"teacher.input.{name} must be >= 1, got {value}")
        for name in ("mean", "std"):
            values = getattr(inp, name)
            if values is not None and inp.channels is not None and len(values) != inp.channels:
                raise ConfigError(f"teacher.input.{name} needs {inp.channels} values (one per channel)")
        if inp.std is not None and min(inp.std) <= 0:
            raise ConfigError("teacher.input.std must be > 0")

    def hashed_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` without the fields added after runs were made while they are at their
        default, so fingerprints of older runs stay valid."""
        data = self.to_dict()
        for dotted, default in _HASHED_WHEN_SET.items():
            parent, key = dotted.rsplit(".", 1)
            node = _lookup(data, parent)
            if node.get(key) == default:
                del node[key]
        return data

    def section_hash(self, *sections: str) -> str:
        """A short fingerprint of some config sections (artifacts are reused only on a match)."""
        data = self.hashed_dict()
        blob = json.dumps({s: _lookup(data, s) for s in sections}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")

# Fields added after runs were made: left out of fingerprints while at their default.
_HASHED_WHEN_SET: dict[str, Any] = {
    "source.holdout": 0, "teacher.method": "barlow_twins", "teacher.checkpoint": None,
    "teacher.key_map": {}, "teacher.input": None, "teacher.temperature": 0.5,
    "distill.clamp": False, "distill.smooth": 0.0, "distill.image_optimizer": "sgd",
    "distill.targets_anchor": 0.0, "distill.eval_every": 0, "distill.keep": "last",
    "distill.samples_per_iteration": 1, "distill.eval_seeds": 1, "distill.precision": "fp32",
    "distill.keep_graphs": 0, "distill.compile": False, "distill.cuda_graphs": False,
    "distill.keep_metric": "fidelity_r2",
    "distill.patience": 0, "distill.lr_grid": [], "eval.lr_grid": [0.1, 0.2, 0.35, 0.5, 0.7, 1.0],
    "distill.min_start_epoch": 0.0, "distill.max_start_epoch_end": None,
    "distill.start_window_iterations": 0, "distill.eval_lr": 0.0, "distill.real_batch": 512,
    "distill.seed": None, "distill.inner_momentum": 0.0, "experts.extra_students": [],
    "distill.match_space": "params", "distill.batch_samples": False,
}


# ---------------------------------------------------------------------- presets
def list_presets() -> list[str]:
    """Names of the presets shipped with the package."""
    files = resources.files("distilled_ssl").joinpath("presets").iterdir()
    return sorted(p.name[: -len(".yaml")] for p in files if p.name.endswith(".yaml"))


def load_preset(name: str) -> RunConfig:
    """Load a shipped preset by name (see :func:`list_presets`)."""
    path = resources.files("distilled_ssl").joinpath("presets", f"{name}.yaml")
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(list_presets())}")
    data = yaml.safe_load(path.read_text()) or {}
    return RunConfig.from_dict(data)


# ---------------------------------------------------------------------- helpers
def _is_free_mapping(keys: list[str]) -> bool:
    """``model.kwargs.x=...`` may add keys that the defaults do not list."""
    return len(keys) >= 2 and keys[-2] == "kwargs"


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in {where or 'config'}; "
                          f"known: {sorted(known)}")
    kwargs = {}
    hints = _type_hints(cls)
    for name, value in data.items():
        path = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(hints[name], value, path)
    return cls(**kwargs)


def _type_hints(cls: type) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(cls)


def _coerce(hint: Any, value: Any, path: str) -> Any:
    import types
    import typing

    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, path)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        (arg,) = typing.get_args(hint)
        return [_coerce(arg, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads "3e4" (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{path} must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {value!r}")
        return value
    return value


def _lookup(data: dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for key in dotted.split("."):
        node = node[key]
    return node


def _get(cfg: RunConfig, dotted: str) -> Any:
    return _lookup(cfg.to_dict(), dotted)


def _positive(cfg: RunConfig, *names: str) -> None:
    for name in names:
        value = _get(cfg, name)
        if value is None or value <= 0:
            raise ConfigError(f"{name} must be > 0, got {value!r}")


def _non_negative(cfg: RunConfig, *names: str) -> None:
    for name in names:
        value = _get(cfg, name)
        if value is None or value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value!r}")


def _choice(cfg: RunConfig, name: str, allowed: set[str]) -> None:
    value = _get(cfg, name)
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {sorted(allowed)}, got {value!r}")
