"""`urda-fast bench report`: rows, speed-ups, Markdown, charts and errors, on a saved pytest-benchmark JSON.

tests/data/bench_fixture.json is real `--benchmark-json` output of this machine's bench/: the six kd_kl benchmarks of
`-k 256x31` (eager, compile, cpu; forward and full) and three of bench_attacks.py (digits_cnn L-inf: eager, ours,
torchattacks; they set their own group and record images/s). Trimmed: the per-round `data` lists and most CPU flags
are dropped, nothing else is changed. Its timings come from a busy shared CPU: they test the report's arithmetic,
not anyone's speed. The expected speed-ups are computed here from the raw JSON, grouping by the test
parameters, independently of how the report splits test ids.
"""

import argparse
import json
import os

import pytest
from PIL import Image

from urda_fast.bench_report import add_bench_parser, load, main, markdown

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "bench_fixture.json")
PROVIDER_PARAMS = ("provider", "impl")


@pytest.fixture(scope="module")
def raw():
    with open(FIXTURE) as f:
        return json.load(f)


def _provider(bench):
    return next(bench["params"][k] for k in PROVIDER_PARAMS if k in bench["params"])


def _case_key(bench):
    """The test function and every parameter but the provider: benchmarks with equal keys are one case."""
    others = {k: v for k, v in bench["params"].items() if k not in PROVIDER_PARAMS}
    return bench["name"].split("[")[0], json.dumps(others, sort_keys=True)


def _expected_speedups(raw, baseline):
    """fullname -> baseline's median / this median, for every benchmark whose case has that baseline."""
    base = {_case_key(b): b["stats"]["median"] for b in raw["benchmarks"] if _provider(b) == baseline}
    return {b["fullname"]: base[_case_key(b)] / b["stats"]["median"]
            for b in raw["benchmarks"] if _case_key(b) in base}


def test_one_row_per_group_case_provider():
    rows = load(FIXTURE)
    got = [(r.group, r.case, r.provider) for r in rows]
    kd_kl = [("kd_kl", f"{mode}-256x31", p) for mode in ("forward", "full") for p in ("eager", "compile", "cpu")]
    attacks = [("pgd_attack linf", "digits_cnn-64x1x16x16", p) for p in ("eager", "ours", "torchattacks")]
    assert got == kd_kl + attacks


def test_speedups_are_baseline_median_over_provider_median(raw):
    rows = {r.name: r for r in load(FIXTURE)}
    vs_eager, vs_compile = _expected_speedups(raw, "eager"), _expected_speedups(raw, "compile")
    assert set(vs_eager) == set(rows)  # every case of the fixture has an eager baseline
    assert len(vs_compile) == 6  # the kd_kl rows; the attacks have no torch.compile provider
    for name, row in rows.items():
        assert row.vs_eager == pytest.approx(vs_eager[name], rel=1e-12), name
        if name in vs_compile:
            assert row.vs_compile == pytest.approx(vs_compile[name], rel=1e-12), name
        else:
            assert row.vs_compile is None, name


def test_throughput_memory_and_bandwidth_come_from_extra_info(raw):
    rows = {r.name: r for r in load(FIXTURE)}
    for bench in raw["benchmarks"]:
        row, info = rows[bench["fullname"]], bench["extra_info"]
        if "images_per_s" in info:
            assert (row.throughput, row.throughput_unit) == (info["images_per_s"], "images/s")
        else:
            assert row.throughput_unit == "elements/s"
            assert row.throughput == pytest.approx(256 * 31 / bench["stats"]["median"])
            assert row.copy_percent == pytest.approx(100 * info["gbs"] / info["copy_gbs"])
        assert row.peak_mib == info.get("peak_mem_mb")  # recorded for kd_kl full and for the attacks only


def test_markdown_has_one_table_per_group_with_the_speedups(raw):
    rows = load(FIXTURE)
    text = markdown(rows, raw["machine_info"])
    assert "AMD EPYC" in text and "float32" in text  # machine_info's CPU and extra_info's dtype
    tables = {}
    for block in text.split("\n## ")[1:]:
        title, *lines = block.strip().splitlines()
        tables[title] = [line for line in lines if line.startswith("|")]
    assert list(tables) == ["kd_kl", "pgd_attack linf"]
    header = [cell.strip() for cell in tables["kd_kl"][0].strip("|").split("|")]
    assert header == ["case", "provider", "median ms", "mean ms", "throughput", "vs eager", "vs torch.compile",
                      "peak MiB", "GB/s", "% of copy GB/s"]
    assert "vs torch.compile" not in tables["pgd_attack linf"][0]  # no compile provider there: no empty column
    assert "paired vs eager" in tables["pgd_attack linf"][0]
    assert {title: len(lines) - 2 for title, lines in tables.items()} == {"kd_kl": 6, "pgd_attack linf": 3}
    vs_eager = _expected_speedups(raw, "eager")
    for row in rows:  # each row's line, found by case and provider, shows the independently computed speed-up
        matching = [line for line in tables[row.group][2:] if line.startswith(f"| {row.case} | {row.provider} |")]
        assert len(matching) == 1, (row.group, row.case, row.provider)
        assert f"| {vs_eager[row.name]:.2f}x |" in matching[0], (row.name, matching[0])


def test_out_writes_report_md_and_loadable_pngs(tmp_path, capsys):
    assert main(["report", FIXTURE, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr()
    assert (tmp_path / "report.md").read_text() == printed.out
    assert "report.md" in printed.err
    charts = sorted(tmp_path.glob("*.png"))
    assert [c.name for c in charts] == ["speedup_kd_kl.png", "speedup_pgd_attack_linf.png"]
    for chart in charts:
        with Image.open(chart) as image:
            image.load()
            assert image.format == "PNG" and image.width > 100 and image.height > 100


def test_bench_parser_plugs_into_a_cli(capsys):
    parser = argparse.ArgumentParser(prog="urda-fast")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", "report", FIXTURE])
    assert args.run(args) == 0
    assert "## kd_kl" in capsys.readouterr().out


def test_an_out_that_is_a_file_is_named_before_any_output(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit, match="--out .*afile' is a file; give a folder"):
        main(["report", FIXTURE, "--out", str(tmp_path / "afile")])
    assert capsys.readouterr().out == ""


def test_missing_file_names_it(tmp_path):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="nope.json: no such file.*--benchmark-json"):
        load(missing)
    with pytest.raises(SystemExit, match="nope.json: no such file"):
        main(["report", missing])


@pytest.mark.parametrize("content, problem", [
    ("{not json", "not valid JSON"),
    ('{"results": []}', "not a pytest-benchmark JSON"),
    ('{"benchmarks": []}', "holds no benchmarks"),
    ('{"benchmarks": [{"fullname": "bench/x.py::test_x", "stats": null}]}', "test_x has no timing stats"),
    ('{"benchmarks": [{"fullname": "bench/x.py::test_x", "stats": {"median": 0.0, "mean": 0.0}}]}',
     "test_x has a median or mean time of 0.0 / 0.0 s, not a measured time"),
    ('{"benchmarks": [{"fullname": "bench/x.py::test_x", "stats": {"median": -1.0, "mean": 1.0}}]}',
     "not a measured time"),
])
def test_malformed_file_names_it_and_the_problem(tmp_path, content, problem):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"bad.json.*{problem}"):
        load(str(path))
    with pytest.raises(SystemExit, match=f"bad.json.*{problem}"):
        main(["report", str(path)])


def test_odd_but_valid_json_reports(tmp_path, capsys):
    """extra_info that is not a dict, a GPU index as the device, a bare CPU name: a report, not a traceback."""
    doc = {"machine_info": {"cpu": "Intel"}, "benchmarks": [
        {"fullname": "bench/x.py::test_x[eager]", "name": "test_x[eager]", "param": "eager",
         "params": {"provider": "eager"}, "stats": {"median": 2e-3, "mean": 2e-3}, "extra_info": [1, 2]},
        {"fullname": "bench/x.py::test_x[cpu]", "name": "test_x[cpu]", "param": "cpu",
         "params": {"provider": "cpu"}, "stats": {"median": 1e-3, "mean": 1e-3}, "extra_info": {"device": 0}}]}
    path = tmp_path / "odd.json"
    path.write_text(json.dumps(doc))
    assert main(["report", str(path), "--out", str(tmp_path / "r")]) == 0
    text = (tmp_path / "r" / "report.md").read_text()
    assert "Intel" in text and "| cpu |" in text and "2.00x" in text
