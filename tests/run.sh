#!/usr/bin/env bash
# The test command: sets up everything on a fresh machine, then lints and runs the suite.
# Usage: bash tests/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests read: Fashion-MNIST (real data, no download at run time).
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
fi

# Speech: Festival with the HTS voice cmu_us_slt_arctic_hts (the front end and teacher voice)
# and WordNet's example sentences (the speech corpus recipe's text).
if ! command -v festival >/dev/null || [ ! -d /usr/share/festival/voices/us/cmu_us_slt_arctic_hts ] \
  || [ ! -f /usr/share/wordnet/data.noun ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    festival festvox-us-slt-hts wordnet-base
fi

# Prometheus: promtool checks the /metrics exposition (tests/service/test_serve.py).
if ! command -v promtool >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus
fi

# openssl makes a throwaway certificate for the gRPC TLS test (tests/service/test_hygiene.py).
if ! command -v openssl >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl
fi

# Redis 7 for the distributed-mode tests (tests/service/test_queue.py, test_distributed.py,
# test_faults.py): start one on 127.0.0.1:6379 unless one answers there already.
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server
fi
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  for _ in $(seq 100); do
    redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break
    sleep 0.1
  done
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# The `cpu` extra pins torch to the CPU wheel; `test` adds pytest, ruff, import-linter and the
# diffusers oracle.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[cpu,test]'

.venv/bin/ruff check .
.venv/bin/ruff format --check .
# the import contracts in pyproject.toml: layers, engines never importing service, no cycles
.venv/bin/lint-imports

# tests/deploy builds and runs the Docker images: its session fixture calls
# `bash docker/test.sh build` (installs docker.io and debootstrap, starts dockerd, builds
# fewstep:cpu on a debootstrap base; cached layers make a rerun take seconds).
status=0
.venv/bin/python -m pytest "$@" || status=$?
# pytest exits 5 when a selection collects no test: that is a failure of the command too.
exit "$status"
