"""Zero-shot robustness of several CLIPs (a plain one and fine-tuned runs) as one report: JSON, Markdown and a plot.

    report = evaluate_models([("zero-shot", "ViT-B-32:ckpts/vitb32.pt"), run_model("runs/hpt")], cfg)
    write_report(report, "runs/report")     # report.json, report.md, report.png

``report = {"attack", "eps", "prompts", "rows": [{"method", "model", "clean", "robust", "per_dataset": {name: {...}},
"head"}]}``, accuracies in percent, ``clean``/``robust`` averaged over datasets; ``per_dataset[name]["prompts"]`` says
whether the set was prompted with the code's own prompts ("code") or the templates; ``head`` = the zero-shot head
each model was evaluated with: {"logits", "preprocess", "templates", "from": {setting: "run" | "flag" | "default"}}
(a run's own settings unless ``EvalConfig`` gives one).
"""

from __future__ import annotations

import os
import warnings

from urda_fast.config import check_choices, check_ranges, repeated, warn_unused
from urda_fast.data import eval_loader, subset
from urda_fast.distributed import pick_device
from urda_fast.files import (atomic_savefig, atomic_write_json, atomic_write_text, check_out_folder, load_torch_file,
                             missing_best_hint, remove_files, run_checkpoint)
from urda_fast.train import amp_autocast

from .clip_models import load_clip_arg, parse_model_arg
from .config import EvalConfig, ModelsConfig, ProxyCheckConfig
from .data import PAPER_DATASETS, dataset_names, open_dataset
from .evaluate import proxy_robustness, zero_shot_robustness
from .prompts import PROMPT_MODES
from .train import AMP_CHOICES, resolve_amp
from .zero_shot import ZeroShotClassifier, parse_templates


def run_model(path: str) -> tuple[str, str]:
    """(method label, "ARCH:CHECKPOINT") of a run folder or a checkpoint written by ``hpt train``."""
    checkpoint = run_checkpoint(path)
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"hpt eval: {path!r} is neither an `hpt train` run folder (with best.pt) nor a "
                                f"checkpoint file{missing_best_hint(path)}; for a plain CLIP use --target "
                                "ARCH:CHECKPOINT")
    state = load_torch_file(checkpoint, who="hpt eval", mmap=True)  # its metadata: the weights load later
    if not isinstance(state, dict) or state.get("kind") != "hpt":
        raise ValueError(f"hpt eval: {checkpoint!r} was not written by `hpt train`; for a plain CLIP use "
                         "--target ARCH:CHECKPOINT")
    return state.get("config", {}).get("method", "hpt"), f"{state['arch']}:{checkpoint}"


def distinct_labels(models) -> list:
    """Rows of one method (two runs of ``hpt``) are told apart by their run folder; a model given twice is an error."""
    twice = repeated(label for label, _ in models)
    if not twice:
        return list(models)
    named = [(f"{label} ({_run_name(arg)})" if label in twice else label, arg) for label, arg in models]
    same = repeated(label for label, _ in named)
    if same:
        raise ValueError(f"hpt eval: the same model given more than once: {', '.join(same)}")
    return named


def _run_name(model_arg: str) -> str:
    path = os.path.normpath(model_arg.split(":", 1)[-1])
    folder, name = os.path.split(path)
    return os.path.basename(folder) if name in ("best.pt", "last.pt") and folder else name


HEAD_SETTINGS = ("logits", "preprocess", "templates")


def run_config(path: str) -> dict | None:
    """The config an ``hpt train`` checkpoint (or run folder) was trained with; None for any other file."""
    path = run_checkpoint(path)
    try:
        state = load_torch_file(path, who="hpt eval", weights_only=True, mmap=True)  # its config, not its weights
    except (ValueError, OSError):  # a plain CLIP file (e.g. a TorchScript archive): its loader has its say later
        return None
    if isinstance(state, dict) and state.get("kind") == "hpt" and isinstance(state.get("config"), dict):
        return state["config"]
    return None


def head_settings(cfg: EvalConfig, saved: dict, shared: dict | None = None) -> dict:
    """The zero-shot head to evaluate a model with: each of ``HEAD_SETTINGS`` from ``cfg`` when given (not None),
    else the run's own (``saved``: an ``hpt train`` checkpoint's config, {} for a plain CLIP), else ``shared`` (what
    the report's runs agree on: a plain CLIP in their table is scored as they are), else ``ModelsConfig``'s default;
    "from" says which."""
    shared = shared or {}
    head = {"from": {}}
    for key in HEAD_SETTINGS:
        given = getattr(cfg, key, None)
        if given is not None:
            head[key], head["from"][key] = given, "flag"
        elif saved.get(key) is not None:
            head[key], head["from"][key] = saved[key], "run"
        elif key in shared:
            head[key], head["from"][key] = shared[key], "runs"
        else:
            head[key], head["from"][key] = getattr(ModelsConfig, key), "default"
    return head


def report_heads(cfg: EvalConfig, model_args) -> list:
    """``head_settings`` of each model of one report, plain CLIPs taking the settings its runs share. Rows whose
    heads still differ (runs trained with other logits, say) get a warning: PGD's strength depends on the head, so
    their robust accuracies are not comparable."""
    saved = [run_config(parse_model_arg(arg, "target")[1]) or {} for arg in model_args]  # each checkpoint read once
    own = [head_settings(cfg, config) for config in saved]
    runs = [head for head in own if "run" in head["from"].values()]
    shared = {key: runs[0][key] for key in HEAD_SETTINGS
              if runs and all(head["from"][key] == "run" and head[key] == runs[0][key] for head in runs)}
    heads = [head_settings(cfg, config, shared) for config in saved]
    differ = [key for key in HEAD_SETTINGS if len({repr(head[key]) for head in heads}) > 1]
    if differ:
        warnings.warn(f"hpt eval: the rows are evaluated with different zero-shot {' and '.join(differ)} (their "
                      "runs' own): attacks through different heads differ in strength, so the rows' robust "
                      f"accuracies are not comparable; give {' '.join('--' + key for key in differ)} to score every "
                      "row alike", stacklevel=2)
    return heads


def check_eval_numbers(cfg: EvalConfig | ProxyCheckConfig, who: str) -> None:
    """The numbers and output folder of an evaluation, before any model or data is read (`--max-batches -1` read as
    "all", an eps of 8 attacked with 8.0, an --out found to be a file after the evaluation)."""
    check_ranges(cfg, who, positive=("eps", "alpha", "batch_size", "image_size"),
                 non_negative=("max_batches", "num_workers"), pixel_budget=("eps", "alpha"))
    check_out_folder(cfg.out, who)


def evaluate_models(models, cfg: EvalConfig, world=None) -> dict:
    """Evaluate each (label, "ARCH:CHECKPOINT") on ``cfg.datasets`` with ``cfg.attack`` at ``cfg.eps``, each with
    its own zero-shot head (``report_heads``: a run's logits, preprocess and templates unless ``cfg`` sets them; a
    plain CLIP takes what the runs share)."""
    if not models:
        raise ValueError("hpt eval: nothing to evaluate; give run folders and/or --target ARCH:CHECKPOINT")
    models = distinct_labels(models)
    check_eval_numbers(cfg, "hpt eval")
    check_choices(cfg, "hpt eval", {"prompts": PROMPT_MODES, "amp": AMP_CHOICES})
    warn_unused(cfg, "hpt eval", dict.fromkeys(("proxy", "anchor"), "hpt eval evaluates the run folders and "
                                               "--target; the proxy and the anchor are training's"))
    names = dataset_names(cfg.datasets, "hpt eval")
    sets = [open_dataset(name, cfg.root, cfg.image_size, world) for name in names]
    if cfg.max_batches:  # a fixed random sample rather than the first batches (often a few classes only)
        for zs in sets:
            zs.dataset = subset(zs.dataset, cfg.max_batches * cfg.batch_size, cfg.seed)
    rows = []
    device = pick_device(cfg.device)
    amp = resolve_amp(cfg.amp, device)
    for (label, arg), head in zip(models, report_heads(cfg, [arg for _, arg in models])):
        clip, tokenizer, _ = load_clip_arg(arg, "target", device)
        with amp_autocast(amp, device.type):
            result = zero_shot_robustness(clip, tokenizer, sets, attack=cfg.attack, eps=cfg.eps, alpha=cfg.alpha,
                                          batch_size=cfg.batch_size, templates=parse_templates(head["templates"]),
                                          logits=head["logits"], preprocess=head["preprocess"], prompts=cfg.prompts,
                                          num_workers=cfg.num_workers, seed=cfg.seed, progress=cfg.progress)
        rows.append({"method": label, "model": arg, "clean": result["clean"], "robust": result.get("robust"),
                     "per_dataset": result["per_dataset"], "head": head})
    return {"attack": cfg.attack, "eps": cfg.eps, "datasets": names, "prompts": cfg.prompts, "amp": amp,
            "rows": rows}


def proxy_check(cfg: ProxyCheckConfig, world=None) -> dict:
    """The proxy-robustness table of ``cfg.target`` and ``cfg.proxy`` on ``cfg.data`` (see ``proxy_robustness``)."""
    if not cfg.target or not cfg.proxy:
        raise ValueError("hpt proxy-check: give both --target and --proxy as ARCH:CHECKPOINT")
    check_eval_numbers(cfg, "hpt proxy-check")
    check_ranges(cfg, "hpt proxy-check", positive=("steps",))
    warn_unused(cfg, "hpt proxy-check", {"anchor": "the proxy check attacks the target and scores the proxy"})
    if "," in cfg.data:
        raise ValueError(f"hpt proxy-check: --data takes one set, got {cfg.data!r}; run the check once per set")
    device = pick_device(cfg.device)
    zs = open_dataset(cfg.data, cfg.root, cfg.image_size, world)
    heads = []
    for role, arg in (("target", cfg.target), ("proxy", cfg.proxy)):
        clip, tokenizer, _ = load_clip_arg(arg, role, device)
        heads.append(ZeroShotClassifier(clip, tokenizer, zs.classnames, parse_templates(cfg.templates),
                                        logits=cfg.logits, preprocess=cfg.preprocess))
    dataset = subset(zs.dataset, cfg.max_batches * cfg.batch_size, cfg.seed) if cfg.max_batches else zs.dataset
    loader = eval_loader(dataset, cfg.batch_size, cfg.num_workers, device)
    result = proxy_robustness(*heads, loader, eps=cfg.eps, alpha=cfg.alpha, steps=cfg.steps, seed=cfg.seed,
                              progress=cfg.progress)
    return {**result, "data": zs.name, "target": cfg.target, "proxy": cfg.proxy}


def to_markdown(report: dict) -> str:
    names = report["datasets"]
    head = "| method | " + " | ".join(f"{n} clean / robust" for n in names) + " | average clean | average robust |"
    scope = f"averages over these {len(names)} set{'s' * (len(names) != 1)}"
    if set(names) != set(PAPER_DATASETS) and not all(n.startswith(("world:", "folder:")) for n in names):
        scope += " (the papers' averages are over the 15 of --datasets paper)"
    amp = report.get("amp", "none")
    scope += "" if amp == "none" else f"; evaluated under {amp} autocast"
    lines = [f"Zero-shot accuracy (%), clean and under {report['attack']} at eps {report['eps'] * 255:.3g}/255; "
             f"{scope}", "", head, "|---|" + "---:|" * (len(names) + 2)]
    for row in report["rows"]:
        cells = [f"{row['per_dataset'][n]['clean']:.1f} / {_fmt(row['per_dataset'][n].get('robust'))}" for n in names]
        lines.append(f"| {row['method']} | " + " | ".join(cells) + f" | {row['clean']:.2f} | {_fmt(row['robust'])} |")
    heads = [row for row in report["rows"] if "head" in row]
    if heads:
        lines += ["", "Zero-shot heads (logits, preprocessing, templates; the run's own unless a flag set it; a plain "
                      "CLIP takes what the runs share, else the default):"]
        for row in heads:
            head = row["head"]
            lines.append(f"- {row['method']}: " + ", ".join(
                f"{key} {head[key]!r} ({_SOURCE[head['from'].get(key, 'run')].format(flag=key)})"
                for key in HEAD_SETTINGS))
    own = [n for n in names if any(row["per_dataset"][n].get("prompts") == "code" for row in report["rows"])]
    if own:
        lines += ["", f"Prompted as the PMG-AFT / HPT-GPD code prompts them (--prompts code): {', '.join(own)}; the "
                      "other sets through the templates above."]
    if "proxy_check" in report:
        pc = report["proxy_check"]
        lines += ["", f"Proxy robustness ({pc.get('data', '')}, PGD-{pc['steps']} at eps {pc['eps'] * 255:.3g}/255 on "
                      f"the target): target white-box {pc['target_whitebox']:.1f}%, proxy on the target's adversarial "
                      f"images {pc['proxy_on_target_adv']:.1f}% (clean: target {pc['target_clean']:.1f}%, proxy "
                      f"{pc['proxy_clean']:.1f}%)"]
    return "\n".join(lines)


_SOURCE = {"run": "run's", "runs": "the runs'", "flag": "--{flag}", "default": "default"}


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def plot_report(report: dict, path: str) -> None:
    """Average clean vs. robust accuracy per method: the trade-off the methods are compared on."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for row in report["rows"]:
        if row["robust"] is None:
            continue
        ax.scatter(row["clean"], row["robust"], s=60)
        ax.annotate(row["method"], (row["clean"], row["robust"]), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("zero-shot clean accuracy (%)")
    ax.set_ylabel(f"zero-shot robust accuracy (%), {report['attack']}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)


def write_report(report: dict, out: str) -> None:
    remove_files(out, ("report.md", "report.json", "report.png"))
    atomic_write_json(os.path.join(out, "report.json"), report)
    atomic_write_text(os.path.join(out, "report.md"), to_markdown(report) + "\n")
    plot_report(report, os.path.join(out, "report.png"))
