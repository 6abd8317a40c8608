from pathlib import Path

import pytest

from distilled_ssl.config import ConfigError, ModelConfig, RunConfig, list_presets, load_preset


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = load_preset("cpu-fmnist-2pct")
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert RunConfig.from_yaml(path) == cfg


def test_overrides_parse_values_and_reject_unknown_keys() -> None:
    cfg = RunConfig().override(["distill.iterations=7", "distill.clip_grad=2.5",
                                "student.kwargs.width=16", "source.subset=null"])
    assert cfg.distill.iterations == 7
    assert cfg.distill.clip_grad == 2.5
    assert cfg.student.kwargs["width"] == 16
    with pytest.raises(ConfigError, match="unknown key 'distill.iteratons'"):
        RunConfig().override(["distill.iteratons=3"])
    with pytest.raises(ConfigError, match="section.key=value"):
        RunConfig().override(["distill.iterations"])
    with pytest.raises(ConfigError, match="distill.iterations must be an integer"):
        RunConfig().override(["distill.iterations=many"])
    # YAML 1.1 leaves "3e4" (no dot) a string; float fields still take it
    cfg = RunConfig().override(["distill.lr_img=3e4", "distill.lr_lr=-1E-5"])
    assert cfg.distill.lr_img == 30000.0 and cfg.distill.lr_lr == -1e-5
    with pytest.raises(ConfigError, match="distill.lr_img must be a number"):
        RunConfig().override(["distill.lr_img=3e4x"])


@pytest.mark.parametrize("override, message", [
    ("distill.syn_steps=0", "distill.syn_steps must be > 0"),
    ("experts.lr=-1", "experts.lr must be >= 0"),
    ("distill.mode=fast", "distill.mode must be one of"),
    ("experts.epochs=1", "experts.epochs=1 is too short"),
    ("init.fraction=1.5", "init.fraction must be in"),
    ("student.arch=vit", "unknown architecture 'vit'"),
    ("source.name=imagenet21k", "unknown source 'imagenet21k'"),
    ("device=tpu", "device must be"),
    ("teacher.mode=load", "teacher.mode=load needs teacher.weights"),
    ("distill.clip_grad=0", "clip_grad must be > 0"),
    ("threads=0", "threads must be >= 1"),
    ("distill.expert_epochs=.nan", "distill.expert_epochs must be a finite number"),
    ("distill.lr_img=.inf", "distill.lr_img must be a finite number"),
    ("teacher.projector=[0]", "teacher.projector must be a non-empty list"),
    ("teacher.projector=[]", "teacher.projector must be a non-empty list"),
    ("distill.min_start_epoch=3", r"distill.min_start_epoch must be in \[0, distill.max_start_epoch\]"),
    ("distill.max_start_epoch_end=1", "max_start_epoch_end must be >= distill.max_start_epoch"),
    ("distill.max_start_epoch_end=5", "needs distill.start_window_iterations >= 1"),
    ("distill.start_window_iterations=10", "needs distill.max_start_epoch_end"),
])
def test_bad_values_get_clear_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig().override([override]).validate()


def test_a_moving_start_window_needs_experts_that_long() -> None:
    """DATM-style windows: the experts must cover the window's final upper bound plus the span."""
    cfg = RunConfig().override(["distill.max_start_epoch_end=19", "distill.start_window_iterations=100"])
    with pytest.raises(ConfigError, match=r"experts.epochs=20 is too short.*= 21"):
        cfg.validate()
    d = cfg.override(["distill.max_start_epoch_end=10", "distill.min_start_epoch=1"]).validate().distill
    assert d.last_start_epoch == 10
    assert d.start_window(0) == (1, 2) and d.start_window(50) == (1, 6)
    assert d.start_window(100) == d.start_window(1000) == (1, 10)
    assert RunConfig().distill.start_window(10**6) == (0, 2)  # a fixed window by default


def test_unknown_yaml_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("distill:\n  iterations: 3\n  lr_images: 5\n")
    with pytest.raises(ConfigError, match="lr_images"):
        RunConfig.from_yaml(path)


def test_all_presets_load_and_validate() -> None:
    names = list_presets()
    for required in ("smoke", "cpu-fmnist-2pct", "cifar10-2pct", "cifar10-5pct", "cifar100-2pct",
                     "tinyimagenet-2pct"):
        assert required in names
    for name in names:
        load_preset(name).validate()


def test_paper_recipes_hold_the_paper_defaults() -> None:
    c2, c5, tin = load_preset("cifar10-2pct"), load_preset("cifar10-5pct"), load_preset("tinyimagenet-2pct")
    d = c2.distill
    assert (d.iterations, d.syn_steps, d.expert_epochs, d.max_start_epoch) == (5000, 40, 2, 2)
    assert d.batch_syn == 256
    assert (d.lr_img, d.lr_targets, d.lr_lr, d.lr_init) == (1e3, 1.0, 1e-4, 0.1)
    assert c2.student.kwargs == {"depth": 3, "width": 128, "norm": "instance"}
    assert (c2.experts.num_experts, c2.experts.epochs) == (100, 20)
    assert c2.init.fraction == 0.02 and c5.init.fraction == 0.05
    assert c5.distill.lr_img == 1e4 and c5.distill.max_start_epoch == 5
    assert tin.distill.syn_steps == 10 and tin.distill.lr_img == 1e5 and tin.distill.iterations == 10000
    assert tin.student.kwargs["depth"] == 4


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="smoke"):
        load_preset("nope")


def test_a_model_s_label_names_its_arch_and_sorted_kwargs() -> None:
    """Results tables, logs and the evaluation's per-encoder seeds all use this one spelling."""
    assert ModelConfig("resnet10", {"width": 0.125, "in_pool": 2}).label == "resnet10(in_pool=2,width=0.125)"
    assert ModelConfig("convnet").label == "convnet()"
