#!/usr/bin/env bash
# Install what the tests need into the active Python environment, build urda_fast, run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.14.1 torchvision==0.29.1 "setuptools>=64,<80" wheel ninja
python -m pip install -q -e ".[test]" --no-build-isolation
python -m pytest tests/ -q -p no:cacheprovider "$@"
