"""What every stage receives: the config, the run directory, the device, a logger, the source data."""

from __future__ import annotations

import hashlib
import logging
import zlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import RunConfig
from ..data.sources import ImageSet, load_source, seeded_subset
from ..distributed import local_rank, world_size
from ..errors import ConfigError, DeviceError
from ..layout import EXPERTS_DIR
from ..models.encoders import Encoder, build_model

LOGGER_NAME = "distilled_ssl"


@dataclass
class RunContext:
    """A run directory plus its resolved configuration.

    Stages read their inputs from and write their artifact into ``run_dir``; the source set is
    loaded once and shared by the stages that need it.
    """

    cfg: RunConfig
    run_dir: Path
    progress: bool = True
    log: logging.Logger = field(default_factory=lambda: logging.getLogger(LOGGER_NAME))
    experts_dir: str = EXPERTS_DIR  # where the experts of ``cfg.student`` are (see experts.student_views)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)

    @property
    def device(self) -> torch.device:
        """The configured device; under torchrun, ``cuda`` means this rank's GPU (``LOCAL_RANK``)."""
        dev = torch.device(self.cfg.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise DeviceError(f"device {self.cfg.device!r} asked for but CUDA is not available; "
                               "use --device cpu")
        if dev.type == "cuda" and dev.index is None and world_size() > 1:
            return torch.device("cuda", local_rank())
        return dev

    @cached_property
    def _source_split(self) -> tuple[ImageSet, ImageSet | None]:
        s = self.cfg.source
        data = load_source(s.name, train=True, root=s.root, download=s.download)
        if s.subset is not None and s.subset < len(data):
            data = data.subset(seeded_subset(len(data), s.subset, self.seed_for("source")))
        if s.holdout == 0:
            return data, None
        if s.holdout >= len(data):
            raise ConfigError(f"source.holdout={s.holdout} leaves no training images ({s.name} has "
                             f"{len(data)}); hold out fewer")
        # Seeded by the source alone (not the run seed): every run of a sweep validates on the
        # same images.
        held = seeded_subset(len(data), s.holdout,
                             zlib.crc32(f"holdout:{s.name}:{s.subset}".encode()) & 0x7FFFFFFF)
        kept = torch.ones(len(data), dtype=torch.bool)
        kept[held] = False
        return data.subset(kept.nonzero().flatten()), data.subset(held)

    @property
    def train_set(self) -> ImageSet:
        """The source training split every stage uses: a seeded subset when ``source.subset`` is
        set, without the ``source.holdout`` validation images."""
        return self._source_split[0]

    @property
    def validation_set(self) -> ImageSet | None:
        """The ``source.holdout`` training images no stage sees (None when holdout is 0)."""
        return self._source_split[1]

    @cached_property
    def test_set(self) -> ImageSet | None:
        """The source test split, or None when the source has none."""
        s = self.cfg.source
        try:
            data = load_source(s.name, train=False, root=s.root, download=s.download)
        except (FileNotFoundError, RuntimeError, ValueError) as exc:
            self.log.info("no test split for %s (%s); skipping test-set figures", s.name, exc)
            return None
        return ImageSet(data.name, data.images, data.labels, self.train_set.mean,
                        self.train_set.std, data.num_classes)

    @property
    def eval_set(self) -> ImageSet | None:
        """Where evaluation measures: the test split, or the validation images (``eval.split``)."""
        if self.cfg.eval.split == "validation":
            if self.validation_set is None:
                raise ConfigError("eval.split=validation needs source.holdout > 0")
            return self.validation_set
        return self.test_set

    def seed_for(self, *tags: Any) -> int:
        """A seed derived from the run seed and tags (e.g. ``("expert", 3)``), stable across runs."""
        key = ":".join(str(t) for t in (self.cfg.seed, *tags))
        return zlib.crc32(key.encode()) & 0x7FFFFFFF

    def generator(self, *tags: Any) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed_for(*tags))

    def bar(self, iterable: Any = None, **kwargs: Any) -> tqdm:
        return tqdm(iterable, disable=not self.progress, dynamic_ncols=True, leave=False, **kwargs)

    def path(self, name: str) -> Path:
        return self.run_dir / name


def student_for(ctx: RunContext, output_dim: int) -> Encoder:
    """The distillation student architecture, built for the source images (random init)."""
    c, h, _ = ctx.train_set.shape
    return build_model(ctx.cfg.student.arch, in_channels=c, image_size=h, output_dim=output_dim,
                       **ctx.cfg.student.kwargs)


def combine(*parts: str) -> str:
    """Chain fingerprints: a stage's fingerprint covers its config and its inputs' fingerprints."""
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
