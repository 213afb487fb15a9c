#!/usr/bin/env bash
# A real single-node SLURM cluster (slurmctld, slurmd, slurmdbd + MariaDB, munge) with fake GPUs,
# everything in one private folder. Usage: slurm/cluster.sh {install|start|stop|status|env}
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
FAKE_GPUS="${MGBENCH_FAKE_GPUS:-2}"               # gres gpu count on the node
START_TIMEOUT="${MGBENCH_SLURM_TIMEOUT:-90}"      # seconds to wait for an idle node + sacct
NODE="$(hostname -s)"                             # SlurmctldHost must equal `hostname -s`
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)
PACKAGES=(munge slurmctld slurmd slurm-client mariadb-server slurmdbd slurm-wlm-mysql-plugin)

cmd_install() { APT_LOG="${APT_LOG:-}" apt_install_missing "${PACKAGES[@]}"; }

# Write slurm.conf, gres.conf and slurmdbd.conf for the ports chosen at this start.
write_configs() {
  local ctld_port="$1" slurmd_port="$2" dbd_port="$3" mysql_port="$4" node_line gpus="" i
  node_line="$(slurmd -C | head -n1)"                           # NodeName=... CPUs=... RealMemory=...
  mkdir -p "$DIR/gpu"
  for ((i = 0; i < FAKE_GPUS; i++)); do                          # symlinks to char devices: CUDA_VISIBLE_DEVICES works
    ln -sfn /dev/null "$DIR/gpu/nvidia$i"; gpus+="${gpus:+,}$DIR/gpu/nvidia$i"
  done
  cat >"$ETC/slurm.conf" <<EOF
# Written by slurm/cluster.sh: a private single-node test cluster (jobs run as root).
ClusterName=mgbench
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
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
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$dbd_port
AccountingStoragePass=$MUNGE_SOCK
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/none
${node_line/NodeName=$NODE/NodeName=$NODE NodeAddr=127.0.0.1 Gres=gpu:$FAKE_GPUS} State=UNKNOWN
PartitionName=gpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=cpu Nodes=$NODE MaxTime=INFINITE State=UP
EOF
  cat >"$ETC/gres.conf" <<EOF
AutoDetect=off
NodeName=$NODE Name=gpu File=$DIR/gpu/nvidia[0-$((FAKE_GPUS - 1))]
EOF
  cat >"$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=$NODE
DbdAddr=127.0.0.1
DbdPort=$dbd_port
SlurmUser=root
LogFile=$LOGS/slurmdbd.log
PidFile=$RUN/slurmdbd.daemon.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$mysql_port
StorageUser=slurm
StoragePass=$(cat "$DIR/mysql/slurm.password")
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$ETC/slurmdbd.conf"
}

start_munge() {
  mkdir -p "$DIR/munge"; chmod 755 "$DIR/munge"
  [[ -f "$DIR/munge/munge.key" ]] || { dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none; }
  chmod 400 "$DIR/munge/munge.key"
  spawn "$RUN/munged.pid" "$LOGS/munged.out" munged -F --force --socket="$MUNGE_SOCK" \
    --key-file="$DIR/munge/munge.key" --log-file="$LOGS/munged.log" \
    --pid-file="$RUN/munged.daemon.pid" --seed-file="$DIR/munge/munged.seed"
  WAIT_PIDFILE="$RUN/munged.pid" wait_for "munged" 15 "$LOGS/munged.out $LOGS/munged.log" munge -S "$MUNGE_SOCK" -n
}

mysql_cli() { mariadb --no-defaults -uroot --socket="$MYSQL_SOCK" "$@"; }

# MariaDB keeps its datadir across starts; the accounting database is dropped on each fresh start.
start_mariadb() {
  local port="$1" fresh=0
  mkdir -p "$DIR/mysql"
  if [[ ! -d "$DIR/mysql/data/mysql" ]]; then
    mariadb-install-db --no-defaults --datadir="$DIR/mysql/data" --user=root \
      --auth-root-authentication-method=socket --skip-test-db >"$LOGS/mariadb-install.log" 2>&1 ||
      { tail -n 15 "$LOGS/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
    fresh=1
  fi
  [[ -f "$DIR/mysql/slurm.password" ]] || { head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$DIR/mysql/slurm.password"; fresh=1; }
  spawn "$RUN/mariadbd.pid" "$LOGS/mariadbd.out" mariadbd --no-defaults --datadir="$DIR/mysql/data" \
    --user=root --bind-address=127.0.0.1 --port="$port" --socket="$MYSQL_SOCK" --skip-name-resolve \
    --innodb-buffer-pool-size=32M --log-error="$LOGS/mariadbd.log" --pid-file="$RUN/mariadbd.daemon.pid"
  WAIT_PIDFILE="$RUN/mariadbd.pid" wait_for "mariadbd" 60 "$LOGS/mariadbd.log $LOGS/mariadbd.out" mysql_cli -e "SELECT 1"
  local pw; pw="$(cat "$DIR/mysql/slurm.password")"
  mysql_cli -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pw';
    ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pw';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
    DROP DATABASE IF EXISTS slurm_acct_db;"
}

# Fresh slurm state each start: old drain reasons and job ids vanish.
cmd_start() {
  command -v slurmctld >/dev/null || die "slurm is not installed: run slurm/cluster.sh install"
  if all_alive && node_ready; then log "cluster already running ($SLURM_CONF_FILE)"; return 0; fi
  cmd_stop >/dev/null 2>&1 || true
  rm -rf "$DIR/state" "$DIR/spool" "$LOGS" "$RUN"
  mkdir -p "$ETC" "$RUN" "$LOGS" "$DIR/state" "$DIR/spool"; chmod 755 "$BASE_DIR" "$DIR"
  local t0=$SECONDS ctld_port slurmd_port dbd_port mysql_port
  ctld_port="$(spare_port)"; slurmd_port="$(spare_port)"; dbd_port="$(spare_port)"; mysql_port="$(spare_port)"
  start_munge
  start_mariadb "$mysql_port"
  write_configs "$ctld_port" "$slurmd_port" "$dbd_port" "$mysql_port"
  export SLURM_CONF="$SLURM_CONF_FILE"
  spawn "$RUN/slurmdbd.pid" "$LOGS/slurmdbd.out" slurmdbd -D
  WAIT_PIDFILE="$RUN/slurmdbd.pid" wait_for "slurmdbd on port $dbd_port" 60 "$LOGS/slurmdbd.log $LOGS/slurmdbd.out" port_open "$dbd_port"
  spawn "$RUN/slurmctld.pid" "$LOGS/slurmctld.out" slurmctld -D -i
  spawn "$RUN/slurmd.pid" "$LOGS/slurmd.out" slurmd -D -N "$NODE"
  wait_for "an idle node and a working sacct" "$START_TIMEOUT" \
    "$LOGS/slurmctld.log $LOGS/slurmd.log $LOGS/slurmdbd.log" node_ready ||
    { sinfo -N -o "%N %T %E" >&2 || true; exit 1; }
  log "cluster up in $((SECONDS - t0))s: SLURM_CONF=$SLURM_CONF_FILE"
}

# The node is idle (not drained/down) and sacct answers.
node_ready() {
  SLURM_CONF="$SLURM_CONF_FILE" sinfo -h -N -o "%T" 2>/dev/null | grep -qx "idle" &&
    SLURM_CONF="$SLURM_CONF_FILE" sacct -n -X >/dev/null 2>&1
}

all_alive() { local d; for d in "${DAEMONS[@]}"; do pidfile_alive "$RUN/$d.pid" || return 1; done; }

cmd_stop() {
  local i
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
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) cmd_env ;;
  *) echo "usage: $0 {install|start|stop|status|env}" >&2; exit 2 ;;
esac
