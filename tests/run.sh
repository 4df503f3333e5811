#!/usr/bin/env bash
# The test command: sets up everything on a fresh machine, then lints and runs the suite.
# Usage: bash tests/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests read: Fashion-MNIST (real data, no download at run time).
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# The `cpu` extra pins torch to the CPU wheel; `test` adds pytest, ruff and the diffusers oracle.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[cpu,test]'

.venv/bin/ruff check .
.venv/bin/ruff format --check .

status=0
.venv/bin/python -m pytest "$@" || status=$?
# pytest exits 5 when a selection collects no test: that is a failure of the command too.
exit "$status"
