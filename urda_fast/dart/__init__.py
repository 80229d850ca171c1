"""DART: robust unsupervised domain adaptation by disentangled distillation.

    from urda_fast import dart
    dart.pretrain(dart.PretrainConfig(method="dann", ...))       # step 1: any UDA model (or UDA+VAT)
    dart.robustify(dart.RobustifyConfig(teacher="runs/x/best.pt"))  # step 2: the DART post-training
    dart.evaluate_runs(["runs/x", "runs/x_dart"])                 # clean / FGSM / PGD table
    dart.demo("runs/dart-demo")                                   # everything on the embedded digits
"""

from .config import PretrainConfig, RobustifyConfig, RunConfig
from .demo import demo
from .pretrain import pretrain
from .report import evaluate_runs
from .robustify import confidence_weights, dart_loss, robustify

__all__ = ["PretrainConfig", "RobustifyConfig", "RunConfig", "confidence_weights", "dart_loss", "demo",
           "evaluate_runs", "pretrain", "robustify"]
