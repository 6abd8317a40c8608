"""``experts.extra_students``: experts of more architectures, matched in turn with the student's
(cross-architecture matching, issue 11's lever)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distilled_ssl.config import ConfigError, ModelConfig, RunConfig
from distilled_ssl.errors import ArtifactError
from distilled_ssl.io import load_tensors, read_metadata
from distilled_ssl.pipeline import prepare_run, run_pipeline
from distilled_ssl.stages.context import RunContext
from distilled_ssl.stages.distill import mkdt
from distilled_ssl.stages.distill.common import distill_fingerprint
from distilled_ssl.stages.experts import experts_fingerprint, list_experts, student_views

RESNET = "experts.extra_students=[{arch: resnet10, kwargs: {width: 0.0625}}]"


def test_config_parses_and_refuses_what_cannot_work(tiny_cfg: RunConfig) -> None:
    cfg = tiny_cfg.override([RESNET]).validate()
    assert cfg.experts.extra_students == [ModelConfig("resnet10", {"width": 0.0625})]
    # unset, earlier runs keep their fingerprints; set, it is part of the config's hash
    assert "extra_students" not in tiny_cfg.hashed_dict()["experts"]
    hashed = cfg.hashed_dict()["experts"]["extra_students"]
    assert hashed == [{"arch": "resnet10", "kwargs": {"width": 0.0625}}]
    with pytest.raises(ConfigError, match="distill.method=mkdt"):
        tiny_cfg.override([RESNET, "distill.method=krr_st"]).validate()
    with pytest.raises(ConfigError, match="distill.method=mkdt"):
        tiny_cfg.override([RESNET, "distill.method=fidelity"]).validate()
    with pytest.raises(ConfigError, match="repeats the student"):
        tiny_cfg.override(["experts.extra_students=[{arch: convnet, kwargs: {depth: 2, width: 4}}]"]
                          ).validate()
    with pytest.raises(ConfigError, match="repeats"):
        tiny_cfg.override(["experts.extra_students=[{arch: resnet10}, {arch: resnet10}]"]).validate()
    with pytest.raises(ConfigError, match="experts.extra_students"):
        tiny_cfg.override(["experts.extra_students=[{arch: nonet}]"]).validate()


def test_a_run_trains_and_matches_both_architectures(tiny_cfg: RunConfig, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    plain = prepare_run(tiny_cfg, tmp_path / "plain", progress=False)
    cross = prepare_run(tiny_cfg.override([RESNET]), tmp_path / "cross", progress=False)
    run_pipeline(plain)
    sizes: list[int] = []
    inner = mkdt._sample_gradient
    monkeypatch.setattr(mkdt, "_sample_gradient",
                        lambda *a, flat, **k: sizes.append(flat.size) or inner(*a, flat=flat, **k))
    run_pipeline(cross)

    # stage 3 trained the student's experts where they always were, the ResNet's in their own folder
    student, resnet = student_views(cross)
    first, second = student_views(RunContext(cross.cfg, cross.run_dir, progress=False))
    assert first.train_set is second.train_set  # one copy of the source in memory
    assert resnet.cfg.student.arch == "resnet10" and resnet.experts_dir == "experts-resnet10_width0.0625"
    ours, theirs = list_experts(student), list_experts(resnet)
    assert [e.path.parent.name for e in ours] == ["experts"] * 2
    assert [e.path.parent.name for e in theirs] == ["experts-resnet10_width0.0625"] * 2
    assert theirs[0].meta["arch"] == "resnet10" and "buffers" in load_tensors(theirs[0].path)[0]
    # the student's experts are the plain run's, bit for bit (same fingerprint, same seeds)
    assert experts_fingerprint(student) == experts_fingerprint(plain)
    torch.testing.assert_close(load_tensors(ours[1].path)[0]["params"],
                               load_tensors(plain.path("experts/expert_00001.safetensors"))[0]["params"])
    p_student, p_resnet = (e.params(0).shape[1] for e in (ours[0], theirs[0]))
    assert p_student != p_resnet
    # iterations alternate: the student's architecture, then the ResNet's
    assert sizes == [p_student, p_resnet] * (cross.cfg.distill.iterations // 2)
    meta = read_metadata(cross.path("distilled.safetensors"))
    assert [m["arch"] for m in meta["cross_architecture"]] == ["convnet", "resnet10"]
    assert "cross_architecture" not in read_metadata(plain.path("distilled.safetensors"))
    assert distill_fingerprint(cross) != distill_fingerprint(plain)
    assert "architectures in turn: convnet(depth=2,width=4): 2 experts" in cross.path("run.log").read_text()
    assert "expert 1 (resnet10_width0.0625) epoch 1" in cross.path("run.log").read_text()


def test_a_changed_extra_student_is_refused_before_anything_is_written(tiny_cfg: RunConfig,
                                                                       tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_pipeline(prepare_run(tiny_cfg.override([RESNET]), run, progress=False))
    config = (run / "config.yaml").read_text()
    wider = tiny_cfg.override(["experts.extra_students=[{arch: resnet10, kwargs: {width: 0.125}}]"])
    with pytest.raises(ArtifactError, match="different configuration.*--force"):
        prepare_run(wider, run, progress=False)
    dropped = tiny_cfg  # matching without the ResNet is another set too
    with pytest.raises(ArtifactError, match="different configuration"):
        prepare_run(dropped, run, progress=False)
    assert (run / "config.yaml").read_text() == config
    # with --force the new ResNet's experts go to their own folder beside the old ones
    run_pipeline(prepare_run(wider, run, progress=False, force=True), force=True)
    assert len(list((run / "experts-resnet10_width0.125").glob("expert_*.safetensors"))) == 2
    assert len(list((run / "experts-resnet10_width0.0625").glob("expert_*.safetensors"))) == 2
