"""The one owner of file names: what a run directory and a set folder hold.

A run directory (``--out``)::

    config.yaml  run.log                     the resolved config and the log of every stage
    teacher.safetensors                      stage 1 (teacher.partial.safetensors while training)
    targets.safetensors                      stage 2
    experts/expert_NNNNN.safetensors         stage 3 (.partial.safetensors / .lock while training)
    experts-ARCH/expert_NNNNN.safetensors    stage 3, each of experts.extra_students (ARCH: its tag)
    init.safetensors                         stage 4
    distilled.safetensors  distilled.png     stage 5 (distill_state.safetensors: its resumable state;
    curve.png                                its validation curve, with distill.eval_every)
    results.json  results.md  results.png    stage 6, the evaluation

A set folder (what is pushed to the Hub) holds ``distilled.safetensors`` and the files below.
"""

from __future__ import annotations

# ------------------------------------------------------------------------------ run directory
CONFIG_FILE = "config.yaml"
LOG_FILE = "run.log"
TEACHER_FILE = "teacher.safetensors"
TEACHER_PARTIAL_FILE = "teacher.partial.safetensors"
TARGETS_FILE = "targets.safetensors"
EXPERTS_DIR = "experts"
EXPERT_PATTERN = "expert_{:05d}.safetensors"
EXTRA_EXPERTS_PATTERN = "experts-{}"  # experts.extra_students: one folder per architecture tag
INIT_FILE = "init.safetensors"
DISTILLED_FILE = "distilled.safetensors"
STATE_FILE = "distill_state.safetensors"
GRID_FILE = "distilled.png"
CURVE_FILE = "curve.png"
RESULTS_FILE = "results.json"
TABLE_FILE = "results.md"
PLOT_FILE = "results.png"

# ------------------------------------------------------------------------------ set folder
CARD_FILE = "README.md"
INFO_FILE = "_info.json"
MANIFEST_FILE = "checksums.sha256"
PICTURE_FILE = "samples.png"
SHARD_DIR = "data"
SHARD_PATTERN = "train-{:05d}.tar"
