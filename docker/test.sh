#!/usr/bin/env bash
# Builds fewstep's images here and runs them for real. Leaves the image tagged fewstep:cpu.
#
#   bash docker/test.sh          build (cached), then the container tests (tests/deploy, -m docker)
#   bash docker/test.sh build    only make sure the daemon, the base image and fewstep:cpu exist
#
# No image can be pulled on this project's machines, so the base is built with debootstrap
# (Debian bookworm minbase with python3.11 + venv) and imported as fewstep-base:bookworm;
# users build on the Dockerfile's default BASE_IMAGE, the official python slim image.
# Every step prints its wall time. A daemon that cannot start is a failure, never a skip.
# Environment: FEWSTEP_BASE_IMAGE (skip debootstrap), FEWSTEP_WHEELS (a folder of wheels
# for the build, default pip's find-links), FEWSTEP_IMAGE_BUDGET_MB (default 2000).
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE=${FEWSTEP_BASE_IMAGE:-fewstep-base:bookworm}
IMAGE=fewstep:cpu
REDIS_IMAGE=fewstep-test-redis:bookworm
BUDGET_MB=${FEWSTEP_IMAGE_BUDGET_MB:-2000}
START=$SECONDS

step() { printf '[docker/test.sh %4ds] %s\n' "$((SECONDS - START))" "$*"; }
fail() { printf '[docker/test.sh] FAILED: %s\n' "$*" >&2; exit 1; }

# Debian's client (20.10) has BuildKit built in; a newer client without the buildx plugin
# would fall back to the legacy builder, which has no build secrets.
ensure_docker() {
  if ! command -v dockerd >/dev/null || [ ! -x /usr/bin/docker ] || ! command -v docker-compose >/dev/null; then
    step "installing docker.io and docker-compose"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io docker-compose >/dev/null
  fi
  DOCKER=/usr/bin/docker
  if ! "$DOCKER" info >/dev/null 2>&1; then
    step "starting dockerd (log: /var/log/fewstep-dockerd.log)"
    nohup dockerd >/var/log/fewstep-dockerd.log 2>&1 &
    for _ in $(seq 60); do "$DOCKER" info >/dev/null 2>&1 && break; sleep 0.5; done
    "$DOCKER" info >/dev/null 2>&1 \
      || fail "the docker daemon did not start; see /var/log/fewstep-dockerd.log"
  fi
  step "docker daemon $("$DOCKER" version --format '{{.Server.Version}}') answers"
}

ensure_base() {
  if "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    step "base image $BASE_IMAGE present (cached)"
    return
  fi
  [ "$BASE_IMAGE" = fewstep-base:bookworm ] || fail "FEWSTEP_BASE_IMAGE=$BASE_IMAGE is not there"
  command -v debootstrap >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  }
  local root
  root=$(mktemp -d /var/tmp/fewstep-base.XXXXXX)
  step "debootstrap bookworm minbase + python3 into $root (about a minute or two)"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$root" http://deb.debian.org/debian >/dev/null
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | "$DOCKER" import -c 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
  rm -rf "$root"
  step "imported $BASE_IMAGE"
}

# pip here finds torch's CPU wheel in a local folder (pip's find-links) and reaches PyPI
# through the system CA bundle: both go into the build as the secret `pipconf` (a pip.conf),
# the folder served over loopback (the build runs with --network host). A secret changes
# no cache key, so a rebuild reuses every layer whatever port the folder got.
WHEELS_PID=
PIPCONF=
write_pipconf() {
  local folder=${FEWSTEP_WHEELS:-$(python3 -m pip config get global.find-links 2>/dev/null || true)}
  PIPCONF=$(mktemp /tmp/fewstep-pipconf.XXXXXX)
  printf '[global]\ncert = /run/secrets/ca\n' >"$PIPCONF"
  if [ -n "$folder" ] && [ -d "$folder" ]; then
    local port
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    python3 -m http.server --bind 127.0.0.1 --directory "$folder" "$port" >/dev/null 2>&1 &
    WHEELS_PID=$!
    printf 'find-links = http://127.0.0.1:%s/\n' "$port" >>"$PIPCONF"
  fi
}

build() {
  write_pipconf
  trap '[ -n "$WHEELS_PID" ] && kill "$WHEELS_PID" 2>/dev/null; rm -f "$PIPCONF"' EXIT
  local ca=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt} begin=$SECONDS
  step "building $IMAGE (target cpu, base $BASE_IMAGE; log: /tmp/fewstep-docker-build.log)"
  DOCKER_BUILDKIT=1 "$DOCKER" build --network host -f docker/Dockerfile --target cpu \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg TORCH_INDEX_URL= \
    --build-arg "REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
    --secret "id=ca,src=$ca" --secret "id=pipconf,src=$PIPCONF" --progress plain -t "$IMAGE" . >/tmp/fewstep-docker-build.log 2>&1 \
    || { tail -40 /tmp/fewstep-docker-build.log >&2; fail "building $IMAGE"; }
  local cached
  cached=$(grep -c ' CACHED$' /tmp/fewstep-docker-build.log || true)
  step "built $IMAGE in $((SECONDS - begin)) s ($cached steps cached)"
  begin=$SECONDS
  # Redis for the distributed test stack: Debian's redis-server on the same base
  printf 'FROM %s\nRUN apt-get update && apt-get install -y --no-install-recommends redis-server && rm -rf /var/lib/apt/lists/* && mkdir /data && chown redis:redis /data\nUSER redis\nCMD ["redis-server", "--protected-mode", "no", "--dir", "/var/lib/redis"]\n' \
    "$BASE_IMAGE" | DOCKER_BUILDKIT=1 "$DOCKER" build --network host -t "$REDIS_IMAGE" - \
    >/tmp/fewstep-docker-redis.log 2>&1 || { tail -20 /tmp/fewstep-docker-redis.log >&2; fail "building $REDIS_IMAGE"; }
  step "built $REDIS_IMAGE in $((SECONDS - begin)) s"
  local bytes mb
  bytes=$("$DOCKER" image inspect "$IMAGE" --format '{{.Size}}')
  mb=$((bytes / 1000000))
  step "image size $IMAGE: $mb MB (budget $BUDGET_MB MB)"
  [ "$mb" -le "$BUDGET_MB" ] || fail "$IMAGE is $mb MB, over the $BUDGET_MB MB budget"
}

ensure_docker
ensure_base
build
if [ "${1:-}" = build ]; then
  exit 0
fi
step "container tests: pytest tests/deploy -m docker"
FEWSTEP_IMAGE_BUILT=1 .venv/bin/python -m pytest tests/deploy -m docker -p no:cacheprovider
step "done"
