#!/usr/bin/env bash
# Run here, before a device session: downloads into .whl/ the wheels that the device image lacks (it has torch,
# triton, pytest, pytest-benchmark, hypothesis, matplotlib, timm, ... but not these), for its Python 3.12.
# Then every `run` names `.whl` in `carry` (see scripts/gpu_check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for pkg in open_clip_torch==3.3.0 ftfy wcwidth torchattacks==3.5.1; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$pkg"
done
ls .whl
