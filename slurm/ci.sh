#!/usr/bin/env bash
# CI helper: `up` installs and starts the SLURM test cluster and the services (PostgreSQL, MLflow)
# and writes their env lines to $MGBENCH_SLURM_DIR/env.sh (mode 600: it holds the PostgreSQL password;
# source it); `down` stops every process they started, job steps included. Nothing printed holds a password.
# Usage: slurm/ci.sh {up|down}
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BASE_DIR="${MGBENCH_SLURM_DIR:-/tmp/mgbench-slurm}"   # same default as cluster.sh/services.sh
ENV_OUT="$BASE_DIR/env.sh"

case "${1:-}" in
  up)
    t0=$SECONDS
    "$HERE/cluster.sh" install
    "$HERE/services.sh" install
    "$HERE/cluster.sh" start
    "$HERE/services.sh" start
    mkdir -p "$BASE_DIR"
    rm -f "$ENV_OUT.tmp"
    (umask 077; { "$HERE/cluster.sh" env; "$HERE/services.sh" env; } >"$ENV_OUT.tmp") && mv "$ENV_OUT.tmp" "$ENV_OUT"
    echo "[ci] cluster + services up in $((SECONDS - t0))s; source $ENV_OUT" >&2
    ;;
  down)
    "$HERE/services.sh" stop || true
    "$HERE/cluster.sh" stop || true
    rm -f "$ENV_OUT"
    ;;
  *) echo "usage: $0 {up|down}" >&2; exit 2 ;;
esac
