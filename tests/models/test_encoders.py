import pytest
import torch

from distilled_ssl.models.encoders import FlatParams, UnknownArchError, build_model


@pytest.mark.parametrize("arch, kwargs, feat", [
    ("convnet", {"depth": 3, "width": 32}, 32 * 3 * 3),
    ("convnet", {"depth": 3, "width": 32, "pooling": "gap", "norm": "batch"}, 32),
    ("convnet", {"depth": 2, "width": 8, "norm": "none"}, 8 * 7 * 7),
    ("resnet10", {"width": 0.125}, 64),
    ("resnet18", {"width": 0.0625}, 32),
])
def test_feature_and_output_sizes(arch: str, kwargs: dict, feat: int) -> None:
    model = build_model(arch, in_channels=1, image_size=28, output_dim=12, **kwargs)
    x = torch.randn(3, 1, 28, 28)
    assert model.feature_dim == feat
    assert model.features(x).shape == (3, feat)
    assert model(x).shape == (3, 12)
    headless = build_model(arch, in_channels=1, image_size=28, **kwargs)
    assert headless(x).shape == (3, feat)


def test_resnet_layout_is_small_image() -> None:
    model = build_model("resnet18", in_channels=3, image_size=32, width=0.125)
    stem_conv = model.stem[0]
    assert stem_conv.kernel_size == (3, 3) and stem_conv.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    assert sum(1 for _ in model.stages) == 8  # 2-2-2-2 basic blocks
    assert [b.conv2.out_channels for b in model.stages][::2] == [8, 16, 32, 64]


def test_unknown_arch_and_bad_options() -> None:
    with pytest.raises(UnknownArchError, match="convnet"):
        build_model("vgg-ish", in_channels=1, image_size=28)
    with pytest.raises(ValueError, match="pooling"):
        build_model("convnet", in_channels=1, image_size=28, pooling="max")
    with pytest.raises(ValueError, match="bad options"):
        build_model("convnet", in_channels=1, image_size=28, colour="blue")


def test_flat_params_round_trip_and_functional_call() -> None:
    model = build_model("resnet10", in_channels=1, image_size=16, output_dim=4, width=0.0625)
    flat = FlatParams(model)
    theta = flat.flatten()
    assert theta.numel() == sum(p.numel() for p in model.parameters())
    x = torch.randn(5, 1, 16, 16)
    model.train()
    torch.testing.assert_close(flat.call(theta, x), model(x))
    # gradients flow from the functional output to the flat vector
    theta = theta.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(flat.call(theta, x).sum(), theta)
    assert g.shape == theta.shape and g.abs().sum() > 0
    flat.load(torch.zeros_like(theta))
    assert all((p == 0).all() for p in model.parameters())
