#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for trying the Slurm path and for the tests:
#   slurm/local-cluster.sh start      # installs Debian's Slurm if missing (as root), starts it, prints SLURM_CONF
#   export SLURM_CONF=~/.cache/tunefleet/local-slurm/slurm.conf
#   tunefleet submit recipe=lora cluster=local slurm.nodes=2
#   slurm/local-cluster.sh stop       # cancels jobs, stops every daemon, cleans /etc/hosts
# Also: install, status. Two slurmd "nodes" (node1, node2) and slurmctld share 127.0.0.1 with their
# own ports; munge authenticates through a private socket. State lives in $TUNEFLEET_SLURM_DIR.
set -euo pipefail

DIR="${TUNEFLEET_SLURM_DIR:-$HOME/.cache/tunefleet/local-slurm}"
CONF="$DIR/slurm.conf"
NODES=(node1 node2)
NODE_CPUS="${NODE_CPUS:-$(nproc)}"
CTLD_PORT="${TUNEFLEET_SLURM_PORT:-6817}"
HOSTS_MARK="# tunefleet-local-slurm"
export SLURM_CONF="$CONF"

say() { echo "[local-slurm] $*"; }

install() {
  if command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
      && command -v munged >/dev/null; then
    return 0
  fi
  if [ "$(id -u)" -ne 0 ]; then
    say "Slurm is not installed and installing it needs root: sudo apt-get install slurm-wlm slurmctld slurmd slurm-client munge"
    exit 1
  fi
  say "installing Debian's Slurm and munge"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
    slurm-wlm slurmctld slurmd slurm-client munge >/dev/null \
    || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
         slurm-wlm slurmctld slurmd slurm-client munge >/dev/null; }
}

running() { [ -f "$DIR/$1.pid" ] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }

write_conf() {
  mkdir -p "$DIR/munge" "$DIR/spool/ctld" "$DIR/log"
  for node in "${NODES[@]}"; do mkdir -p "$DIR/spool/$node"; done  # slurmd does not create its spool
  chmod 700 "$DIR/munge"
  local user; user="$(id -un)"
  cat >"$CONF" <<EOF
# Written by slurm/local-cluster.sh: two nodes on loopback.
ClusterName=tunefleet-local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=$user
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
CredType=cred/munge
# Keep every daemon on loopback; all nodes share 127.0.0.1 (distinct loopback addresses left jobs COMPLETING).
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
SwitchType=switch/none
JobRequeue=1
ReturnToService=2
KillWait=30
MinJobAge=600
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName=node1 NodeAddr=127.0.0.1 Port=17001 CPUs=$NODE_CPUS RealMemory=4000 State=UNKNOWN
NodeName=node2 NodeAddr=127.0.0.1 Port=17002 CPUs=$NODE_CPUS RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
}

hosts_add() {
  # Node names must resolve for anything that connects to them (the torch rendezvous on node1).
  if ! grep -q "$HOSTS_MARK" /etc/hosts 2>/dev/null; then
    for node in "${NODES[@]}"; do echo "127.0.0.1 $node $HOSTS_MARK" >>/etc/hosts; done
  fi
}

hosts_remove() {
  if grep -q "$HOSTS_MARK" /etc/hosts 2>/dev/null; then
    # /etc/hosts may be a bind mount: rewrite it in place rather than replacing the file.
    local kept; kept="$(grep -v "$HOSTS_MARK" /etc/hosts)"
    printf '%s\n' "$kept" >/etc/hosts
  fi
}

start() {
  install
  if running slurmctld; then
    say "already running"; print_env; return 0
  fi
  write_conf
  hosts_add
  [ -f "$DIR/munge/munge.key" ] || { dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 2>/dev/null; }
  chmod 400 "$DIR/munge/munge.key"
  munged --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
    --pid-file="$DIR/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/seed" --force
  slurmctld -f "$CONF"
  for node in "${NODES[@]}"; do slurmd -N "$node" -f "$CONF"; done
  local deadline=$((SECONDS + 60))
  until [ "$(sinfo -h -o '%T' 2>/dev/null | grep -c idle || true)" -ge 1 ] \
      && [ "$(sinfo -h -N -o '%N %T' 2>/dev/null | grep -c ' idle' || true)" -eq "${#NODES[@]}" ]; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      say "nodes did not come up within 60 s; logs in $DIR/log"; sinfo -N || true; exit 1
    fi
    sleep 0.5
  done
  say "two nodes idle"
  print_env
}

print_env() { echo "export SLURM_CONF=$CONF"; }

stop() {
  if running slurmctld; then scancel --full --quiet --user="$(id -un)" 2>/dev/null || true; fi
  for name in node1 node2 slurmctld munged; do
    if running "$name"; then kill -TERM "$(cat "$DIR/$name.pid")" 2>/dev/null || true; fi
  done
  local deadline=$((SECONDS + 20))
  for name in node1 node2 slurmctld munged; do
    while running "$name" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
    if running "$name"; then kill -KILL "$(cat "$DIR/$name.pid")" 2>/dev/null || true; fi
    rm -f "$DIR/$name.pid"
  done
  hosts_remove
  say "stopped"
}

status() {
  if running slurmctld; then sinfo -N; squeue; else say "not running"; fi
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
