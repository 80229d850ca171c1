"""`dart summary`: the methods' accuracies per task and on average over tasks (methods.md: "per task and on
average"), from the report.json of one `dart eval` per task (A→W, D→W, ...; a report holds one task)."""

from __future__ import annotations

import json
import os

from urda_fast.config import repeated
from urda_fast.files import atomic_write_json, atomic_write_text, check_out_folder


def read_report(path: str) -> dict:
    """A `dart eval` report.json, given as the file or the folder holding it."""
    file = os.path.join(path, "report.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"dart summary: {file!r} not found; give `dart eval --out` folders (holding "
                                "report.json) or report.json files")
    try:
        with open(file) as f:
            report = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"dart summary: {file!r} is not readable JSON ({err})") from err
    if not (isinstance(report, dict) and isinstance(report.get("rows"), list) and "data" in report and report["rows"]):
        raise ValueError(f"dart summary: {file!r} is not a `dart eval` report (no rows / data)")
    methods = [row["method"] for row in report["rows"]]
    twice = repeated(methods)
    if twice:
        raise ValueError(f"dart summary: {file!r} has several rows labelled {twice}; name them apart with "
                         "`dart eval --label RUN=NAME` (e.g. dann, cdan) so that each task's rows pair up")
    return report


def summarize(paths, out: str | None = None) -> dict:
    """Per method: each task's figures and their mean over the tasks. The columns are the accuracy keys every report
    has ("clean", "pgd20@0.03137", ...); a method missing from a task gets no average (one over fewer tasks would
    not compare). Writes summary.md / summary.json into ``out`` when given."""
    if not paths:
        raise ValueError("dart summary: give the report of at least one `dart eval`")
    check_out_folder(out, "dart summary")
    reports = [read_report(path) for path in paths]
    tasks = [report["data"] for report in reports]
    twice = repeated(tasks)
    if twice:
        raise ValueError(f"dart summary: a task is given twice ({twice})")
    spaces = {report["data"]: report.get("attack_space", "pixel") for report in reports}
    if len(set(spaces.values())) > 1:
        raise ValueError(f"dart summary: the reports' budgets are in different units ({spaces}: --attack-space): "
                         "their figures at one eps are not comparable; evaluate every task in one space")
    # a task scored on part of its test split (dart eval --max-batches): flagged, its mean is not the full one
    partial = [report["data"] for report in reports
               if report.get("test_images") and any(row.get("count", report["test_images"]) < report["test_images"]
                                                    for row in report["rows"])]
    key_sets = [[k for k in report["rows"][0] if k == "clean" or "@" in k] for report in reports]
    keys = [k for k in key_sets[0] if all(k in ks for ks in key_sets)]
    if not keys:
        raise ValueError("dart summary: the reports share no attack at the same budget; evaluate them alike")
    dropped = sorted({k for ks in key_sets for k in ks} - set(keys))
    methods = list(dict.fromkeys(row["method"] for report in reports for row in report["rows"]))
    rows = []
    for method in methods:
        per_task = {task: {k: row[k] for k in keys}
                    for task, report in zip(tasks, reports) for row in report["rows"] if row["method"] == method}
        mean = {k: round(sum(v[k] for v in per_task.values()) / len(tasks), 2) for k in keys} \
            if len(per_task) == len(tasks) else None
        rows.append({"method": method, "per_task": per_task, "mean": mean})
    summary = {"tasks": tasks, "keys": keys, "dropped": dropped, "rows": rows,
               "attack_space": next(iter(spaces.values())), "partial": partial}
    if out:
        atomic_write_text(os.path.join(out, "summary.md"), to_markdown(summary))
        atomic_write_json(os.path.join(out, "summary.json"), summary)
    return summary


def to_markdown(summary: dict) -> str:
    keys, tasks = summary["keys"], summary["tasks"]
    lines = [f"Target-domain accuracy (%), mean over {len(tasks)} task{'s' * (len(tasks) != 1)}", "",
             "| method | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for row in summary["rows"]:
        cells = [f"{row['mean'][k]:.2f}" if row["mean"] else "-" for k in keys]
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    lines += ["", f"Per task ({' / '.join(keys)}):", "", "| method | " + " | ".join(tasks) + " |",
              "|---|" + "---|" * len(tasks)]
    for row in summary["rows"]:
        cells = [" / ".join(f"{row['per_task'][t][k]:.2f}" for k in keys) if t in row["per_task"] else "-"
                 for t in tasks]
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    if any(row["mean"] is None for row in summary["rows"]):
        lines += ["", "-: the method has no run on every task, so no mean."]
    if summary["dropped"]:
        lines += ["", f"Left out (not in every report): {', '.join(summary['dropped'])}."]
    if summary.get("attack_space", "pixel") != "pixel":
        lines += ["", f"Budgets in normalised units (--attack-space {summary['attack_space']})."]
    if summary.get("partial"):
        lines += ["", f"Scored on part of the test split (dart eval --max-batches): {', '.join(summary['partial'])}; "
                      "those figures, and the means over them, are estimates."]
    return "\n".join(lines) + "\n"
