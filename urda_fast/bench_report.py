"""`urda-fast bench report`: a Markdown report and speed-up charts from a pytest-benchmark JSON of bench/.

    python -m pytest bench/ -q --benchmark-json=bench.json
    urda-fast bench report bench.json --out bench-report      # or: python bench/report.py report bench.json

pytest-benchmark's own table compares timings only. This report reads what the bench/ files record in each
benchmark's ``extra_info`` (provider, images/s, peak memory, GB/s and the copy bandwidth measured in the same session)
and puts every provider beside the eager baseline of the same benchmark group and case, so the ratios the README
quotes come out of one command instead of a hand-made table.

Rows: one per (group, case, provider). The group is the benchmark's pytest-benchmark group when it has one (the attack
benchmarks set ``pgd_attack linf``), else extra_info's ``op`` and ``variant`` (``kd_kl``, ``pgd_step linf``), else the
test function's name. The case is the test id without the provider and without the words already in the group
(``test_kd_kl[full-4096x1000-compile]`` -> group ``kd_kl``, case ``full-4096x1000``). Speed-ups use medians:
baseline median / provider median, > 1 means faster than the baseline.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys

from urda_fast.files import atomic_savefig, atomic_write_text, check_out_folder

# Where the bench/ files put their numbers (bench/conftest.py Bench.run, bench_attacks.py, bench_dart_step.py).
PROVIDER_PARAMS = ("provider", "impl", "path")  # the test parameter naming the provider, if extra_info lacks it
IMAGES_PER_S_KEY = "images_per_s"
EAGER, COMPILE = "eager", "compile"


@dataclasses.dataclass
class Row:
    """One benchmark: a provider on one case of one group, with its speed-ups over that group+case's baselines."""

    group: str
    case: str
    provider: str
    name: str  # pytest's full test id, to find the benchmark again
    median_s: float
    mean_s: float
    rounds: int
    throughput: float | None = None  # per second, in throughput_unit
    throughput_unit: str | None = None  # "images/s" or "elements/s"
    peak_mib: float | None = None
    gbs: float | None = None  # compulsory bytes / median time
    copy_gbs: float | None = None  # dst.copy_(src) of the op's input size, same session: the memory-bound limit
    device: str | None = None
    dtype: str | None = None
    vs_eager: float | None = None  # eager median / this median
    vs_compile: float | None = None  # torch.compile median / this median
    paired_vs_eager: float | None = None  # median of per-round eager/provider ratios (attacks, steps)

    @property
    def copy_percent(self) -> float | None:
        if self.gbs is None or not self.copy_gbs:
            return None
        return 100.0 * self.gbs / self.copy_gbs


# ---------------------------------------------------------------------------------------------------------------------
# Reading

def read_results(path: str) -> dict:
    """The parsed pytest-benchmark JSON at ``path``; ValueError naming the file when it is missing or not one."""
    how_to_make = "write one with `python -m pytest bench/ --benchmark-json=FILE`"
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file; {how_to_make}") from None
    except OSError as err:
        raise ValueError(f"{path}: cannot be read ({err.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); {how_to_make}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("benchmarks"), list):
        raise ValueError(f"{path}: not a pytest-benchmark JSON (no 'benchmarks' list); {how_to_make}")
    return doc


def load(path: str) -> list[Row]:
    """Rows of the pytest-benchmark JSON at ``path``, speed-ups filled in."""
    return rows_from_results(read_results(path), source=path)


def rows_from_results(doc: dict, source: str = "results") -> list[Row]:
    """Rows of a parsed pytest-benchmark JSON (see :func:`read_results`); ``source`` names it in errors."""
    rows = []
    for index, bench in enumerate(doc["benchmarks"]):
        stats = bench.get("stats") if isinstance(bench, dict) else None
        name = bench.get("fullname", f"#{index}") if isinstance(bench, dict) else f"#{index}"
        if not isinstance(stats, dict) or not _is_number(stats.get("median")) or not _is_number(stats.get("mean")):
            raise ValueError(f"{source}: benchmark {name} has no timing stats (median, mean); was it run with "
                             "--benchmark-disable? Re-run the benchmarks without it")
        if not stats["median"] > 1e-12 or not stats["mean"] > 1e-12:  # ratios and charts divide by them
            raise ValueError(f"{source}: benchmark {name} has a median or mean time of {stats['median']} / "
                             f"{stats['mean']} s, not a measured time; re-run it")
        rows.append(_row(bench, stats))
    if not rows:
        raise ValueError(f"{source}: holds no benchmarks; did pytest select any (check -k / the file paths)?")
    _fill_speedups(rows)
    return rows


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(info: dict, key: str) -> float | None:
    value = info.get(key)
    return float(value) if _is_number(value) else None


def _row(bench: dict, stats: dict) -> Row:
    info = bench.get("extra_info") if isinstance(bench.get("extra_info"), dict) else {}
    params = bench.get("params") if isinstance(bench.get("params"), dict) else {}
    name = bench.get("fullname") or bench.get("name") or "?"
    test_name = (bench.get("name") or name).split("[", 1)[0]
    param_id = bench.get("param") or ""

    provider = info.get("provider") or next((params[k] for k in PROVIDER_PARAMS if isinstance(params.get(k), str)),
                                            None)
    if provider is None:  # a benchmark outside bench/'s conventions: its whole id is the provider
        provider = param_id or test_name
    group = bench.get("group") or " ".join(filter(None, (info.get("op"), info.get("variant")))) or test_name

    # The case is what the test id says beyond the group and the provider. Ids are dash-joined parameter ids, and no
    # provider name contains a dash, so dropping the provider's part is exact.
    parts = param_id.split("-") if param_id else []
    if provider in parts:
        del parts[len(parts) - 1 - parts[::-1].index(provider)]
    group_words = set(group.split())
    case = "-".join(part for part in parts if part not in group_words)

    median = float(stats["median"])
    throughput, unit = None, None
    if _is_number(info.get(IMAGES_PER_S_KEY)):
        throughput, unit = float(info[IMAGES_PER_S_KEY]), "images/s"
    else:
        numel = _numel(info.get("shape"))
        if numel is not None and median > 0:
            throughput, unit = numel / median, "elements/s"
    return Row(group=group, case=case, provider=str(provider), name=name, median_s=median,
               mean_s=float(stats["mean"]), rounds=int(stats.get("rounds") or 0), throughput=throughput,
               throughput_unit=unit, peak_mib=_number(info, "peak_mem_mb"), gbs=_number(info, "gbs"),
               copy_gbs=_number(info, "copy_gbs"), device=_text(info.get("device")), dtype=_text(info.get("dtype")),
               paired_vs_eager=_number(info, "paired_vs_eager"))


def _numel(shape) -> int | None:
    """Elements of a bench/ shape id such as '64x3x224x224' (None for anything else)."""
    if not isinstance(shape, str) or not re.fullmatch(r"\d+(x\d+)*", shape):
        return None
    return math.prod(int(n) for n in shape.split("x"))


def _fill_speedups(rows: list[Row]) -> None:
    baselines = {}
    for row in rows:
        if row.provider in (EAGER, COMPILE):
            baselines.setdefault((row.group, row.case, row.provider), row.median_s)
    for row in rows:
        for provider, field in ((EAGER, "vs_eager"), (COMPILE, "vs_compile")):
            base = baselines.get((row.group, row.case, provider))
            if base is not None and row.median_s > 0:
                setattr(row, field, base / row.median_s)


# ---------------------------------------------------------------------------------------------------------------------
# Markdown

def groups(rows: list[Row]) -> dict[str, list[Row]]:
    """Rows by group, groups and cases in the order they were run; within a case eager, compile, then the rest."""
    by_group: dict[str, list[Row]] = {}
    for row in rows:
        by_group.setdefault(row.group, []).append(row)
    for group, members in by_group.items():
        case_order = list(dict.fromkeys(r.case for r in members))
        baseline_first = {EAGER: 0, COMPILE: 1}
        members.sort(key=lambda r: (case_order.index(r.case), baseline_first.get(r.provider, 2)))
    return by_group


def _text(value) -> str | None:
    """A recorded label as text (a GPU index 0 is a device too), None when absent."""
    return None if value is None or value == "" else str(value)


def machine_line(machine_info: dict | None, rows: list[Row]) -> str:
    """Where the numbers come from: the host pytest-benchmark saw, and the device/dtype the benchmarks recorded."""
    info = machine_info if isinstance(machine_info, dict) else {}
    cpu = info.get("cpu") if isinstance(info.get("cpu"), dict) else {"brand_raw": info.get("cpu")}
    host = [cpu.get("brand_raw") or info.get("processor") or "unknown CPU"]
    if cpu.get("count"):
        host.append(f"{cpu['count']} logical CPUs")
    if info.get("system"):
        host.append(" ".join(filter(None, (info.get("system"), info.get("release")))))
    if info.get("python_version"):
        host.append(f"{info.get('python_implementation', 'Python')} {info['python_version']}")
    devices = ", ".join(dict.fromkeys(r.device for r in rows if r.device)) or "not recorded"
    dtypes = ", ".join(dict.fromkeys(r.dtype for r in rows if r.dtype))
    return f"**Machine:** {', '.join(host)}. **Device:** {devices}" + (f", {dtypes}." if dtypes else ".")


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


def _rate(value: float | None, unit: str | None) -> str:
    if value is None:
        return ""
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g} {prefix} {unit}"
    return f"{value:.3g} {unit}"


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def _fixed(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


# (header, cell) per column; a column is left out of a group's table when none of its rows has a value.
COLUMNS = (
    ("case", lambda r: r.case or "-"),
    ("provider", lambda r: r.provider),
    ("median ms", lambda r: _ms(r.median_s)),
    ("mean ms", lambda r: _ms(r.mean_s)),
    ("throughput", lambda r: _rate(r.throughput, r.throughput_unit)),
    ("vs eager", lambda r: _ratio(r.vs_eager)),
    ("vs torch.compile", lambda r: _ratio(r.vs_compile)),
    ("paired vs eager", lambda r: _ratio(r.paired_vs_eager)),
    ("peak MiB", lambda r: _fixed(r.peak_mib, ".2f")),
    ("GB/s", lambda r: _fixed(r.gbs, ".1f")),
    ("% of copy GB/s", lambda r: _fixed(r.copy_percent, ".0f")),
)


def markdown(rows: list[Row], machine_info: dict | None = None) -> str:
    """The report: a machine/device line, then one table per group."""
    lines = ["# Benchmark report", "", machine_line(machine_info, rows), "",
             "Times are medians (and means) over the timed rounds. \"vs X\" = X's median / this median (> 1x: faster "
             "than X), for the same group and case. \"paired vs eager\" (attacks, training steps) = median over rounds of eager/this "
             "for an eager round run just before each round: robust to a busy machine. \"% of copy GB/s\" = GB/s over "
             "the `copy_` bandwidth measured in the same session for the same size.", ""]
    for group, members in groups(rows).items():
        columns = [(header, cell) for header, cell in COLUMNS if any(cell(r) for r in members)]
        lines += [f"## {group}", "", "| " + " | ".join(h for h, _ in columns) + " |",
                  "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in members]
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Charts

def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "group"


def plot(rows: list[Row], out_dir: str) -> list[str]:
    """One PNG per group with an eager baseline: speed-up vs eager of every other provider, bars grouped by case.
    Returns the paths written."""
    # The Agg canvas directly, not pyplot: no global backend switch in the caller's process, no open figures left.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    os.makedirs(out_dir, exist_ok=True)
    written = []
    for group, members in groups(rows).items():
        bars = [r for r in members if r.provider != EAGER and r.vs_eager is not None]
        if not bars:
            continue
        cases = list(dict.fromkeys(r.case for r in bars))
        providers = list(dict.fromkeys(r.provider for r in bars))
        fig = Figure(figsize=(max(4.0, 1.2 + 0.5 * len(bars)), 3.6))
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        width = 0.8 / len(providers)
        for i, provider in enumerate(providers):
            ratio = {r.case: r.vs_eager for r in bars if r.provider == provider}
            xs = [j + i * width for j, case in enumerate(cases) if case in ratio]
            ys = [ratio[case] for case in cases if case in ratio]
            drawn = ax.bar(xs, ys, width, label=provider)
            ax.bar_label(drawn, fmt="%.2fx", fontsize=7)
        ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
        ratios = [r.vs_eager for r in bars]
        if max(ratios) / min(ratios) > 20:  # e.g. pgd_step: 2x and 50x on one linear axis hides the small bars
            ax.set_yscale("log")
            ax.set_ylim(top=max(ratios) * 3)
        else:
            ax.set_ylim(0, max(max(ratios), 1.0) * 1.3)  # headroom for the bar labels and the legend
        ax.set_xticks([j + width * (len(providers) - 1) / 2 for j in range(len(cases))], [c or "-" for c in cases],
                      fontsize=8, rotation=15 if len(cases) > 3 else 0)
        ax.set_ylabel("speed-up vs eager (x)")
        ax.set_title(group, fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"speedup_{_slug(group)}.png")
        atomic_savefig(fig, path, dpi=120)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------------------------------
# Command line

def cmd_report(args) -> int:
    try:
        doc = read_results(args.results)
        rows = rows_from_results(doc, source=args.results)
    except ValueError as err:
        raise SystemExit(f"urda-fast bench report: {err}") from None
    try:
        check_out_folder(args.out, "urda-fast bench report")
    except NotADirectoryError as err:
        raise SystemExit(str(err)) from None
    text = markdown(rows, doc.get("machine_info"))
    print(text, end="")  # the text ends with its newline; stdout and report.md get the same bytes
    if args.out:
        path = os.path.join(args.out, "report.md")
        try:
            atomic_write_text(path, text)
            charts = plot(rows, args.out)
        except OSError as err:
            raise SystemExit(f"urda-fast bench report: cannot write to {args.out!r}: {err}") from None
        # stderr: stdout stays the Markdown alone, for redirection into a file or a PR comment.
        print(f"wrote {path} and {len(charts)} chart(s) to {args.out}", file=sys.stderr)
    return 0


def _add_report_command(commands) -> None:
    report = commands.add_parser("report", help="Markdown table and speed-up charts of a --benchmark-json file")
    report.add_argument("results", metavar="RESULTS.json", help="written by pytest bench/ --benchmark-json=FILE")
    report.add_argument("--out", default=None, help="folder for report.md and speedup_<group>.png")
    report.set_defaults(run=cmd_report)


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``bench report`` to the ``urda-fast`` subcommands. Like the other commands of urda_fast/cli.py it sets
    ``run`` (cli.main calls ``args.run(args)``)."""
    bench = subparsers.add_parser("bench", help="reports of the bench/ benchmark suite")
    _add_report_command(bench.add_subparsers(dest="bench_command", required=True))
    return bench


def main(argv=None) -> int:
    """``report RESULTS.json [--out DIR]`` (the arguments of ``urda-fast bench``)."""
    parser = argparse.ArgumentParser(prog="urda-fast bench", description=__doc__.split("\n\n")[0])
    _add_report_command(parser.add_subparsers(dest="bench_command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
