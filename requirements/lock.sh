#!/usr/bin/env bash
# Regenerates requirements/lock.txt: the exact versions CI installs (`.ci/run`) and the README's first
# command uses as constraints. Run it after changing a dependency in pyproject.toml; add --upgrade to move
# every pin to the newest release inside pyproject's bounds, then run the suite before committing.
# One universal resolution (every platform, Python >= 3.10) made by uv. CI tests Python 3.11 with it. The torch
# pin is met by the CPU build from PyTorch's CPU wheel index (the README's first command) or a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m uv --version >/dev/null 2>&1 || python -m pip install -q "uv>=0.5"
python -m uv pip compile pyproject.toml --extra dev --universal --python-version 3.10 --no-annotate \
    --custom-compile-command "bash requirements/lock.sh" -o requirements/lock.txt "$@"
