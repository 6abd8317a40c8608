"""The one registry style, and the tables the config is checked against."""

from __future__ import annotations

import pytest

from distilled_ssl.errors import UnknownArchError, UnknownNameError
from distilled_ssl.registry import BASELINES, DISTILL_METHODS, MATCHERS, MODELS, Registry


def test_register_get_names_and_patterns() -> None:
    reg: Registry[int] = Registry("thing", {"a": 1}, patterns=["family:NAME"])
    reg.register("b")(2)
    assert reg["b"] == 2 and list(reg) == ["a", "b"] and reg.names() == ["a", "b", "family:NAME"]
    assert reg.accepts("family:x") and not reg.accepts("family:") and not reg.accepts("c")
    with pytest.raises(UnknownNameError, match=r"where: unknown thing 'c'; known: a, b, family:NAME"):
        reg.check("c", "where")
    with pytest.raises(ValueError, match="twice"):
        reg.register("a")(3)


def test_lazy_tables_resolve_to_their_implementations() -> None:
    from distilled_ssl.models.encoders import ConvNet
    from distilled_ssl.stages.distill.matching import match_adjoint, match_unrolled

    assert MODELS["convnet"] is ConvNet
    assert MATCHERS["adjoint"] is match_adjoint and MATCHERS["unrolled"] is match_unrolled
    assert all(callable(DISTILL_METHODS[name]) for name in DISTILL_METHODS)
    with pytest.raises(UnknownArchError, match="torchvision:NAME"):
        MODELS.check("vit")
    BASELINES.check("full:builtin:x")
