#!/usr/bin/env bash
# A real single-node SLURM cluster (slurmctld, slurmd, slurmdbd + MariaDB, munge) with fake GPUs,
# everything in one private folder, every daemon on loopback (127.0.0.1).
# Usage: slurm/cluster.sh {install|start [--fresh]|stop|status|env}
#   start           first start: a fresh cluster; later: restarts only the daemons that died, keeping state
#                   (running jobs and their slurmstepd, the job id sequence, accounting)
#   start --fresh   stop everything, wipe state, spool and accounting, new ports
#   stop            stops every daemon and every job step of this cluster (state kept for the next start)
#   eval "$(slurm/cluster.sh env)"   # sets SLURM_CONF for sbatch/sacct/submitit
# Knobs (environment): MGBENCH_SLURM_DIR (folder, default /tmp/mgbench-slurm), MGBENCH_FAKE_GPUS
# (fake GPUs on the node, default 2), MGBENCH_SLURM_TIMEOUT (seconds start waits, default 90).
# See /work/shared/notes/slurm-single-node.md for the facts behind each setting.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DIR="$BASE_DIR/cluster"                          # this script's part of the private folder
ETC="$DIR/etc"; RUN="$DIR/run"; LOGS="$DIR/log"
SLURM_CONF_FILE="$ETC/slurm.conf"
MUNGE_SOCK="$DIR/munge/munge.socket.2"            # private munge socket (its folder: mode 755)
MYSQL_SOCK="$DIR/mysql/mysqld.sock"
DB_PASSWORD_FILE="$DIR/mysql/slurm.password"      # MariaDB password of slurmdbd (mode 600)
PORTS_FILE="$ETC/ports.sh"                        # ports chosen by a fresh start, reused by restarts
FRESH=0                                           # 1: wipe state and accounting (start --fresh, first start)
FAKE_GPUS="${MGBENCH_FAKE_GPUS:-2}"               # gres gpu count on the node
START_TIMEOUT="${MGBENCH_SLURM_TIMEOUT:-90}"      # seconds to wait for an idle node + sacct
NODE="$(hostname -s)"                             # SlurmctldHost must equal `hostname -s`
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)
PACKAGES=(munge slurmctld slurmd slurm-client mariadb-server slurmdbd slurm-wlm-mysql-plugin)

cmd_install() { APT_LOG="${APT_LOG:-}" apt_install_missing "${PACKAGES[@]}"; }

# The address the daemons bind: with NoInAddrAny Slurm binds what `hostname` resolves to (not 0.0.0.0).
# A loopback one (127.x) is used for every address. Else: warn, keep 127.0.0.1 and let them bind 0.0.0.0.
choose_addr() {
  ADDR="$(getent ahostsv4 "$(hostname)" 2>/dev/null | awk 'NR == 1 {print $1}')"
  COMM_PARAMS="CommunicationParameters=NoCtldInAddrAny,NoInAddrAny"
  DBD_COMM_PARAMS="CommunicationParameters=NoInAddrAny"   # undocumented in slurmdbd.conf(5), honoured by 22.05
  if [[ "$ADDR" != 127.* ]]; then
    log "warning: $(hostname) resolves to '${ADDR:-nothing}', not loopback: Slurm daemons will listen on 0.0.0.0"
    ADDR=127.0.0.1; COMM_PARAMS=""; DBD_COMM_PARAMS=""
  fi
}

# Write slurm.conf, gres.conf and slurmdbd.conf for the address and ports chosen by the fresh start.
write_configs() {
  local node_line gpus="" i
  node_line="$(slurmd -C | head -n1)"                           # NodeName=... CPUs=... RealMemory=...
  mkdir -p "$DIR/gpu"
  for ((i = 0; i < FAKE_GPUS; i++)); do                          # symlinks to char devices: CUDA_VISIBLE_DEVICES works
    ln -sfn /dev/null "$DIR/gpu/nvidia$i"; gpus+="${gpus:+,}$DIR/gpu/nvidia$i"
  done
  cat >"$ETC/slurm.conf" <<EOF
# Written by slurm/cluster.sh: a private single-node test cluster (jobs run as root).
ClusterName=mgbench
SlurmctldHost=$NODE($ADDR)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCK,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$RUN/slurmctld.daemon.pid
SlurmdPidFile=$RUN/slurmd.daemon.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobContainerType=job_container/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=512
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=2,bf_interval=2
MailProg=/bin/true
ReturnToService=2
MinJobAge=300
KillWait=5
GresTypes=gpu
$COMM_PARAMS
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$ADDR
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$MUNGE_SOCK
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/none
${node_line/NodeName=$NODE/NodeName=$NODE NodeAddr=$ADDR Gres=gpu:$FAKE_GPUS} State=UNKNOWN
PartitionName=gpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=cpu Nodes=$NODE MaxTime=INFINITE State=UP
EOF
  cat >"$ETC/gres.conf" <<EOF
AutoDetect=off
NodeName=$NODE Name=gpu File=$DIR/gpu/nvidia[0-$((FAKE_GPUS - 1))]
EOF
  write_private "$ETC/slurmdbd.conf" <<EOF   # it holds the MariaDB password
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=$NODE
DbdAddr=$ADDR
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$LOGS/slurmdbd.log
PidFile=$RUN/slurmdbd.daemon.pid
$DBD_COMM_PARAMS
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=slurm
StoragePass=$(cat "$DB_PASSWORD_FILE")
StorageLoc=slurm_acct_db
EOF
}

start_munged() {
  mkdir -p "$DIR/munge"; chmod 755 "$DIR/munge"
  [[ -f "$DIR/munge/munge.key" ]] || head -c 1024 /dev/urandom | write_private "$DIR/munge/munge.key"
  chmod 400 "$DIR/munge/munge.key"
  spawn "$RUN/munged.pid" "$LOGS/munged.out" munged -F --force --socket="$MUNGE_SOCK" \
    --key-file="$DIR/munge/munge.key" --log-file="$LOGS/munged.log" \
    --pid-file="$RUN/munged.daemon.pid" --seed-file="$DIR/munge/munged.seed"
  WAIT_PIDFILE="$RUN/munged.pid" wait_for "munged" 15 "$LOGS/munged.out $LOGS/munged.log" munge -S "$MUNGE_SOCK" -n
}

mysql_cli() { mariadb --no-defaults -uroot --socket="$MYSQL_SOCK" "$@"; }

# MariaDB keeps its datadir across starts; only a fresh start drops the accounting database.
start_mariadbd() {
  mkdir -p "$DIR/mysql"
  if [[ ! -d "$DIR/mysql/data/mysql" ]]; then
    mariadb-install-db --no-defaults --datadir="$DIR/mysql/data" --user=root \
      --auth-root-authentication-method=socket --skip-test-db >"$LOGS/mariadb-install.log" 2>&1 ||
      { tail -n 15 "$LOGS/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
  fi
  spawn "$RUN/mariadbd.pid" "$LOGS/mariadbd.out" mariadbd --no-defaults --datadir="$DIR/mysql/data" \
    --user=root --bind-address=127.0.0.1 --port="$MYSQL_PORT" --socket="$MYSQL_SOCK" --skip-name-resolve \
    --innodb-buffer-pool-size=32M --log-error="$LOGS/mariadbd.log" --pid-file="$RUN/mariadbd.daemon.pid"
  WAIT_PIDFILE="$RUN/mariadbd.pid" wait_for "mariadbd" 60 "$LOGS/mariadbd.log $LOGS/mariadbd.out" mysql_cli -e "SELECT 1"
  local pw; pw="$(cat "$DB_PASSWORD_FILE")"   # SQL holding it goes on stdin, never on argv (`ps`)
  mysql_cli <<<"CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pw';
    ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pw';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
  (( FRESH )) && mysql_cli -e "DROP DATABASE IF EXISTS slurm_acct_db;"
  return 0
}

start_slurmdbd() {
  spawn "$RUN/slurmdbd.pid" "$LOGS/slurmdbd.out" slurmdbd -D
  WAIT_PIDFILE="$RUN/slurmdbd.pid" wait_for "slurmdbd on port $DBD_PORT" 60 "$LOGS/slurmdbd.log $LOGS/slurmdbd.out" port_open "$DBD_PORT" "$ADDR"
}

# -i: recover what the state folder holds (jobs, next job id) and go on past a damaged file.
start_slurmctld() {
  spawn "$RUN/slurmctld.pid" "$LOGS/slurmctld.out" slurmctld -D -i
  WAIT_PIDFILE="$RUN/slurmctld.pid" wait_for "slurmctld on port $CTLD_PORT" 60 "$LOGS/slurmctld.log $LOGS/slurmctld.out" port_open "$CTLD_PORT" "$ADDR"
}

# slurmd re-attaches to the slurmstepd of jobs that kept running while it was away (their sockets in spool/).
start_slurmd() {
  spawn "$RUN/slurmd.pid" "$LOGS/slurmd.out" slurmd -D -N "$NODE"
  WAIT_PIDFILE="$RUN/slurmd.pid" wait_for "slurmd on port $SLURMD_PORT" 60 "$LOGS/slurmd.log $LOGS/slurmd.out" port_open "$SLURMD_PORT" "$ADDR"
}

# A fresh cluster: new ports, configs and passwords kept, state, spool and accounting wiped.
start_fresh() {
  cmd_stop >/dev/null 2>&1 || true
  rm -rf "$DIR/state" "$DIR/spool" "$LOGS" "$RUN"
  mkdir -p "$ETC" "$RUN" "$LOGS" "$DIR/state" "$DIR/spool" "$DIR/mysql"; chmod 755 "$BASE_DIR" "$DIR"
  password_file "$DB_PASSWORD_FILE"
  choose_addr
  CTLD_PORT="$(spare_port)"; SLURMD_PORT="$(spare_port)"; DBD_PORT="$(spare_port)"; MYSQL_PORT="$(spare_port)"
  printf 'ADDR=%s\nCTLD_PORT=%s\nSLURMD_PORT=%s\nDBD_PORT=%s\nMYSQL_PORT=%s\n' \
    "$ADDR" "$CTLD_PORT" "$SLURMD_PORT" "$DBD_PORT" "$MYSQL_PORT" >"$PORTS_FILE"
  write_configs
  local d; for d in "${DAEMONS[@]}"; do "start_$d"; done
}

# Restart only the daemons that died, on the ports and state of the running cluster.
restart_dead() {
  source "$PORTS_FILE"
  mkdir -p "$RUN" "$LOGS"
  local d dead=()
  for d in "${DAEMONS[@]}"; do pidfile_alive "$RUN/$d.pid" || dead+=("$d"); done
  (( ${#dead[@]} )) || { log "cluster already running ($SLURM_CONF_FILE)"; return 0; }
  log "restarting ${dead[*]} (state kept)"
  for d in "${dead[@]}"; do
    clear_leftovers "$d" "$(daemon_port "$d")" "run slurm/cluster.sh stop && slurm/cluster.sh start --fresh"
    "start_$d"
  done
}

port_taken() { [[ -n "$1" ]] && { port_open "$1" 127.0.0.1 || port_open "$1" "$ADDR"; }; }

daemon_port() {
  case "$1" in slurmctld) echo "$CTLD_PORT" ;; slurmd) echo "$SLURMD_PORT" ;; slurmdbd) echo "$DBD_PORT" ;;
    mariadbd) echo "$MYSQL_PORT" ;; *) echo "" ;; esac
}

# start: restart what died, keeping jobs, job ids and accounting; start --fresh (or a first start): wipe.
cmd_start() {
  command -v slurmctld >/dev/null || die "slurm is not installed: run slurm/cluster.sh install"
  export SLURM_CONF="$SLURM_CONF_FILE"   # slurmd hands it to every slurmstepd: how stop finds them
  local t0=$SECONDS
  if [[ "${1:-}" == "--fresh" ]]; then FRESH=1; start_fresh
  elif [[ -f "$PORTS_FILE" && -d "$DIR/state" ]]; then restart_dead
  elif all_alive && node_ready; then log "cluster already running ($SLURM_CONF_FILE; no $PORTS_FILE: restart it with start --fresh)"
  else FRESH=1; start_fresh; fi
  wait_for "a working node and sacct" "$START_TIMEOUT" \
    "$LOGS/slurmctld.log $LOGS/slurmd.log $LOGS/slurmdbd.log" node_ready ||
    { sinfo -N -o "%N %T %E" >&2 || true; exit 1; }
  log "cluster up in $((SECONDS - t0))s: SLURM_CONF=$SLURM_CONF_FILE"
}

# The node takes jobs (idle, mixed or allocated; not down, drained or invalid) and sacct answers.
node_ready() {
  SLURM_CONF="$SLURM_CONF_FILE" sinfo -h -N -o "%T" 2>/dev/null | grep -qxE "idle|mixed|allocated|completing" &&
    SLURM_CONF="$SLURM_CONF_FILE" sacct -n -X >/dev/null 2>&1
}

# PIDs of this cluster's slurmstepd processes (they inherit SLURM_CONF from slurmd; they outlive it).
job_steps() {
  local p name
  for p in /proc/[0-9]*; do
    { read -r name <"$p/comm"; } 2>/dev/null || continue
    [[ "$name" == slurmstepd ]] || continue
    tr '\0' '\n' 2>/dev/null <"$p/environ" | grep -qxF "SLURM_CONF=$SLURM_CONF_FILE" && echo "${p#/proc/}"
  done
  return 0
}

# The PIDs given and all their descendants (job scripts run in their own process groups). No forks per process.
with_descendants() {
  local tree=" $* " p line fields grew=1
  while (( grew )); do
    grew=0
    for p in /proc/[0-9]*; do
      { read -r line <"$p/stat"; } 2>/dev/null || continue
      read -ra fields <<<"${line##*) }"   # state ppid pgrp ...
      if [[ "$tree" == *" ${fields[1]} "* && "$tree" != *" ${p#/proc/} "* ]]; then tree+="${p#/proc/} "; grew=1; fi
    done
  done
  echo "$tree"
}

# End every job step of this cluster and its processes: TERM, up to KillWait, then KILL.
stop_job_steps() {
  local steps pids p i
  steps="$(job_steps)"; [[ -n "$steps" ]] || return 0
  pids="$(with_descendants $steps)"
  for p in $pids; do kill -TERM "$p" 2>/dev/null || true; done
  for i in $(seq 1 50); do any_alive $pids || break; sleep 0.1; done
  for p in $pids; do if pid_alive "$p"; then kill -KILL "$p" 2>/dev/null || true; fi; done
  log "stopped job steps: $(echo $steps)"
}

all_alive() { local d; for d in "${DAEMONS[@]}"; do pidfile_alive "$RUN/$d.pid" || return 1; done; }

any_alive() { local p; for p in "$@"; do pid_alive "$p" && return 0; done; return 1; }

# slurmd first (it would restart nothing, but it must not see its steps vanish), then the job steps.
cmd_stop() {
  local i
  stop_pidfile "$RUN/slurmd.pid"
  stop_job_steps
  for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do stop_pidfile "$RUN/${DAEMONS[i]}.pid"; done
  log "cluster stopped"
}

cmd_status() {
  local d rc=0
  for d in "${DAEMONS[@]}"; do
    if pidfile_alive "$RUN/$d.pid"; then echo "$d: running (pid $(cat "$RUN/$d.pid"))"; else echo "$d: stopped"; rc=1; fi
  done
  if (( rc == 0 )); then SLURM_CONF="$SLURM_CONF_FILE" sinfo -N -o "%N %P %T %G %E" || rc=1; fi
  return $rc
}

cmd_env() {
  [[ -f "$SLURM_CONF_FILE" ]] || die "no cluster config at $SLURM_CONF_FILE: run slurm/cluster.sh start"
  echo "export SLURM_CONF=$SLURM_CONF_FILE"
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start "${2:-}" ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) cmd_env ;;
  *) echo "usage: $0 {install|start|stop|status|env}" >&2; exit 2 ;;
esac
