"""A user's teacher weights as a state dict: safetensors, or a ``.pth`` / ``.ckpt`` read safely.

``.pth`` / ``.pt`` / ``.ckpt`` / ``.bin`` files are read only with ``torch.load(weights_only=True)``,
PyTorch's restricted unpickler: tensors, dicts, lists and numbers, nothing that can run code. A
checkpoint that also pickles Python objects (a Lightning ``argparse.Namespace``, a custom class) is
refused with :class:`CheckpointRefusedError`; a full ``torch.load`` would execute whatever the file
asks for, so the library never does one.

Checkpoints of SSL libraries nest the encoder: ``{"state_dict": {"backbone.conv1.weight": ...,
"projector.0.weight": ...}}`` (solo-learn, Lightning), ``{"model": ...}``, DDP's ``module.``
prefix. :func:`map_keys` keeps and renames the encoder's keys.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import ArtifactError, CheckpointRefusedError
from ..io import load_tensors

__all__ = ["CHECKPOINT_SUFFIXES", "WEIGHT_SUFFIXES", "CheckpointRefusedError", "map_keys",
           "read_state_dict", "state_dict_sha256"]

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")  # read with torch.load(weights_only=True)
WEIGHT_SUFFIXES = (".safetensors", *CHECKPOINT_SUFFIXES)
_NESTED = ("state_dict", "model_state_dict", "model", "module")  # where checkpoints keep the weights


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file; a nested ``state_dict`` / ``model`` entry is unwrapped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ArtifactError(f"teacher weights {path} do not exist")
    if path.suffix == ".safetensors":
        return load_tensors(path)[0]
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise ArtifactError(f"{path}: teacher weights must be a {', '.join(WEIGHT_SUFFIXES)} file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if refused:
            raise CheckpointRefusedError(
                f"{path} pickles Python objects besides tensors ({refused.group(1)}), and checkpoints "
                "are only read with torch.load(weights_only=True): unpickling anything else runs code "
                "from the file. If you trust it, re-save its weights alone, e.g. "
                "torch.save(torch.load(f, weights_only=False)['state_dict'], 'weights.pth'), "
                "or as .safetensors") from exc
        raise ArtifactError(f"{path} is not a readable PyTorch checkpoint "
                            f"({exc.__class__.__name__})") from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ArtifactError(f"{path} is not a readable PyTorch checkpoint ({exc})") from exc
    return _tensors(obj, path)


def _tensors(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in _NESTED:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise ArtifactError(f"{path} holds no state dict (a mapping of names to tensors)")


def map_keys(state: Mapping[str, torch.Tensor], key_map: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Keep and rename the keys that start with a ``key_map`` prefix (first match wins); drop the rest.

    ``{"backbone.": ""}`` takes a solo-learn encoder out of its checkpoint (its ``projector.`` and
    ``classifier.`` keys are dropped); an empty map keeps every key as it is."""
    if not key_map:
        return dict(state)
    out = {}
    for key, value in state.items():
        for old, new in key_map.items():
            if key.startswith(old):
                out[new + key[len(old):]] = value
                break
    if not out:
        raise ArtifactError(f"teacher.key_map {dict(key_map)} matches none of the checkpoint's keys; "
                            f"they start with {key_prefixes(state)}")
    return out


def key_prefixes(state: Mapping[str, torch.Tensor], top: int = 6) -> list[str]:
    """The most common first name components, e.g. ``['backbone.', 'projector.']`` (for messages)."""
    counts = Counter(k.split(".", 1)[0] + "." for k in state)
    return [p for p, _ in counts.most_common(top)]


def state_dict_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """A fingerprint of weights that have no file of their own (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
