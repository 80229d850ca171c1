"""``urda-fast hpt demo``: the whole HPT-GPD story offline on CPU, on the embedded world (see ``world``).

1. build (or reuse) the world: a tiny ViT target and a tiny ResNet proxy, CLIP-pre-trained on digit image-captions;
2. proxy check: the target's white-box PGD accuracy vs. the proxy's accuracy on those adversarial images;
3. robust fine-tuning of the target on the world's training split with TeCoA, PMG-AFT, HPT and HPT-GPD;
4. zero-shot clean and PGD-10 accuracy (eps 1/255) of the original target and of every run on three held-out sets.

Writes ``OUT/report.json`` (``{"proxy_check": {...}, "rows": [{"method", "clean", "robust", "per_dataset"}]}``),
``report.md`` and ``report.png``; each run keeps its own folder, and a killed demo resumes where it stopped.
"""

from __future__ import annotations

import os
from dataclasses import replace

from urda_fast.distributed import pick_device

from .config import EvalConfig, ProxyCheckConfig, TrainConfig
from .report import evaluate_models, proxy_check, run_model, to_markdown, write_report
from .train import WORLD_VAL_SETS, train
from .world import WorldRecipe, build_world

METHOD_ROWS = ("tecoa", "pmg-aft", "hpt", "hpt-gpd")
# The world's fine-tuning recipe (chosen on the world; the code's values are TrainConfig's defaults). Logits x
# exp(logit_scale) rather than the code's bare cosines, and the visual tower only: a from-scratch tiny CLIP's cosine
# softmaxes are nearly flat, and training its text tower on ten prompts erodes the zero-shot "style" set.
DEMO_TRAIN = dict(iterations=300, batch_size=32, lr=1e-4, warmup_steps=60, logits="clip", trainable="visual",
                  eval_every=100, eval_max_batches=2)


def demo(out: str = "runs/hpt-demo", *, scale: float = 1.0, device: str = "auto", world_dir: str = "",
         methods=METHOD_ROWS, progress: bool = True, seed: int = 0) -> dict:
    """Run the demo into ``out``; ``scale`` multiplies the world's sizes and every iteration count (quick tries);
    ``seed`` seeds every fine-tuning run (the world is the recipe's, the same for every seed)."""
    if not 0 < scale < float("inf"):  # NaN too
        raise ValueError(f"hpt demo: scale must be a positive finite number, got {scale}")
    pick_device(device)  # a bad --device before minutes of building the world, not after
    recipe = WorldRecipe() if scale == 1 else WorldRecipe().scaled(scale)
    world = build_world(world_dir or None, recipe, progress=progress)
    target, proxy = world.model_arg("target"), world.model_arg("proxy")
    check = proxy_check(ProxyCheckConfig(target=target, proxy=proxy, data="world:digits", world=world.folder,
                                         batch_size=128, logits=DEMO_TRAIN["logits"], device=device,
                                         progress=progress), world)
    print(f"proxy check: target white-box {check['target_whitebox']:.1f}%, proxy on the target's adversarial images "
          f"{check['proxy_on_target_adv']:.1f}% (clean {check['target_clean']:.1f}% / {check['proxy_clean']:.1f}%)")
    base = TrainConfig(target=target, proxy=proxy, train_data="world", world=world.folder, device=device,
                       progress=progress, resume=True, seed=seed, **DEMO_TRAIN)
    iterations = max(10, int(base.iterations * scale))
    base = replace(base, iterations=iterations, warmup_steps=max(1, int(base.warmup_steps * scale)),
                   eval_every=max(5, int(base.eval_every * scale)),
                   batch_size=min(base.batch_size, len(world.split("train")[1])))
    runs = []
    for method in methods:
        cfg = replace(base, method=method, out=os.path.join(out, method))
        result = train(cfg)
        print(f"{method}: {result['last']}")
        runs.append(run_model(cfg.out))
    eval_cfg = EvalConfig(datasets=",".join(WORLD_VAL_SETS), world=world.folder, attack="pgd10", eps=1 / 255,
                          alpha=1 / 255, batch_size=250, logits=base.logits, device=device, progress=progress)
    report = evaluate_models([("zero-shot", target)] + runs, eval_cfg, world)
    report["proxy_check"] = check
    report["world"] = {"folder": world.folder, "pretraining": world.info.get("pretraining")}
    write_report(report, out)
    print(to_markdown(report))
    return report
