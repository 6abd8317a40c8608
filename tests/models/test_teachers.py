"""Teacher specs: every kind opens (timm and torchvision from local files, hf: from the loopback Hub,
the user's own function), declares its input, and records where its weights came from."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from hub_fixtures import LoopbackHub
from safetensors.torch import save_file

from distilled_ssl.errors import ConfigError, HubError
from distilled_ssl.io import file_sha256
from distilled_ssl.models.adapters import TeacherEncoder, TeacherInput
from distilled_ssl.models.encoders import build_model
from distilled_ssl.models.teachers import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    load_teacher,
    open_teacher,
    parse_spec,
    save_teacher,
)

GREY16 = TeacherInput(1, 16, (0.3,), (0.25,))


def test_specs_parse_into_their_kinds() -> None:
    assert parse_spec("builtin:fmnist-bt-resnet10") == ("builtin", "fmnist-bt-resnet10")
    assert parse_spec("timm:hf-hub:timm/resnet18.a1_in1k") == ("timm", "hf-hub:timm/resnet18.a1_in1k")
    assert parse_spec("hf:org/repo@v1") == ("hf", "org/repo@v1")
    assert parse_spec("runs/solo/last.ckpt") == ("path", "runs/solo/last.ckpt")
    assert parse_spec("my_lab.models:make_encoder") == ("module", "my_lab.models:make_encoder")
    with pytest.raises(ConfigError, match="not a teacher spec"):
        parse_spec("resnet18")


def test_timm_model_from_a_local_weights_file(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    net = timm.create_model("test_resnet", pretrained=False)  # with its classifier, as published
    path = tmp_path / "test_resnet.safetensors"
    save_file(net.state_dict(), str(path))
    opened = open_teacher("timm:test_resnet", source=GREY16, arch="resnet18", kwargs={},
                          checkpoint=str(path))
    assert opened.input == TeacherInput(3, 160, (0.5,) * 3, (0.5,) * 3)  # timm's pretrained_cfg
    assert opened.arch == "timm:test_resnet" and opened.provenance["weights_sha256"] == file_sha256(path)
    x = torch.randn(2, 3, 160, 160)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(opened.encoder.features(x), net.forward_head(net.forward_features(x),
                                                                               pre_logits=True))


def test_torchvision_model_from_a_local_checkpoint(tmp_path: Path) -> None:
    net = torchvision.models.mobilenet_v3_small(num_classes=10)
    path = tmp_path / "mnv3.pth"
    torch.save(net.state_dict(), path)
    opened = open_teacher("torchvision:mobilenet_v3_small", source=GREY16, arch="resnet18", kwargs={},
                          checkpoint=str(path))
    assert opened.input == TeacherInput(3, 224, IMAGENET_MEAN, IMAGENET_STD)
    net.classifier = torch.nn.Identity()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(opened.encoder.features(x), net.eval()(x))
    with pytest.raises(ConfigError, match="needs teacher.checkpoint"):
        open_teacher("torchvision:mobilenet_v3_small", source=GREY16, arch="resnet18", kwargs={})


def test_a_solo_learn_checkpoint_needs_its_prefix_stripped(tmp_path: Path) -> None:
    from distilled_ssl.errors import ArtifactError

    net = build_model("resnet10", in_channels=1, image_size=16, width=0.125)
    state = {f"backbone.{k}": v for k, v in net.state_dict().items()}
    state["projector.0.weight"] = torch.randn(4, 64)
    path = tmp_path / "solo.ckpt"
    torch.save({"state_dict": state, "epoch": 9}, path)
    kw = {"source": GREY16, "arch": "resnet10", "kwargs": {"width": 0.125}}
    with pytest.raises(ArtifactError, match=r"start with \['backbone\.', 'projector\.'\].*key_map"):
        open_teacher(str(path), **kw)
    opened = open_teacher(str(path), key_map={"backbone.": ""}, **kw)
    assert all(torch.equal(opened.encoder.state_dict()[k], v) for k, v in net.state_dict().items())
    assert opened.input == GREY16  # a bare state dict for a source model takes the source's images


def _push(hub: LoopbackHub, repo: str, file: Path, tag: str) -> str:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    api.create_repo(repo, exist_ok=True)
    info = api.upload_file(path_or_fileobj=str(file), path_in_repo="model.safetensors", repo_id=repo)
    api.create_tag(repo, tag=tag)
    return info.oid


def test_hf_teacher_is_revision_pinned(loopback_hub: LoopbackHub, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", loopback_hub.endpoint)
    nets = [build_model("convnet", in_channels=1, image_size=16, depth=1, width=3, pooling="gap")
            for _ in range(2)]
    commits = []
    for i, net in enumerate(nets):
        save_teacher(tmp_path / f"t{i}.safetensors", net, arch="convnet",
                     kwargs={"depth": 1, "width": 3, "pooling": "gap"}, in_channels=1, image_size=16,
                     mean=(0.3,), std=(0.25,))
        commits.append(_push(loopback_hub, "alice/fmnist-teacher", tmp_path / f"t{i}.safetensors", f"v{i}"))
    kw = {"source": GREY16, "arch": "resnet18", "kwargs": {}}
    first = open_teacher("hf:alice/fmnist-teacher@v0", **kw)
    assert first.provenance["revision"] == commits[0] and first.input == GREY16
    assert all(torch.equal(first.encoder.state_dict()[k], v) for k, v in nets[0].state_dict().items())
    latest = open_teacher("hf:alice/fmnist-teacher", **kw)
    assert latest.provenance["weights_sha256"] == file_sha256(tmp_path / "t1.safetensors")
    with pytest.raises(HubError, match="no revision"):
        open_teacher("hf:alice/fmnist-teacher@v9", **kw)
    with pytest.raises(HubError, match="not found"):
        open_teacher("hf:alice/nothing", **kw)


def test_the_users_own_function_is_a_teacher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_lab_teacher.py").write_text(
        "from torch import nn\n\n"
        "def make():\n"
        "    return nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Conv2d(5, 7, 3))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rgb = {"channels": 3, "size": 12, "mean": [0.5] * 3, "std": [0.5] * 3}
    opened = open_teacher("my_lab_teacher:make", source=GREY16, arch="resnet18", kwargs={},
                          input_override=rgb)
    assert opened.arch == "module:my_lab_teacher:make" and opened.encoder.feature_dim == 7
    weights = tmp_path / "w.safetensors"
    save_file({k.removeprefix("net."): torch.ones_like(v) for k, v in opened.encoder.state_dict().items()},
              str(weights))
    loaded = open_teacher("my_lab_teacher:make", source=GREY16, arch="resnet18", kwargs={},
                          checkpoint=str(weights), input_override=rgb)
    assert all(bool((v == 1).all()) for v in loaded.encoder.state_dict().values())
    with pytest.raises(ConfigError, match="cannot import"):
        open_teacher("no_such_lab:make", source=GREY16, arch="resnet18", kwargs={})


def test_an_adapted_teacher_file_round_trips(tmp_path: Path) -> None:
    inner = build_model("convnet", in_channels=3, image_size=8, depth=1, width=3, pooling="gap")
    inp = TeacherInput(3, 8, (0.4, 0.5, 0.6), (0.2, 0.3, 0.4), layer="body.0")
    teacher = TeacherEncoder(inner, inp, source_channels=1, source_size=16, source_mean=(0.3,),
                             source_std=(0.25,)).eval()
    path = tmp_path / "teacher.safetensors"
    save_teacher(path, teacher, arch="convnet", kwargs={"depth": 1, "width": 3, "pooling": "gap"},
                 in_channels=1, image_size=16, mean=(0.3,), std=(0.25,))
    again, meta = load_teacher(path, in_channels=1, image_size=16)
    assert meta["input"]["layer"] == "body.0" and meta["adapt_input"] and again.feature_dim == 3
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(again.features(x), teacher.features(x))
