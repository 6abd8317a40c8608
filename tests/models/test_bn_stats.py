import torch
from torch import nn

from distilled_ssl.models.bn_stats import has_batchnorm, reestimate_bn_stats
from distilled_ssl.models.pretrain import PretrainSet, pretrain_kd


def test_reestimated_stats_are_the_average_of_the_batch_statistics() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU())
    bn = model[1]
    bn.running_mean.fill_(5.0)
    x = torch.randn(12, 1, 6, 6) * 2 + 1
    batches = list(x.split(4))
    reestimate_bn_stats(model, batches)
    with torch.no_grad():
        acts = [model[0](b) for b in batches]
    means = torch.stack([a.mean((0, 2, 3)) for a in acts])
    vars_ = torch.stack([a.var((0, 2, 3), unbiased=True) for a in acts])
    torch.testing.assert_close(bn.running_mean, means.mean(0))
    torch.testing.assert_close(bn.running_var, vars_.mean(0))
    assert bn.momentum == 0.1 and not model.training


def test_no_batchnorm_is_left_alone() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.GroupNorm(2, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reestimate_bn_stats(model, [torch.randn(2, 1, 5, 5)])
    assert not has_batchnorm(model) and not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _pretrain(precise_bn: bool) -> tuple[nn.Module, PretrainSet]:
    g = torch.Generator().manual_seed(0)
    pset = PretrainSet("s", torch.randn(40, 1, 12, 12, generator=g), torch.randn(40, 8, generator=g), 0.5,
                       epochs=3)
    model = pretrain_kd("resnet10", {"width": 0.0625}, pset, in_channels=1, image_size=12, target_dim=8,
                        batch_size=40, seed=0, precise_bn=precise_bn)
    return model, pset


def test_pretrain_kd_reestimates_bn_stats_with_the_final_weights() -> None:
    model, pset = _pretrain(True)
    ema, _ = _pretrain(False)
    assert not model.training and not ema.training
    first = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    ema_first = next(m for m in ema.modules() if isinstance(m, nn.BatchNorm2d))
    seen: list[torch.Tensor] = []
    hook = first.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    with torch.no_grad():
        model(pset.images)  # eval mode: the first BN's input does not depend on its statistics
    hook.remove()
    # one batch of 40 holds the whole set: the re-estimated mean is that batch's mean
    torch.testing.assert_close(first.running_mean, seen[0].mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ema_first.running_mean, seen[0].mean((0, 2, 3)), rtol=1e-3, atol=1e-4)
    for a, b in zip(model.parameters(), ema.parameters(), strict=True):  # the same training
        assert torch.equal(a, b)
