"""split_batchnorm: one concatenated forward equals separate forwards of its chunks, for every kind of BatchNorm a
user's model may hold (outputs and running statistics alike)."""

import copy

import pytest
import torch
import torch.nn as nn

from urda_fast.split_bn import split_batchnorm


class ScaledBatchNorm(nn.BatchNorm2d):
    """A subclass with a forward of its own (as timm's BatchNormAct2d, which adds its activation)."""

    def forward(self, x):
        return 2.0 * super().forward(x) + 1.0


def _stats_off_after_construction():
    norm = nn.BatchNorm2d(3)
    norm.track_running_stats = False  # buffers kept: torch then normalises by batch statistics and updates nothing
    return norm


NORMS = {
    "plain": lambda: nn.BatchNorm2d(3),
    "cumulative": lambda: nn.BatchNorm2d(3, momentum=None),
    "no-stats-cumulative": lambda: nn.BatchNorm2d(3, momentum=None, track_running_stats=False),
    "stats-off-later": _stats_off_after_construction,
    "subclass": lambda: ScaledBatchNorm(3),
    "sync": lambda: nn.SyncBatchNorm(3),
    "no-affine": lambda: nn.BatchNorm2d(3, affine=False),
}


@pytest.mark.parametrize("kind", list(NORMS))
def test_one_forward_equals_separate_forwards(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), NORMS[kind](), nn.ReLU()).double().train()
    twin = copy.deepcopy(model)
    clean, adv = torch.randn(4, 3, 5, 5, dtype=torch.float64), 3 + torch.randn(4, 3, 5, 5, dtype=torch.float64)
    for _ in range(2):  # twice: momentum=None's average counts the forwards
        want = torch.cat([twin(clean), twin(adv)])
        with split_batchnorm(model, [4, 4]):
            got = model(torch.cat([clean, adv]))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        for (name, a), (_, b) in zip(model.named_buffers(), twin.named_buffers()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    assert "forward" not in model[1].__dict__  # the class's forward again


def test_a_forward_set_on_the_instance_runs_per_chunk_and_is_restored():
    norm = nn.BatchNorm1d(2)
    calls = []

    def own(x):
        calls.append(x.shape[0])
        return type(norm).forward(norm, x) * 0.5

    norm.forward = own
    x = torch.randn(6, 2)
    with split_batchnorm(norm, [2, 4]):
        out = norm(x)
    assert calls == [2, 4] and norm.forward is own
    twin = nn.BatchNorm1d(2)
    torch.testing.assert_close(out, torch.cat([twin(x[:2]), twin(x[2:])]) * 0.5)


def test_eval_mode_runs_once_on_the_whole_batch():
    norm = nn.BatchNorm1d(2).eval()
    norm.running_mean.fill_(1.0)
    x = torch.randn(6, 2)
    with split_batchnorm(norm, [3, 3]):
        torch.testing.assert_close(norm(x), nn.functional.batch_norm(x, norm.running_mean, norm.running_var,
                                                                      norm.weight, norm.bias, False, 0.1, norm.eps))
