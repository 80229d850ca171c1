"""The benchmark suite is not run by CI (it takes minutes and times things), but it must stay importable and
collectable: an API change that breaks a bench file fails here, not on a user's GPU."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_bench_file_collects():
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "bench/"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    collected = [line for line in result.stdout.splitlines() if "::" in line]
    files = {line.split("::")[0] for line in collected}
    expected = {f"bench/{name}" for name in os.listdir(os.path.join(ROOT, "bench")) if name.startswith("bench_")}
    assert files == expected, sorted(expected - files)
    assert any("conv2d_input_grad" in line for line in collected) and any("kd_kl" in line for line in collected)
