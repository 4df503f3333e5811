#!/usr/bin/env bash
# Train every reference image model on one CUDA GPU inside a fixed time budget, then
# evaluate them all with the quality harness. Each recipe stops at its --max-minutes
# (checkpointed; the model card records the steps reached), so the whole run takes about
# 7 minutes on an H100/H200 whatever the GPU's speed.
#
#   bash engines/training/gpu_recipes.sh [LOGDIR]       # default LOGDIR runs/gpu
#
# Environment: PYTHON (default python3, must import torch with CUDA), DEVICE (cuda),
# SCALE (multiplies every time budget, default 1), EVAL_N (10000), SMOKE_ARGS (appended to
# every recipe, e.g. "--limit 256 --steps 3" to check the script end to end on a CPU).
# Writes model_repo/fashion-edm/2, fashion-cd/2, fashion-latent-edm/1, fashion-lcm/1 and
# runs/autoencoder-gpu; logs and the quality table go to LOGDIR.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
SCALE=${SCALE:-1}
EVAL_N=${EVAL_N:-10000}
SMOKE_ARGS=${SMOKE_ARGS:-}
LOG=${1:-runs/gpu}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1

minutes() { "$PY" -c "print($1 * $SCALE)"; }

stage() {
    local name=$1
    shift
    echo "== $name $(date -u +%T)"
    "$@" 2>&1 | tee "$LOG/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name rc=$rc $(date -u +%T)"
    return "$rc"
}

train() {
    local recipe=$1
    shift
    local store=()
    [ "$recipe" = autoencoder ] || store=(--store-dtype float16)
    "$PY" -m service.cli train "$recipe" "$@" --device "$DEVICE" "${store[@]}" $SMOKE_ARGS
}

"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"

# 1. pixel-space EDM teacher, 3.75M parameters (attention at 7x7), weights stored as float16
stage edm-teacher train edm-teacher --channels 64,96,128 --blocks 1 --emb-dim 192 \
    --batch 512 --steps 20000 --max-minutes "$(minutes 2.0)" --checkpoint-every 1000 \
    --log-every 200 --version 2 --work runs/edm-gpu || exit 1

# 2. consistency distillation from it
stage cd train cd --teacher model_repo/fashion-edm --batch 512 --steps 20000 \
    --max-minutes "$(minutes 1.5)" --checkpoint-every 1000 --log-every 200 --version 2 \
    --work runs/cd-gpu || exit 1

# 3. latent pair: autoencoder, latent EDM teacher, LCM student
stage autoencoder train autoencoder --out runs/autoencoder-gpu --work runs/ae-gpu \
    --batch 512 --steps 20000 --max-minutes "$(minutes 0.25)" --log-every 200 || exit 1
stage lcm-teacher train lcm-teacher --autoencoder runs/autoencoder-gpu \
    --out model_repo/fashion-latent-edm --channels 48,96 --blocks 2 --emb-dim 192 \
    --batch 512 --steps 20000 --max-minutes "$(minutes 0.6)" --checkpoint-every 1000 \
    --log-every 200 --work runs/lt-gpu || exit 1
stage lcm train lcm --teacher model_repo/fashion-latent-edm --autoencoder runs/autoencoder-gpu \
    --out model_repo/fashion-lcm --batch 512 --steps 20000 --max-minutes "$(minutes 0.6)" \
    --checkpoint-every 1000 --log-every 200 --work runs/lcm-gpu || exit 1

# 4. every shipped model through the quality harness
stage eval "$PY" -m service.cli eval --table --n "$EVAL_N" --device "$DEVICE" \
    --out "$LOG/quality.md"
