"""HPT-GPD: robustness transfer between CLIP models (heterogeneous proxy transfer, generalization-pivot decoupling).

    from urda_fast import hpt
    hpt.proxy_check(hpt.ProxyCheckConfig(target="ViT-B-32:a.pt", proxy="ViT-B-16:b.pt", data="cifar10", root="~/data"))
    hpt.train(hpt.TrainConfig(target=..., proxy=..., train_data="tinyimagenet", root="~/data", method="hpt-gpd"))
    hpt.evaluate_models([("zero-shot", "ViT-B-32:a.pt"), hpt.run_model("runs/hpt")], hpt.EvalConfig(root="~/data"))
    hpt.demo("runs/hpt-demo")      # everything offline on the embedded world
"""

from .clip_models import load_clip, load_clip_arg, parse_model_arg
from .config import METHODS, EvalConfig, ProxyCheckConfig, TrainConfig
from .demo import demo
from .evaluate import proxy_robustness, zero_shot_robustness
from .losses import hpt_loss, pmg_aft_loss, tecoa_loss
from .report import evaluate_models, proxy_check, run_model, to_markdown, write_report
from .schedule import GPDSchedule
from .train import HptTask, open_world, train
from .world import World, WorldRecipe, build_world
from .zero_shot import ZeroShotClassifier

__all__ = [
    "METHODS", "EvalConfig", "GPDSchedule", "HptTask", "ProxyCheckConfig", "TrainConfig", "World", "WorldRecipe",
    "ZeroShotClassifier", "build_world", "demo", "evaluate_models", "hpt_loss", "load_clip", "load_clip_arg",
    "open_world", "parse_model_arg", "pmg_aft_loss", "proxy_check", "proxy_robustness", "run_model", "tecoa_loss",
    "to_markdown", "train", "write_report", "zero_shot_robustness",
]
