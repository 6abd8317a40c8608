"""Teacher specs: open a teacher from wherever it lives; save and rebuild the run's teacher file.

``teacher.weights`` (with ``teacher.mode: load``) is one of (the kinds of ``registry.TEACHER_SOURCES``):

- ``builtin:NAME`` — a teacher shipped in the package;
- ``path/to/file.safetensors|.pth|.ckpt`` — a teacher file written by :func:`save_teacher`, or a
  state dict for ``teacher.model`` (``teacher.key_map`` picks and renames its keys);
- ``hf:ORG/REPO[/FILE][@REVISION]`` — the same, from a Hub model repo (``FILE`` defaults to
  ``model.safetensors``; pin ``@REVISION`` to a tag or commit; huggingface_hub's cache, offline once
  cached);
- ``timm:MODEL`` — a timm model, weights from ``teacher.checkpoint`` or else timm's own Hub
  integration (``pretrained=True``; ``timm:hf-hub:ORG/REPO`` works too);
- ``torchvision:MODEL`` — a torchvision model, weights from ``teacher.checkpoint``;
- ``package.module:function`` — the user's own code: ``function()`` returns an ``nn.Module`` that
  maps images to features (weights from ``teacher.checkpoint`` if given). It is imported and run.

Every teacher declares its input (:class:`~distilled_ssl.models.adapters.TeacherInput`);
``teacher.input`` overrides any part of it.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ArtifactError, ConfigError, HubError
from ..io import file_sha256, load_tensors, read_metadata, save_tensors
from ..registry import TEACHER_SOURCES
from .adapters import ModuleEncoder, TeacherEncoder, TeacherInput
from .checkpoints import WEIGHT_SUFFIXES, key_prefixes, map_keys, read_state_dict, state_dict_sha256
from .encoders import Encoder, build_model, seeded
from .mkdt_resnet import CIFAR10_MEAN, CIFAR10_STD

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "OpenedTeacher", "load_teacher", "open_teacher",
           "parse_spec", "resolve_weights", "save_teacher", "teacher_encoder", "weights_file"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HF_DEFAULT_FILE = "model.safetensors"
_CLASSIFIERS = ("fc.", "classifier.", "head.", "heads.")
_NAME = r"[A-Za-z_][\w.]*"


# ---------------------------------------------------------------------- specs and files
def parse_spec(spec: str) -> tuple[str, str]:
    """``"timm:resnet18"`` → ``("timm", "resnet18")``; kinds: the registered prefixes, ``path``,
    ``module``."""
    spec = spec.strip()
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in TEACHER_SOURCES:
        if not rest:
            raise ConfigError(f"teacher.weights {spec!r}: nothing after '{prefix}:'")
        return prefix, rest
    if Path(spec).suffix in WEIGHT_SUFFIXES or Path(spec).expanduser().is_file():
        return "path", spec
    if sep and re.fullmatch(_NAME, prefix) and re.fullmatch(_NAME, rest):
        return "module", spec
    raise ConfigError(f"teacher.weights {spec!r} is not a teacher spec: give one of "
                      f"{', '.join(TEACHER_SOURCES.names())}")


def _builtin(name: str) -> Path:
    weights = Path(str(resources.files("distilled_ssl").joinpath("weights")))
    path = weights / f"{name}.safetensors"
    if not path.is_file():
        shipped = sorted(p.name.removesuffix(".safetensors") for p in weights.glob("*.safetensors"))
        raise ArtifactError(f"no built-in teacher {name!r}; shipped: {shipped}")
    return path


def _local(spec: str) -> Path:
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ArtifactError(f"teacher weights {path} do not exist")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ArtifactError(f"{path}: teacher weights must be a {', '.join(WEIGHT_SUFFIXES)} file")
    return path


def hf_download(value: str) -> tuple[Path, str]:
    """``ORG/REPO[/FILE][@REVISION]`` → (the cached file, the commit it came from)."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    ref, _, revision = value.partition("@")
    parts = ref.split("/")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"teacher.weights 'hf:{value}' must look like hf:ORG/REPO[/FILE][@REVISION]")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:]) or HF_DEFAULT_FILE
    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    offline = bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in {
        "1", "ON", "YES", "TRUE"}
    try:
        path = Path(hf_hub_download(repo_id, filename, revision=revision or None, endpoint=endpoint,
                                    local_files_only=offline))
    except RevisionNotFoundError as exc:
        raise HubError(f"model repo {repo_id} has no revision {revision!r}") from exc
    except RepositoryNotFoundError as exc:
        raise HubError(f"model repo {repo_id} not found at {endpoint} (or it is private and your "
                       "token cannot read it)") from exc
    except EntryNotFoundError as exc:
        raise HubError(f"model repo {repo_id} has no file {filename!r} (name it: "
                       f"hf:{repo_id}/FILE)") from exc
    except LocalEntryNotFoundError as exc:
        raise HubError(f"{filename} of {repo_id} is not in the local cache and {endpoint} cannot be "
                       "reached (or HF_HUB_OFFLINE is set); download it once online") from exc
    except HfHubHTTPError as exc:
        raise HubError(f"the Hub refused to serve {repo_id}: {exc}") from exc
    commit = path.parent.name if path.parent.parent.name == "snapshots" else (revision or "main")
    return path, commit


def weights_file(spec: str, checkpoint: str | None = None) -> Path | None:
    """The file that holds a teacher's weights (downloaded for ``hf:``); None when timm or the
    user's function makes them."""
    kind, value = parse_spec(spec)
    if kind == "builtin":
        return _builtin(value)
    if kind == "hf":
        return hf_download(value)[0]
    if kind == "path":
        return _local(value)
    return _local(checkpoint) if checkpoint else None


def resolve_weights(spec: str) -> Path:
    """``builtin:NAME``, ``hf:…`` or a file path → the local weights file."""
    path = weights_file(spec)
    if path is None:
        raise ConfigError(f"teacher.weights {spec!r} names a model, not a weights file")
    return path


# ---------------------------------------------------------------------- building encoders
def _import_callable(target: str) -> Any:
    module, _, attr = target.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"teacher {target!r}: cannot import {attr!r} from {module!r} ({exc}); a "
                          f"teacher spec is one of {', '.join(TEACHER_SOURCES.names())}") from exc
    if not callable(fn):
        raise ConfigError(f"teacher {target!r} is not callable")
    return fn


def _timm() -> Any:
    try:
        import timm
    except ImportError as exc:
        raise ConfigError("timm: teachers need timm: pip install 'distilled-ssl[timm]'") from exc
    return timm


def _timm_model(name: str, *, pretrained: bool, **kwargs: Any) -> nn.Module:
    """A timm model without its classifier (``num_classes=0``: the pooled pre-logits feature)."""
    try:
        return _timm().create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
    except RuntimeError as exc:  # timm: unknown model, or no pretrained weights for it
        raise ConfigError(f"teacher timm:{name}: {exc}") from exc


def _wrap(net: object, inp: TeacherInput, where: str) -> Encoder:
    if isinstance(net, Encoder):
        return net
    if not isinstance(net, nn.Module):
        raise ConfigError(f"{where} returned {type(net).__name__}, not an nn.Module")
    return ModuleEncoder(net, inp)


def teacher_encoder(arch: str, kwargs: Mapping[str, Any], inp: TeacherInput, *,
                    pretrained: bool = False) -> Encoder:
    """A randomly initialised (or timm-pretrained) encoder of ``arch`` for ``inp`` images: a
    registered model, ``torchvision:NAME``, ``timm:NAME`` or ``module:package.module:function``."""
    if arch.startswith("timm:"):
        return ModuleEncoder(_timm_model(arch[5:], pretrained=pretrained, **kwargs), inp)
    if arch.startswith("module:"):
        with seeded(0):
            return _wrap(_import_callable(arch[7:])(**kwargs), inp, arch)
    return build_model(arch, in_channels=inp.channels, image_size=inp.size, **kwargs)


def _load_into(encoder: Encoder, state: dict[str, torch.Tensor], where: str,
               ignore: tuple[str, ...] = _CLASSIFIERS) -> None:
    """Load weights (a removed classifier's keys are ignored); anything else that does not fit
    is an error naming the keys."""
    if hasattr(encoder, "remap_state_dict"):
        target: nn.Module = encoder
        state = encoder.remap_state_dict(state)
    else:
        target = encoder.net if hasattr(encoder, "net") else encoder
    try:
        missing, unexpected = target.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ArtifactError(f"{where} does not fit the teacher architecture: {exc}") from exc
    unexpected = [k for k in unexpected if not k.startswith(ignore)]
    if missing or unexpected:
        hint = ""
        if not set(state) & set(target.state_dict()):
            hint = (f"; the file's keys start with {key_prefixes(state)}: strip a prefix with "
                    "teacher.key_map, e.g. {'backbone.': ''}")
        raise ArtifactError(f"{where} does not fit the teacher architecture: missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}{hint}")


# ---------------------------------------------------------------------- opening a spec
@dataclass
class OpenedTeacher:
    """A teacher ready to encode ``input`` images, with what rebuilds it and where it came from."""

    encoder: Encoder
    arch: str
    kwargs: dict[str, Any]
    input: TeacherInput
    provenance: dict[str, Any] = field(default_factory=dict)  # spec, weights fingerprint
    meta: dict[str, Any] = field(default_factory=dict)  # a teacher file's own metadata
    legacy: bool = False  # loaded as before teacher specs: no provenance keys, resnets take any size


def _declared(arch: str, source: TeacherInput, override: Mapping[str, Any]) -> TeacherInput:
    if arch == "mkdt_resnet18":
        base = TeacherInput(3, 32, CIFAR10_MEAN, CIFAR10_STD)
    else:
        base = source
    return base.replace(**override)


def _timm_input(net: nn.Module) -> TeacherInput:
    cfg = _timm().data.resolve_model_data_config(net)
    c, h, _w = cfg["input_size"]
    return TeacherInput(int(c), int(h), tuple(cfg["mean"]), tuple(cfg["std"]))


def open_teacher(spec: str, *, source: TeacherInput, arch: str, kwargs: Mapping[str, Any],
                 checkpoint: str | None = None, key_map: Mapping[str, str] | None = None,
                 input_override: Mapping[str, Any] | None = None) -> OpenedTeacher:
    """Open the teacher that ``spec`` names (see the module docstring), in eval mode.

    ``source`` is the source images' format: the input of a bare state dict for ``arch`` (a model
    trained on this source) unless ``input_override`` or the architecture says otherwise."""
    kind, value = parse_spec(spec)
    key_map = dict(key_map or {})
    override = {k: v for k, v in (input_override or {}).items() if v is not None}
    new_options = bool(checkpoint or key_map or override)
    prov: dict[str, Any] = {"spec": spec}
    if checkpoint:
        prov["checkpoint"] = checkpoint
    if key_map:
        prov["key_map"] = key_map

    if kind in ("builtin", "path", "hf"):
        if kind == "hf":
            path, prov["revision"] = hf_download(value)
        else:
            path = _builtin(value) if kind == "builtin" else _local(value)
        prov["weights_sha256"] = file_sha256(path)
        legacy = kind != "hf" and path.suffix == ".safetensors" and not new_options
        if path.suffix == ".safetensors" and read_metadata(path).get("kind") == "teacher":
            encoder, meta = _read_teacher_file(path, allow_code=False)
            inp = _file_input(meta).replace(**override)
            return OpenedTeacher(encoder, meta["arch"], meta["kwargs"], inp, prov, meta, legacy)
        inp = _declared(arch, source, override)
        encoder = teacher_encoder(arch, kwargs, inp)
        _load_into(encoder, map_keys(read_state_dict(path), key_map), str(path))
        return OpenedTeacher(encoder.eval(), arch, dict(kwargs), inp, prov, legacy=legacy)

    path = _local(checkpoint) if checkpoint else None
    ignore = _CLASSIFIERS
    if kind == "timm":
        arch = f"timm:{value}"
        net = _timm_model(value, pretrained=path is None)
        inp = _timm_input(net).replace(**override)
        encoder: Encoder = ModuleEncoder(net, inp)
        head = net.pretrained_cfg.get("classifier") or ()
        ignore = tuple(f"{h}." for h in ((head,) if isinstance(head, str) else head))
    elif kind == "torchvision":
        if path is None:
            raise ConfigError(f"teacher.weights {spec!r} needs teacher.checkpoint: a local weights "
                              "file (torchvision's downloads are not used)")
        arch = f"torchvision:{value}"
        inp = TeacherInput(3, 224, IMAGENET_MEAN, IMAGENET_STD).replace(**override)
        encoder = teacher_encoder(arch, {}, inp)
    else:  # module: the user's own code
        arch = f"module:{value}"
        inp = source.replace(**override)
        encoder = teacher_encoder(arch, {}, inp)
    if path is not None:
        prov["weights_sha256"] = file_sha256(path)
        _load_into(encoder, map_keys(read_state_dict(path), key_map), str(path), ignore)
    else:
        prov["weights_sha256"] = state_dict_sha256(encoder.state_dict())
    return OpenedTeacher(encoder.eval(), arch, {}, inp, prov)


# ---------------------------------------------------------------------- the run's teacher file
def save_teacher(path: Path, encoder: Encoder, *, arch: str, kwargs: dict[str, Any],
                 in_channels: int, image_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                 **extra: Any) -> None:
    """Write a teacher encoder (state dict, no head) with the metadata needed to rebuild it.

    ``in_channels`` / ``image_size`` / ``mean`` / ``std``: the images ``encoder.features`` takes. A
    :class:`TeacherEncoder` is saved as its inner encoder plus ``input`` / ``adapt_input``."""
    inner = encoder.inner if isinstance(encoder, TeacherEncoder) else encoder
    state = {k: v for k, v in inner.state_dict().items() if not k.startswith("head.")}
    meta = {"kind": "teacher", "arch": arch, "kwargs": kwargs, "in_channels": in_channels,
            "image_size": image_size, "feature_dim": encoder.feature_dim, "mean": list(mean),
            "std": list(std), **extra}
    if isinstance(encoder, TeacherEncoder):
        meta["input"], meta["adapt_input"] = encoder.input.to_dict(), encoder.adapt
    save_tensors(path, state, meta)


def _file_input(meta: dict[str, Any]) -> TeacherInput:
    if "input" in meta:
        return TeacherInput.from_dict(meta["input"])
    return TeacherInput(meta["in_channels"], meta["image_size"], tuple(meta["mean"]), tuple(meta["std"]))


def _read_teacher_file(path: Path, *, allow_code: bool) -> tuple[Encoder, dict[str, Any]]:
    """The inner encoder of a :func:`save_teacher` file (no adaptation) and its metadata."""
    state, meta = load_tensors(path)
    if meta.get("kind") != "teacher" or "arch" not in meta:
        raise ArtifactError(f"{path} is not a distilled_ssl teacher file (no teacher metadata)")
    if meta["arch"].startswith("module:") and not allow_code:
        raise ArtifactError(f"{path} was made by the user code {meta['arch'][7:]!r}; name that code "
                            "as the spec (teacher.weights) and this file as teacher.checkpoint")
    encoder = teacher_encoder(meta["arch"], meta["kwargs"], _file_input(meta))
    try:
        encoder.load_state_dict(state)
    except RuntimeError as exc:
        raise ArtifactError(f"{path}: weights do not fit {meta['arch']} {meta['kwargs']}: {exc}") from exc
    return encoder.eval(), meta


def load_teacher(path: Path, *, in_channels: int | None = None, image_size: int | None = None,
                 device: str | torch.device = "cpu") -> tuple[Encoder, dict[str, Any]]:
    """Rebuild a teacher from a :func:`save_teacher` file; check it fits the source images.

    The encoder's ``features`` take images of the file's ``in_channels`` / ``image_size``
    normalised with its ``mean`` / ``std`` (a teacher with another input adapts them itself)."""
    with seeded(0):  # the weights replace an init that must not draw from the global RNG
        inner, meta = _read_teacher_file(Path(path), allow_code=True)
    if in_channels is not None and meta["in_channels"] != in_channels:
        raise ArtifactError(f"teacher {path} takes {meta['in_channels']}-channel images, the source "
                            f"has {in_channels}")
    if image_size is not None and meta["image_size"] != image_size and "input" not in meta and \
            not meta["arch"].startswith(("resnet", "torchvision:")):
        raise ArtifactError(f"teacher {path} takes {meta['image_size']}px images, the source has "
                            f"{image_size}px")
    encoder = inner
    if "input" in meta:
        inp = TeacherInput.from_dict(meta["input"])
        adapt = meta.get("adapt_input", False)
        encoder = TeacherEncoder(inner, inp, source_channels=meta["in_channels"],
                                 source_size=meta["image_size"],
                                 source_mean=tuple(meta["mean"]) if adapt else None,
                                 source_std=tuple(meta["std"]) if adapt else None)
    return encoder.to(device).eval(), meta
