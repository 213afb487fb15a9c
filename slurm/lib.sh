# Shared helpers for slurm/cluster.sh and slurm/services.sh (sourced, not run).
# Daemons run in the foreground under `setsid nohup`, one session each, PIDs in files.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BASE_DIR="${MGBENCH_SLURM_DIR:-/tmp/mgbench-slurm}"        # one private folder for everything
if [[ -z "${MGBENCH_PYTHON:-}" ]]; then                     # the Python that jobs and servers run
  if [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then MGBENCH_PYTHON="$REPO_ROOT/.venv/bin/python"
  else MGBENCH_PYTHON="$(command -v python3)"; fi
fi

die() { echo "error: $*" >&2; exit 1; }
log() { echo "[$(date +%T)] $*" >&2; }

# A PID is alive when /proc says so and it is not a zombie (PID 1 here does not reap).
pid_alive() {
  local pid="$1" state
  [[ -n "$pid" && -r "/proc/$pid/stat" ]] || return 1
  state="$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)"
  [[ -n "$state" && "$state" != "Z" && "$state" != "X" ]]
}

# Write stdin to FILE, mode 600 from its first byte (an existing file is replaced, never reused with its mode).
write_private() { rm -f "$1"; (umask 077; cat >"$1"); }

# A fresh random password (hex), kept in FILE (mode 600) and reused by later starts.
password_file() { [[ -s "$1" ]] || head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n' | write_private "$1"; chmod 600 "$1"; }

pidfile_alive() { [[ -f "$1" ]] && pid_alive "$(cat "$1")"; }

# Start "$@" in its own session, foreground, output to LOG; the PID goes to PIDFILE.
spawn() {
  local pidfile="$1" logfile="$2"; shift 2
  setsid nohup "$@" >>"$logfile" 2>&1 </dev/null &
  echo $! >"$pidfile"
}

# Stop the session started by spawn(): SIG to its process group, then KILL after a grace period.
stop_pidfile() {
  local pidfile="$1" sig="${2:-TERM}" pid i
  [[ -f "$pidfile" ]] || return 0
  pid="$(cat "$pidfile")"
  if pid_alive "$pid"; then
    kill -"$sig" -- "-$pid" 2>/dev/null || kill -"$sig" "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do pid_alive "$pid" || break; sleep 0.1; done
    if pid_alive "$pid"; then kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true; fi
  fi
  # Children of a stopped leader (e.g. MLflow workers) share its process group.
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

# Stop what is left of a dead daemon's session (slurmctld's slurmscriptd, MLflow's uvicorn worker, PostgreSQL's
# backends: they hold its port or its memory), then wait for its port to be free (`port_taken` of the calling
# script); else die with FIX, the command that gets out of it.
clear_leftovers() {
  local name="$1" port="$2" fix="$3" i
  stop_pidfile "$RUN/$name.pid" KILL
  for i in $(seq 1 50); do port_taken "$port" || break; sleep 0.1; done
  if port_taken "$port"; then die "$name's port $port is taken by another process: $fix"; fi
}

# A free TCP port on 127.0.0.1 (asked from the kernel).
spare_port() {
  "$MGBENCH_PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

port_open() { (exec 3<>"/dev/tcp/${2:-127.0.0.1}/$1") 2>/dev/null; }   # port [address]

# Wait until "$@" succeeds; on timeout (or death of $WAIT_PIDFILE) show the tail of LOGS and fail.
wait_for() {
  local what="$1" timeout="$2" logs="$3"; shift 3
  local t0=$SECONDS f
  until "$@" >/dev/null 2>&1; do
    local why=""
    (( SECONDS - t0 >= timeout )) && why="timed out after ${timeout}s"
    [[ -n "${WAIT_PIDFILE:-}" ]] && ! pidfile_alive "$WAIT_PIDFILE" && why="the process exited"
    if [[ -n "$why" ]]; then
      echo "error: $why waiting for $what" >&2
      for f in $logs; do [[ -f "$f" ]] && { echo "--- tail $f" >&2; tail -n 15 "$f" >&2; }; done
      return 1
    fi
    sleep 0.3
  done
}

# apt-get install the packages that are missing, with services kept from starting.
apt_install_missing() {
  local missing=() p created=0
  for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
  (( ${#missing[@]} )) || { log "packages present: $*"; return 0; }
  log "installing: ${missing[*]}"
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; created=1
  fi
  local rc=0
  { apt-get install -y -q --no-install-recommends "${missing[@]}" ||
      { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"; }; } \
    >>"${APT_LOG:-/dev/stderr}" 2>&1 || rc=$?
  (( created )) && rm -f /usr/sbin/policy-rc.d
  (( rc == 0 )) || die "apt-get install ${missing[*]} failed (rc=$rc)"
}
export DEBIAN_FRONTEND=noninteractive
