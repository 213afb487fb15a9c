#!/usr/bin/env bash
# Cluster-mode services for tests: PostgreSQL (Optuna RDB storage, MLflow backend) and an MLflow
# tracking server that SLURM jobs reach over HTTP. Everything lives in one private folder.
# Usage: slurm/services.sh {install|start [--fresh]|stop|status|env}
#   start           first start (or after stop): both on new ports; later: restarts only the one that died, on
#                   its own port, so the URLs that running jobs hold stay valid (databases are always kept)
#   start --fresh   stop both and start them on new ports
#   eval "$(slurm/services.sh env)"   # sets MGBENCH_PG_URL and MGBENCH_MLFLOW_URL
# Knobs (environment): MGBENCH_SLURM_DIR (folder, default /tmp/mgbench-slurm; this script uses
# its services/ subfolder), MGBENCH_PYTHON (runs mlflow, default the repo's .venv),
# MGBENCH_SERVICES_TIMEOUT (seconds start waits for MLflow, default 120).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DIR="$BASE_DIR/services"                           # this script's part of the private folder
RUN="$DIR/run"; LOGS="$DIR/log"; PG_DATA="$DIR/pg/data"; PG_SOCK="$DIR/pg/sock"
PG_USER="mgbench"                                  # password role owning both databases
PG_DB="mgbench"                                    # Optuna RDB storage (and other study data)
MLFLOW_DB="mgbench_mlflow"                         # MLflow backend (own db: both use alembic_version)
ENV_FILE="$DIR/env.sh"                             # what `env` prints, written at start (mode 600: it holds the password)
PORTS_FILE="$DIR/ports.sh"                         # ports chosen by a fresh start, reused by restarts
PG_PASSWORD_FILE="$DIR/pg.password"                # the role's password (mode 600)
PG_PASSFILE="$DIR/pgpass"                          # libpq password file of the MLflow server (mode 600), never argv
START_TIMEOUT="${MGBENCH_SERVICES_TIMEOUT:-120}"
PACKAGES=(postgresql)

pg_bin() {
  local d; d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)"
  [[ -n "$d" ]] || die "no PostgreSQL server under /usr/lib/postgresql: run slurm/services.sh install"
  echo "$d"
}
as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"; }

cmd_install() {
  APT_LOG="${APT_LOG:-}" apt_install_missing "${PACKAGES[@]}"
  "$MGBENCH_PYTHON" -c "import mlflow, psycopg2" 2>/dev/null ||
    die "$MGBENCH_PYTHON lacks mlflow or psycopg2 (pip install -e '.[dev]')"
}

# Create the datadir once (owned by postgres, peer auth on the private socket, passwords on TCP).
init_pg() {
  local bin="$1"
  mkdir -p "$DIR/pg" "$PG_SOCK"; chown postgres: "$DIR/pg" "$PG_SOCK"; chmod 700 "$PG_SOCK"
  [[ -f "$PG_DATA/PG_VERSION" ]] && return 0
  rm -rf "$PG_DATA"
  as_postgres "$bin/initdb" -D "$PG_DATA" -U postgres -E UTF8 --locale=C \
    --auth-local=peer --auth-host=scram-sha-256 >"$LOGS/initdb.log" 2>&1 ||
    { tail -n 15 "$LOGS/initdb.log" >&2; die "initdb failed"; }
}

psql_admin() { as_postgres "$(pg_bin)/psql" -h "$PG_SOCK" -p "$1" -U postgres -d postgres -v ON_ERROR_STOP=1 -qtA "${@:2}"; }

# The password role and both databases, created when missing (SQL with the password goes on stdin, not argv).
create_db() {
  local port="$1" pw="$2" db verb=ALTER
  [[ -n "$(psql_admin "$port" -c "SELECT 1 FROM pg_roles WHERE rolname='$PG_USER'")" ]] || verb=CREATE
  psql_admin "$port" <<<"$verb ROLE $PG_USER LOGIN PASSWORD '$pw'" >/dev/null
  for db in "$PG_DB" "$MLFLOW_DB"; do
    [[ -n "$(psql_admin "$port" -c "SELECT 1 FROM pg_database WHERE datname='$db'")" ]] ||
      psql_admin "$port" -c "CREATE DATABASE $db OWNER $PG_USER"
  done
}

start_pg() {
  local port="$1" bin; bin="$(pg_bin)"
  init_pg "$bin"
  rm -f "$PG_DATA/postmaster.pid" "$PG_SOCK"/.s.PGSQL.*   # stale after a hard stop; our PID file decides
  spawn "$RUN/postgres.pid" "$LOGS/postgres.log" setpriv --reuid=postgres --regid=postgres --init-groups -- \
    "$bin/postgres" -D "$PG_DATA" -p "$port" -k "$PG_SOCK" -c listen_addresses=127.0.0.1 \
    -c shared_buffers=16MB -c max_connections=100 -c fsync=off
  WAIT_PIDFILE="$RUN/postgres.pid" wait_for "PostgreSQL on port $port" 60 "$LOGS/postgres.log" "$bin/pg_isready" -q -h 127.0.0.1 -p "$port"
}

mlflow_ready() { curl -fsS -o /dev/null "http://127.0.0.1:$1/health"; }

# The backend URI on argv (visible in `ps`) has no password: libpq reads it from PGPASSFILE.
start_mlflow() {
  local port="$1" backend="$2"
  mkdir -p "$DIR/mlflow-artifacts"
  # No job-execution workers (MLflow 3's huey consumers: ~7 processes, ~2 GB, unused here).
  spawn "$RUN/mlflow.pid" "$LOGS/mlflow.log" env MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false PGPASSFILE="$PG_PASSFILE" \
    "$MGBENCH_PYTHON" -m mlflow server \
    --backend-store-uri "$backend" --artifacts-destination "$DIR/mlflow-artifacts" \
    --host 127.0.0.1 --port "$port" --workers 1
  WAIT_PIDFILE="$RUN/mlflow.pid" wait_for "MLflow server on port $port" "$START_TIMEOUT" "$LOGS/mlflow.log" mlflow_ready "$port"
}

# Both services on new ports (the databases in $PG_DATA are kept).
start_fresh() {
  cmd_stop >/dev/null 2>&1 || true
  mkdir -p "$RUN" "$LOGS"; chmod 755 "$BASE_DIR" "$DIR"
  local pw
  password_file "$PG_PASSWORD_FILE"
  pw="$(cat "$PG_PASSWORD_FILE")"
  PG_PORT="$(spare_port)"; MLFLOW_PORT="$(spare_port)"
  printf 'PG_PORT=%s\nMLFLOW_PORT=%s\n' "$PG_PORT" "$MLFLOW_PORT" >"$PORTS_FILE"
  start_pg "$PG_PORT"
  create_db "$PG_PORT" "$pw"
  echo "127.0.0.1:$PG_PORT:$MLFLOW_DB:$PG_USER:$pw" | write_private "$PG_PASSFILE"
  start_mlflow "$MLFLOW_PORT" "$(mlflow_backend)"
  write_private "$ENV_FILE" <<EOF
export MGBENCH_PG_URL=postgresql+psycopg2://$PG_USER:$pw@127.0.0.1:$PG_PORT/$PG_DB
export MGBENCH_MLFLOW_URL=http://127.0.0.1:$MLFLOW_PORT
EOF
}

mlflow_backend() { echo "postgresql+psycopg2://$PG_USER@127.0.0.1:$PG_PORT/$MLFLOW_DB"; }

port_taken() { port_open "$1"; }   # what clear_leftovers (lib.sh) waits on: every service is on 127.0.0.1

# Restart only the service that died, on its own port: MGBENCH_PG_URL and MGBENCH_MLFLOW_URL stay valid.
restart_dead() {
  source "$PORTS_FILE"
  mkdir -p "$RUN" "$LOGS"
  local name dead=() FIX="run slurm/services.sh start --fresh"
  for name in postgres mlflow; do pidfile_alive "$RUN/$name.pid" || dead+=("$name"); done
  (( ${#dead[@]} )) || { log "services already running ($ENV_FILE)"; return 0; }
  log "restarting ${dead[*]} (ports kept)"
  for name in "${dead[@]}"; do
    case "$name" in
      postgres) clear_leftovers postgres "$PG_PORT" "$FIX"; start_pg "$PG_PORT" ;;
      mlflow) clear_leftovers mlflow "$MLFLOW_PORT" "$FIX"; start_mlflow "$MLFLOW_PORT" "$(mlflow_backend)" ;;
    esac
  done
}

# start: restart what died on its own port; start --fresh (or a first start, or a start after stop): new ports.
cmd_start() {
  local t0=$SECONDS
  if [[ "${1:-}" != "--fresh" && -f "$PORTS_FILE" && -f "$ENV_FILE" ]]; then restart_dead
  else start_fresh; fi
  source "$PORTS_FILE"
  log "services up in $((SECONDS - t0))s: MGBENCH_PG_URL=postgresql+psycopg2://$PG_USER:***@127.0.0.1:$PG_PORT/$PG_DB" \
    "MGBENCH_MLFLOW_URL=http://127.0.0.1:$MLFLOW_PORT (env: $ENV_FILE, mode 600)"
}

cmd_stop() {
  stop_pidfile "$RUN/mlflow.pid"
  stop_pidfile "$RUN/postgres.pid" INT             # SIGINT = PostgreSQL's fast shutdown
  rm -f "$ENV_FILE" "$PG_PASSFILE" "$PORTS_FILE"
  log "services stopped"
}

cmd_status() {
  local d rc=0
  for d in postgres mlflow; do
    if pidfile_alive "$RUN/$d.pid"; then echo "$d: running (pid $(cat "$RUN/$d.pid"))"; else echo "$d: stopped"; rc=1; fi
  done
  [[ -f "$ENV_FILE" ]] && sed -E 's#(://[^:/@]*):[^@]*@#\1:***@#' "$ENV_FILE"   # password masked
  return $rc
}

cmd_env() {
  [[ -f "$ENV_FILE" ]] || die "services are not running (no $ENV_FILE): run slurm/services.sh start"
  cat "$ENV_FILE"
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start "${2:-}" ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) cmd_env ;;
  *) echo "usage: $0 {install|start [--fresh]|stop|status|env}" >&2; exit 2 ;;
esac
