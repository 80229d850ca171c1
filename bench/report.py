"""`python bench/report.py report RESULTS.json [--out DIR]`: the same as `urda-fast bench report`, for a checkout
where the console script is not installed (Markdown on stdout; report.md and speed-up PNGs with --out)."""

import sys

from urda_fast.bench_report import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
