"""Our DART step (fused attack steps, split-BN joint forward, fused KL / MSE) gives the loss and the gradients of the
eager twin written like the authors' code (urda_fast/dart/reference_step.py), which runs plain-PyTorch copies of the
models (``plain_torch``: torch's convolution, pooling and BatchNorm modules), so a wrong fused layer cannot hide in
the reference too."""

import copy
import itertools

import pytest
import torch

from urda_fast.dart.config import RobustifyConfig
from urda_fast.dart.reference_step import eager_dart_loss
from urda_fast.dart.robustify import DartTask
from urda_fast.models import ImageClassifier, ModelSpec, Normalize, plain_torch
from urda_fast.models.backbones import DigitsCNN


def _models(dtype):
    torch.manual_seed(0)
    teacher = ModelSpec(backbone="digits_cnn", num_classes=10, bottleneck_dim=32).build().to(dtype)
    student = ModelSpec(backbone="digits_cnn", num_classes=10, bottleneck_dim=32).build().to(dtype)
    student.load_state_dict(teacher.state_dict())
    with torch.no_grad():  # a student a little away from its teacher, so every term is non-zero
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return teacher.eval(), student


def _plain_twin(model):
    """A copy of ``model`` (same weights and buffers) with torch's own layers: the only urda_fast modules left are the
    containers, whose forwards call torch."""
    twin = plain_torch(copy.deepcopy(model))
    ours = [type(m) for m in twin.modules() if type(m).__module__.startswith("urda_fast.")]
    assert set(ours) <= {ImageClassifier, DigitsCNN, Normalize}, ours
    return twin


@pytest.mark.parametrize("fold", ["on", "off"])
@pytest.mark.parametrize("style", ["code", "lean"])
@pytest.mark.parametrize("forward", ["split-bn", "separate"])
def test_fused_step_matches_the_eager_twin(forward, style, fold):
    cfg = RobustifyConfig(attack_eps=0.1, attack_alpha=0.025, attack_steps=5, kl_weight=1.0, forward=forward,
                          fold_batchnorm=fold)
    teacher, student = _models(torch.float64)
    twin_teacher, twin = (_plain_twin(m) for m in (teacher, student))
    x = torch.rand(12, 1, 16, 16, dtype=torch.float64)
    task = DartTask(cfg, teacher, student, itertools.repeat((x,)), None)
    ours = task.training_step()["loss"]
    ours.backward()
    # The attack ran on the student with its 4 conv/linear -> BatchNorm pairs folded (or not, as asked).
    assert len(task.attack._folded.layers) == 4 if fold == "on" else task.attack._folded is None
    reference = eager_dart_loss(twin_teacher, twin, x, cfg, style=style)
    reference.backward()
    # The authors' entropy is log(p + 1e-12), ours the exact log-softmax: they differ by ~1e-10 in float64.
    torch.testing.assert_close(ours, reference, rtol=1e-8, atol=1e-12)
    for (name, p), q in zip(student.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-8, msg=name)


def test_fold_batchnorm_option_is_checked():
    teacher, student = _models(torch.float32)
    cfg = RobustifyConfig(fold_batchnorm="maybe")
    with pytest.raises(ValueError, match="fold_batchnorm must be one of"):
        DartTask(cfg, teacher, student, itertools.repeat((torch.rand(2, 1, 16, 16),)), None)
