"""`dart eval`: clean / FGSM / PGD target accuracy of several runs, as report.md, report.json and report.png."""

from __future__ import annotations

import os
import warnings

from urda_fast.attacks import FGSM, PGD, AutoAttack
from urda_fast.attacks.autoattack import INSTALL_HINT, autoattack_backend
from urda_fast.config import check_pixel_budget, repeated
from urda_fast.distributed import check_device
from urda_fast.data import eval_loader, subset
from urda_fast.evaluate import check_loader_settings, robust_accuracy
from urda_fast.files import (atomic_savefig, atomic_write_json, atomic_write_text, check_out_folder, remove_files,
                             run_checkpoint)
from urda_fast.models import ModelSpec

from .common import NormalizedSpaceAttack, load_checkpoint_model, read_checkpoint
from .config import ATTACK_SPACES, RunConfig
from .data import DATA_FIELDS, run_data, target_key, task_data

ATTACKS = ("clean", "fgsm", "pgd10", "pgd20", "autoattack")


def method_label(state: dict) -> str:
    """'source-only' | 'uda' | 'uda+vat' | 'dart', from a run's checkpoint state (:func:`read_checkpoint`)."""
    config = state.get("config", {})
    if state.get("kind") == "dart":
        return "dart"
    if config.get("method") == "source-only":
        return "source-only"
    return "uda+vat" if config.get("vat") else "uda"


def check_attack_names(names) -> None:
    for name in names:
        if not (name in ("clean", "fgsm", "autoattack") or (name.startswith("pgd") and name[3:].isdigit())):
            raise ValueError(f"dart eval: unknown attack {name!r}; choose from clean, fgsm, pgdK (e.g. pgd20), "
                             "autoattack")
    if "autoattack" in names and autoattack_backend() is None:
        raise ImportError(INSTALL_HINT)


def check_attack_space(space: str, names) -> None:
    if space not in ATTACK_SPACES:
        raise ValueError(f"dart eval: attack_space must be one of {', '.join(map(repr, ATTACK_SPACES))}, got {space!r}")
    if space != "pixel" and "autoattack" in names:
        raise ValueError("dart eval: autoattack runs in pixel space only; drop it or use --attack-space pixel")


def make_attacks(model, names, eps: float, seed: int = 0, num_classes: int = 10, space: str = "pixel"):
    """``{name: attack}``: FGSM, PGD-K (step eps/4, random start) and AutoAttack's standard L-inf suite (the authors'
    package, or torchattacks' port). ``space``: "pixel", or "normalized" / "code" for eps in normalised units (the
    threat model of DART's training options of those names; :class:`NormalizedSpaceAttack`)."""
    check_attack_names(names)
    check_attack_space(space, names)

    def make(cls, **kwargs):
        return cls(model, **kwargs) if space == "pixel" else NormalizedSpaceAttack(cls, model, space, **kwargs)

    table = {}
    for name in names:
        if name == "clean":
            table[name] = None
        elif name == "fgsm":
            table[name] = make(FGSM, eps=eps)
        elif name == "autoattack":
            table[name] = AutoAttack(model, eps=eps, norm="Linf", num_classes=num_classes, seed=seed)
        else:
            table[name] = make(PGD, eps=eps, alpha=eps / 4, steps=int(name[3:]), seed=seed)
    return table


def budget_key(name: str, budget: float) -> str:
    """The report's key of an attack at a budget, e.g. "pgd20@0.03137"; "clean" has no budget."""
    return name if name == "clean" else f"{name}@{budget:.4g}"


def budget_attacks(model, names, eps, num_classes: int = 10, space: str = "pixel") -> dict:
    """Every attack at every budget, keyed by :func:`budget_key`, clean once: one pass over the data evaluates them
    all (each attack seeds its own random start per batch, so the figures do not depend on what runs beside it)."""
    table = {}
    for budget in eps:
        for name, attack in make_attacks(model, names, budget, num_classes=num_classes, space=space).items():
            table.setdefault(budget_key(name, budget), attack)
    return table


def evaluate_runs(runs, *, attacks=("clean", "fgsm", "pgd20"), eps=(8 / 255,), data_cfg: RunConfig | None = None,
                  data_flags: dict | None = None, out: str | None = None, device: str = "auto",
                  max_batches: int | None = None, progress: bool = True, labels: dict | None = None,
                  batch_size: int = 256, num_workers: int = 4, attack_space: str = "pixel") -> dict:
    """Evaluate each run directory (its best.pt) on the target test split under each attack and budget.

    Returns ``{"rows": [{"method", "run", "clean", "fgsm", "pgd", ...}], "eps": [...], "data": ...}`` with accuracies
    in percent; the first budget's figures are under plain keys ("fgsm", "pgd" = the strongest PGD), every budget's
    under keys like "pgd20@0.0314". Writes report.md/.json/.png into ``out`` when given.

    The data is the first run's (its saved --data, --root, -s, -t), each field overridden where ``data_flags`` (the
    command line's ``{"data", "root", "source", "target"}``, None or "" = not given) or ``data_cfg`` give it: a moved
    root, another target domain. Another --data than the run's takes none of its root and domains. Only the target's
    test split is read, so no source domain is needed. Each run reads it once, in batches of ``batch_size`` decoded
    by ``num_workers`` loader processes (none for in-memory data); ``max_batches``: score a fixed random sample of
    ``max_batches`` x ``batch_size`` images instead.
    ``attack_space``: "pixel" (eps in [0, 1] units), or "normalized" / "code", eps in normalised units as DART's
    training options of those names attack ("code": the authors' clip of normalised images to [0, 1]).
    """
    if not runs:
        raise ValueError("dart eval: give at least one run folder or checkpoint")
    check_device(device, "dart eval")
    check_loader_settings(batch_size, num_workers, max_batches, "dart eval")
    check_attack_names(attacks)
    if not eps or not all(isinstance(e, (int, float)) and 0 < e < float("inf") for e in eps):
        raise ValueError(f"dart eval: budgets must be positive and finite, at least one (e.g. 8/255), got {eps!r}")
    check_attack_space(attack_space, attacks)
    for what, values in (("attacks", list(attacks)), ("budgets (as the report keys them)",
                                                       [budget_key("pgd", e) for e in eps])):
        if repeated(values):
            raise ValueError(f"dart eval: {what} given more than once: {', '.join(map(str, repeated(values)))}")
    for budget in eps if attack_space == "pixel" else ():  # L-inf in [0, 1] units (normalised ones have no cap)
        check_pixel_budget(budget, "eps", "dart eval")
    check_out_folder(out, "dart eval")
    named = list((labels or {}).values())
    twice = repeated(named)
    if twice:
        raise ValueError(f"dart eval: the labels given name two runs alike ({twice}); rows are told apart by their "
                         "names (dart summary pairs them across tasks)")
    # Every run checked before any evaluation; of each checkpoint only what evaluation reads is kept (no optimizer)
    states = [{k: state[k] for k in ("kind", "spec", "config", "modules") if k in state}
              for state in map(read_checkpoint, runs)]
    given = {k: getattr(data_cfg, k) for k in DATA_FIELDS} if data_cfg is not None else {}
    given.update({k: v for k, v in (data_flags or {}).items() if v not in (None, "")})
    unknown = sorted(set(given) - set(DATA_FIELDS))
    if unknown:
        raise ValueError(f"dart eval: unknown data setting(s) {unknown}; valid: {', '.join(DATA_FIELDS)}")
    given.pop("source", None)  # unused (only the target is read): the report names the first run's own task
    data_cfg = RunConfig(**run_data(states[0].get("config") or {}, given, runs[0], "dart eval"))
    check_one_task(runs, states, data_cfg, asked="data" in given or "target" in given)
    data = task_data(data_cfg, splits=("target_test",))
    for run, state in zip(runs, states):
        classes = ModelSpec.from_dict(state["spec"]).num_classes
        if classes != data.num_classes:
            raise ValueError(f"dart eval: {run_checkpoint(run)!r} has {classes} classes but the evaluation data "
                             f"({data.description}) has {data.num_classes}: runs of different tasks cannot share one "
                             "report; evaluate them separately")
    row_labels = [(labels or {}).get(run) or method_label(state) for run, state in zip(runs, states)]
    shared = repeated(row_labels)
    if shared:
        warnings.warn(f"dart eval: several rows are named {shared} (runs of one kind); give each its own with "
                      "--label RUN=NAME, or `dart summary` cannot pair this report's rows with other tasks'",
                      stacklevel=2)
    # a fixed random sample, the same for every run: tllib's lists are sorted by class, so their first batches
    # would score the first classes alone
    scored = subset(data.target_test, (max_batches or 0) * batch_size)
    rows = []
    for run, state, label in zip(runs, states, row_labels):
        model, _, dev = load_checkpoint_model(run, device, state)
        loader = eval_loader(scored, batch_size, num_workers, dev)
        table = robust_accuracy(model, loader, budget_attacks(model, attacks, eps, data.num_classes, attack_space),
                                device=dev, progress=progress)
        row = {"method": label, "run": run, "count": table.rows[0].count}  # images scored (--max-batches: fewer)
        for budget_index, budget in enumerate(eps):
            for name in attacks:
                value = round(table[budget_key(name, budget)].accuracy, 2)
                row[budget_key(name, budget)] = value
                if budget_index == 0 and name != "clean":
                    row[name] = value
        pgd_names = [a for a in attacks if a.startswith("pgd")]
        if pgd_names:
            row["pgd"] = row[max(pgd_names, key=lambda a: int(a[3:]))]
        rows.append(row)
    report = {"rows": rows, "eps": list(eps), "attacks": list(attacks), "data": data.description,
              "attack_space": attack_space, "test_images": len(data.target_test)}
    if out:
        write_report(report, out)
    return report


def check_one_task(runs, states, data_cfg: RunConfig, asked: bool) -> None:
    """Every run is scored on ``data_cfg``'s target (the first run's, unless --data / -t were given): a run trained
    for another one is an error (the report would list it under the first run's task), or a warning when the target
    was asked for; a run adapted from another source domain is a warning (the report's title names the first's)."""
    ours = target_key(data_cfg.data, data_cfg.target)
    for run, state in zip(runs, states):
        saved = state.get("config") or {}
        theirs = target_key(saved.get("data") or "digits", saved.get("target") or "")
        if theirs != ours:
            what = (f"{run_checkpoint(run)!r} was trained for {_task_words(*theirs)}, and the report evaluates "
                    f"{_task_words(*ours)}")
            if not asked:
                raise ValueError(f"dart eval: {what} (the first run's): runs of different tasks cannot share one "
                                 "report; evaluate them separately, or give --data / -t to score every run there")
            warnings.warn(f"dart eval: {what}, as --data / -t ask", stacklevel=3)
        elif (saved.get("source") or "") != (data_cfg.source or "") and theirs[1]:
            warnings.warn(f"dart eval: {run_checkpoint(run)!r} was adapted from source {saved.get('source')!r}; the "
                          f"report's title names the first run's, {data_cfg.source!r}", stacklevel=3)


def _task_words(data: str, target: str) -> str:
    return f"--data {data}" + (f" -t {target}" if target else "")


def to_markdown(report: dict) -> str:
    # The plain "fgsm"/"pgd20"/"pgd" keys repeat the first budget's figures (for report.json readers): not shown twice.
    keys = [k for k in report["rows"][0] if k == "clean" or "@" in k] if report["rows"] else []
    space = report.get("attack_space", "pixel")
    units = "" if space == "pixel" else f"; budgets in normalised units (--attack-space {space})"
    lines = [f"Target-domain accuracy (%) on {report['data']}{units}", "",
             "| method | " + " | ".join(keys) + " | run |", "|---|" + "---:|" * len(keys) + "---|"]
    for row in report["rows"]:
        lines.append(f"| {row['method']} | " + " | ".join(f"{row[k]:.2f}" for k in keys) + f" | {row['run']} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: str) -> None:
    remove_files(out, ("report.md", "report.json", "report.png"))
    atomic_write_text(os.path.join(out, "report.md"), to_markdown(report))
    atomic_write_json(os.path.join(out, "report.json"), report)
    plot_report(report, os.path.join(out, "report.png"))


def plot_report(report: dict, path: str) -> None:
    """Grouped bars: clean / FGSM / PGD target accuracy per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("clean", "fgsm", "pgd") if report["rows"] and k in report["rows"][0]]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(report["rows"]), 3.6))
    width = 0.8 / max(len(keys), 1)
    for i, key in enumerate(keys):
        xs = [j + i * width for j in range(len(report["rows"]))]
        bars = ax.bar(xs, [row[key] for row in report["rows"]], width, label=key.upper() if key != "clean" else key)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks([j + width * (len(keys) - 1) / 2 for j in range(len(report["rows"]))],
                  [row["method"] for row in report["rows"]])
    ax.set_ylabel("target accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"eps = {report['eps'][0]:.4g}", fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)
