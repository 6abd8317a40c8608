"""A teacher's declared input: grey → RGB, resize and its normalisation, or a chosen layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distilled_ssl.errors import ConfigError
from distilled_ssl.models.adapters import TeacherEncoder, TeacherInput
from distilled_ssl.models.encoders import build_model


def test_grey_source_images_reach_the_teacher_as_its_rgb_input() -> None:
    inner = build_model("convnet", in_channels=3, image_size=32, depth=1, width=4, pooling="gap").eval()
    inp = TeacherInput(3, 32, (0.4, 0.5, 0.6), (0.2, 0.3, 0.4))
    teacher = TeacherEncoder(inner, inp, source_channels=1, source_size=28, source_mean=(0.3,),
                             source_std=(0.25,))
    pixels = torch.rand(2, 1, 28, 28)
    x = (pixels - 0.3) / 0.25  # what the stages pass: source images, source normalisation
    rgb = F.interpolate(pixels.expand(-1, 3, -1, -1), size=(32, 32), mode="bilinear", antialias=True)
    expected = (rgb - torch.tensor(inp.mean).view(1, 3, 1, 1)) / torch.tensor(inp.std).view(1, 3, 1, 1)
    torch.testing.assert_close(teacher.to_input(x), expected)
    with torch.no_grad():
        torch.testing.assert_close(teacher.features(x), inner.features(expected))


def test_a_named_layer_gives_the_representation() -> None:
    inner = build_model("convnet", in_channels=1, image_size=16, depth=2, width=4).eval()
    inp = TeacherInput(1, 16, (0.3,), (0.25,), layer="body.2")  # the first block's ReLU
    teacher = TeacherEncoder(inner, inp, source_channels=1, source_size=16)
    assert teacher.feature_dim == 4
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(teacher.features(x), inner.body[:3](x).mean(dim=(2, 3)))
    with pytest.raises(ConfigError, match="no layer 'blocks.9'"):
        TeacherEncoder(inner, TeacherInput(1, 16, (0.3,), (0.25,), layer="blocks.9"),
                       source_channels=1, source_size=16)
    with pytest.raises(ConfigError, match="3 values each"):
        TeacherInput(3, 16, (0.3,), (0.25,))
