"""Stage 2: the target reps are the teacher's features of every source image."""

from __future__ import annotations

import torch

from distilled_ssl.io import load_tensors
from distilled_ssl.stages.context import RunContext


def test_targets_are_teacher_features_of_every_image(finished_run: RunContext) -> None:
    from distilled_ssl.models.probe import extract
    from distilled_ssl.stages.teacher import load_teacher

    tensors, _meta = load_tensors(finished_run.path("targets.safetensors"))
    reps = tensors["target_reps"]
    assert reps.shape == (240, 4) and reps.dtype == torch.float32
    teacher, tmeta = load_teacher(finished_run.path("teacher.safetensors"))
    again = extract(teacher.features, finished_run.train_set.images[:7], tuple(tmeta["mean"]),
                    tuple(tmeta["std"]))
    torch.testing.assert_close(reps[:7], again)
