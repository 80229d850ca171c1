"""`dart demo`: the paper's claim on the embedded printed->handwritten digits, offline, on CPU, in minutes.

Trains source-only, DANN (the UDA teacher), DANN+VAT (the baseline the paper argues against) and DART from the DANN
teacher, then evaluates all four on the held-out handwritten digits, clean and under FGSM / PGD.
"""

from __future__ import annotations

import os
from dataclasses import replace

from .config import PretrainConfig, RobustifyConfig, RunConfig
from .pretrain import pretrain
from .report import evaluate_runs, to_markdown
from .robustify import robustify

# Sized to finish in a few minutes on 2 CPU cores; the attack budget is the authors' eps 0.1 (in [0,1] pixels here),
# because these blurry 16x16 digits barely move at 8/255 (see the README).
DEMO_EPS = 0.1
DEMO = {
    "uda_iterations": 1500,
    "vat_iterations": 1500,
    "dart_iterations": 400,
    "batch_size": 64,
}


def demo(out: str = "runs/dart-demo", *, scale: float = 1.0, progress: bool = True, device: str = "auto",
         eps: float = DEMO_EPS, seed: int = 0) -> dict:
    """Run the whole comparison; ``scale`` shrinks the iteration counts (tests use a small one); ``seed`` seeds every
    run (initialisation, batches, attacks' random starts): other seeds show the spread of one run's figures."""
    if not 0 < scale < float("inf"):  # NaN too
        raise ValueError(f"dart demo: scale must be a positive finite number, got {scale}")
    its = {k: max(1, int(v * scale)) for k, v in DEMO.items() if k.endswith("iterations")}
    # a rerun starts over (the hpt demo continues instead: its runs take a fraction of the time)
    base = dict(data="digits", batch_size=DEMO["batch_size"], progress=progress, device=device, seed=seed,
                overwrite=True)
    runs = {
        "source-only": PretrainConfig(**base, method="source-only", iterations=its["uda_iterations"],
                                      out=os.path.join(out, "source_only")),
        "uda": PretrainConfig(**base, method="dann", iterations=its["uda_iterations"], out=os.path.join(out, "dann")),
    }
    runs["uda+vat"] = replace(runs["uda"], vat=True, vat_eps=eps, vat_alpha=eps / 4, vat_steps=5,
                              iterations=its["vat_iterations"], out=os.path.join(out, "dann_vat"))
    for label, cfg in runs.items():
        cfg.eval_every = max(1, cfg.iterations // 5)
        print(f"[dart demo] {label}: {cfg.method}{' + VAT' if cfg.vat else ''}, {cfg.iterations} iterations")
        pretrain(cfg)
    dart_cfg = RobustifyConfig(**base, teacher=os.path.join(out, "dann", "best.pt"), out=os.path.join(out, "dart"),
                               iterations=its["dart_iterations"], kl_weight=1.0, attack_eps=eps,
                               attack_alpha=eps / 4, attack_steps=10, eval_every=max(1, its["dart_iterations"] // 4))
    print(f"[dart demo] dart: from the DANN teacher, {dart_cfg.iterations} iterations")
    robustify(dart_cfg)
    order = [(os.path.join(out, d), label) for d, label in
             (("source_only", "source-only"), ("dann", "uda"), ("dann_vat", "uda+vat"), ("dart", "dart"))]
    report = evaluate_runs([run for run, _ in order], attacks=("clean", "fgsm", "pgd20"), eps=(eps, 8 / 255),
                           data_cfg=RunConfig(data="digits"), out=out, device=device, progress=progress,
                           labels=dict(order))
    print(to_markdown(report))
    return report
