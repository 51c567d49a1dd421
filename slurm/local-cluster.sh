#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for trying the Slurm path and for the tests:
#   sudo slurm/local-cluster.sh start   # installs Debian's Slurm + munge if missing, starts it, prints SLURM_CONF
#   export SLURM_CONF=~/.cache/tunefleet/local-slurm/slurm.conf
#   tunefleet submit recipe=lora cluster=local slurm.nodes=2
#   sudo slurm/local-cluster.sh stop    # cancels jobs, stops every daemon, cleans /etc/hosts
# Also: install, status. Two slurmd "nodes" (node1, node2) and slurmctld share 127.0.0.1, each on its
# own port; munge authenticates through a private socket. Nothing outside the state directory is
# touched except /etc/hosts (one marked line while the cluster runs).
#
# Settings (environment):
#   TUNEFLEET_SLURM_DIR        state directory: slurm.conf, munge key/socket, spool, logs, PID files
#                              (default ~/.cache/tunefleet/local-slurm; under sudo, the invoking user's home)
#   NODE_CPUS                  CPUs per node (default: this machine's core count)
#   TUNEFLEET_SLURM_PORT       slurmctld port (default 6817)
#   TUNEFLEET_SLURM_NODE_PORT  node1's slurmd port; node2 uses the next one (default 17001)
# Two clusters (two state directories with their own ports) can run side by side.
set -euo pipefail

# The daemons live in /usr/sbin, which a normal user's PATH may lack.
PATH="$PATH:/usr/sbin:/sbin"

# Under sudo, keep the cluster in the invoking user's home: that user's sbatch/squeue must read
# slurm.conf and reach the munge socket, and /root is closed to them.
OWNER_HOME="$HOME"
if [ "$(id -u)" -eq 0 ] && [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ]; then
  sudo_home="$(getent passwd "$SUDO_USER" | cut -d: -f6 || true)"
  if [ -d "$sudo_home" ]; then OWNER_HOME="$sudo_home"; fi
fi
DIR="${TUNEFLEET_SLURM_DIR:-$OWNER_HOME/.cache/tunefleet/local-slurm}"
DIR="$(realpath -m "$DIR")"  # slurm.conf needs absolute paths
CONF="$DIR/slurm.conf"
NODES=(node1 node2)
# PID-file names of the daemons, in the order they are stopped (munged last: the others use it).
DAEMONS=("${NODES[@]}" slurmctld munged)
NODE_CPUS="${NODE_CPUS:-$(nproc)}"
CTLD_PORT="${TUNEFLEET_SLURM_PORT:-6817}"
NODE_PORT="${TUNEFLEET_SLURM_NODE_PORT:-17001}"
KILL_WAIT=30
PACKAGES=(slurm-wlm slurmctld slurmd slurm-client munge)
# The /etc/hosts line this cluster adds; the state directory in the mark keeps two clusters' lines apart.
HOSTS_LINE="127.0.0.1 ${NODES[*]} # tunefleet-local-slurm $DIR"
# Every client command below (sinfo, squeue, scancel) must talk to this cluster.
export SLURM_CONF="$CONF"

say() { echo "[local-slurm] $*"; }
die() { say "$*" >&2; exit 1; }

need_root() {
  [ "$(id -u)" -eq 0 ] || die "$1 needs root (slurmd starts jobs as their users; node names go into /etc/hosts): sudo $0 $1"
}

# PID of daemon $1 (node1, node2, slurmctld, munged) from its PID file, only if that process is alive
# and really ours: its command line names a file in DIR (PID files outlive reboots, PIDs get reused).
pid_of() {
  local file="$DIR/$1.pid" pid
  # The file may vanish under us: munged removes its own when it exits.
  pid="$(cat "$file" 2>/dev/null)" || return 1
  [ -n "$pid" ] || return 1
  [ -r "/proc/$pid/cmdline" ] || return 1
  [[ "$(tr '\0' ' ' <"/proc/$pid/cmdline")" == *"$DIR/"* ]] || return 1
  echo "$pid"
}

running() { pid_of "$1" >/dev/null; }

install() {
  local missing=() cmd
  for cmd in sbatch slurmctld slurmd munged; do command -v "$cmd" >/dev/null || missing+=("$cmd"); done
  [ "${#missing[@]}" -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || die "Slurm is not installed (${missing[*]} missing) and installing it needs root: sudo $0 install  (or: sudo apt-get install --no-install-recommends ${PACKAGES[*]})"
  say "installing Debian's Slurm and munge: ${PACKAGES[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # A fresh image has no package lists: update them only if the first try cannot find the packages.
  apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null; }
  for cmd in sbatch slurmctld slurmd munged; do command -v "$cmd" >/dev/null || die "installed, but $cmd is still missing"; done
}

write_conf() {
  mkdir -p "$DIR/munge" "$DIR/spool/ctld" "$DIR/log"
  local node port="$NODE_PORT"
  for node in "${NODES[@]}"; do mkdir -p "$DIR/spool/$node"; done  # slurmd does not create its spool
  # 755, not 700: other users' client commands connect to the socket in it (the key itself is 0400).
  chmod 755 "$DIR" "$DIR/munge"
  {
    cat <<EOF
# Written by slurm/local-cluster.sh: two nodes on loopback, jobs run as their submitters (root included).
ClusterName=tunefleet-local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
DisableRootJobs=NO
AuthType=auth/munge
CredType=cred/munge
# Our own munged. cred_expire stays at its default (120 s), which is also how long a requeued job
# waits before it may start again: as on a real cluster (\`scontrol update JobId=N StartTime=now\` skips it).
AuthInfo=socket=$DIR/munge/munge.socket
# Keep every daemon on loopback; all nodes share 127.0.0.1 (distinct loopback addresses left jobs COMPLETING).
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
# Trust the CPUs/memory below even where the machine has fewer (else slurmd drains the node).
SlurmdParameters=config_overrides
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/%n.log
# No cgroups here: track job processes by parentage, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
SwitchType=switch/none
JobRequeue=1
# A node that was down (e.g. stopped with a job on it) comes back as soon as its slurmd registers.
ReturnToService=2
# Seconds between SIGTERM and SIGKILL when a job is cancelled or runs out of time.
KillWait=$KILL_WAIT
# No accounting (sacct knows nothing): finished jobs stay visible to \`scontrol show job\` for 10 minutes.
MinJobAge=600
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
# No mail on this machine (the default, /bin/mail, is missing: slurmctld logs an error at each start).
MailProg=/bin/true
# Two stand-in GPUs per node (type "fake"), so that GPU requests (--gpus-per-node=2, fake:2) are
# scheduled as at a GPU site: Slurm sets SLURM_GPUS_ON_NODE and CUDA_VISIBLE_DEVICES in the job.
# Their device files are /dev/null and /dev/zero (gres.conf); there is no CUDA behind them.
GresTypes=gpu
EOF
    printf 'AutoDetect=off\nName=gpu Type=fake File=/dev/null\nName=gpu Type=fake File=/dev/zero\n' >"$DIR/gres.conf"
    for node in "${NODES[@]}"; do
      echo "NodeName=$node NodeAddr=127.0.0.1 Port=$port CPUs=$NODE_CPUS RealMemory=4000 Gres=gpu:fake:2 State=UNKNOWN"
      port=$((port + 1))
    done
    local IFS=,
    echo "PartitionName=debug Nodes=${NODES[*]} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"
  } >"$CONF"
  chmod 644 "$CONF"
}

# Node names must resolve for anything that connects to them (the torch rendezvous on node1).
hosts_add() {
  grep -qxF -- "$HOSTS_LINE" /etc/hosts 2>/dev/null && return 0
  # Start on a fresh line even if the file does not end with a newline.
  if [ -s /etc/hosts ] && [ -n "$(tail -c1 /etc/hosts)" ]; then echo >>/etc/hosts; fi
  echo "$HOSTS_LINE" >>/etc/hosts || die "cannot write /etc/hosts"
}

hosts_remove() {
  grep -qxF -- "$HOSTS_LINE" /etc/hosts 2>/dev/null || return 0
  # Rewrite in place rather than replacing the file: /etc/hosts may be a bind mount.
  local kept
  kept="$(grep -vxF -- "$HOSTS_LINE" /etc/hosts || true)"
  printf '%s\n' "$kept" >/etc/hosts
}

# Something already listens on 127.0.0.1:$1 (another cluster, a system slurmctld)?
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

idle_nodes() { sinfo -h -N -o '%N %T' 2>/dev/null | awk '$2 == "idle"' | wc -l; }

# Start failed: show why, take down whatever did start, fail.
fail_start() {
  say "start failed: $1" >&2
  local log
  for log in "$DIR"/log/*.log; do
    if [ -f "$log" ]; then echo "--- $log (last lines)" >&2; tail -n 5 "$log" >&2; fi
  done
  stop >&2 || true
  exit 1
}

start() {
  install
  local name down=() up=()
  for name in "${DAEMONS[@]}"; do
    if running "$name"; then up+=("$name"); else down+=("$name"); fi
  done
  if [ "${#down[@]}" -eq 0 ]; then
    say "already running ($DIR)"
    print_env
    return 0
  fi
  need_root start
  if [ "${#up[@]}" -gt 0 ]; then
    say "partly running (${down[*]} not running): restarting"
    stop
  fi
  local began="$SECONDS" port
  for port in "$CTLD_PORT" $(seq "$NODE_PORT" $((NODE_PORT + ${#NODES[@]} - 1))); do
    if port_in_use "$port"; then
      die "port $port is taken (another Slurm?): pick free ones with TUNEFLEET_SLURM_PORT / TUNEFLEET_SLURM_NODE_PORT"
    fi
  done
  write_conf
  hosts_add
  for name in "${DAEMONS[@]}"; do rm -f "$DIR/$name.pid"; done
  if [ ! -s "$DIR/munge/munge.key" ]; then
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
  fi
  chmod 400 "$DIR/munge/munge.key"
  # --force: the key's parent directories (a user's home) need not pass munged's ownership checks.
  munged --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" --pid-file="$DIR/munged.pid" \
    --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/seed" --force || fail_start "munged did not start"
  slurmctld -f "$CONF" || fail_start "slurmctld did not start"
  for name in "${NODES[@]}"; do slurmd -N "$name" -f "$CONF" || fail_start "slurmd $name did not start"; done
  # The daemons fork into the background at once; wait until both nodes have registered and are idle.
  local deadline=$((SECONDS + 60))
  while [ "$(idle_nodes)" -lt "${#NODES[@]}" ]; do
    if [ $((SECONDS - began)) -ge 5 ]; then
      for name in "${DAEMONS[@]}"; do running "$name" || fail_start "$name exited"; done
    fi
    [ "$SECONDS" -lt "$deadline" ] || fail_start "nodes not idle within 60 s: $(sinfo -h -N -o '%N=%T' 2>&1 | tr '\n' ' ')"
    sleep 0.3
  done
  say "up: ${NODES[*]} idle, $NODE_CPUS CPUs each ($((SECONDS - began)) s; state in $DIR)"
  print_env
}

print_env() {
  say "Slurm's client commands need its config; in your shell:"
  printf 'export SLURM_CONF=%q\n' "$CONF"
}

# slurmstepd processes (one per job step) of this cluster: they keep their node's log in DIR open.
# They ignore SIGTERM and outlive slurmd, so a stop that could not end its jobs kills them (and their tasks).
our_steps() {
  local pid fd
  for pid in $(pgrep -x slurmstepd || true); do
    for fd in "/proc/$pid/fd/"*; do
      if [[ "$(readlink "$fd" 2>/dev/null || true)" == "$DIR/"* ]]; then echo "$pid"; break; fi
    done
  done
}

kill_tree() {
  local pid child
  for pid in "$@"; do
    for child in $(pgrep -P "$pid" || true); do kill_tree "$child"; done
    kill -KILL "$pid" 2>/dev/null || true
  done
}

# SIGTERM the daemons named, wait up to $1 seconds for them to exit, SIGKILL whatever is left.
stop_daemons() {
  local wait_s="$1" name pid pids=()
  shift
  for name in "$@"; do
    if pid="$(pid_of "$name")"; then pids+=("$pid"); kill -TERM "$pid" 2>/dev/null || true; fi
  done
  local deadline=$((SECONDS + wait_s))
  for name in "$@"; do
    while running "$name" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
    if pid="$(pid_of "$name")"; then
      say "$name did not exit on SIGTERM: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$DIR/$name.pid"
  done
  wait_reaped "${pids[@]}"
}

# An exited daemon stays a zombie until init reaps it (up to ~2 s in some containers): wait (at most
# 5 s) for that too, so that `pgrep slurm` right after a stop finds nothing.
wait_reaped() {
  local pid deadline=$((SECONDS + 5))
  for pid in "$@"; do
    while [ -e "/proc/$pid" ] && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
  done
}

stop() {
  need_root stop
  local began="$SECONDS" job_ids=() steps=()
  mapfile -t steps < <(our_steps)  # to wait for their exit below
  if running slurmctld; then
    mapfile -t job_ids < <(squeue -h -o '%A' 2>/dev/null | sort -u || true)
    if [ "${#job_ids[@]}" -gt 0 ]; then
      say "cancelling jobs: ${job_ids[*]}"
      scancel --quiet "${job_ids[@]}" || true
      # Cancelled jobs get SIGTERM, then SIGKILL after KillWait: wait for them to end so that no
      # slurmstepd (which ignores SIGTERM) is left behind when slurmd goes.
      local deadline=$((SECONDS + KILL_WAIT + 15))
      while [ -n "$(squeue -h -o '%A' 2>/dev/null || true)" ] && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.3; done
    fi
  fi
  stop_daemons 20 "${NODES[@]}" slurmctld
  stop_daemons 10 munged
  local leftover=()
  mapfile -t leftover < <(our_steps)
  if [ "${#leftover[@]}" -gt 0 ]; then
    say "killing leftover job steps (slurmstepd ${leftover[*]}) and their processes"
    kill_tree "${leftover[@]}"
  fi
  wait_reaped "${steps[@]}" "${leftover[@]}"
  hosts_remove
  say "stopped ($((SECONDS - began)) s)"
}

status() {
  local name pid alive=0
  for name in "${DAEMONS[@]}"; do
    if pid="$(pid_of "$name")"; then say "$name: running (pid $pid)"; alive=$((alive + 1)); else say "$name: not running"; fi
  done
  if running slurmctld; then
    sinfo -N
    squeue
    print_env
  fi
  # Exit 0 only when the whole cluster is up.
  [ "$alive" -eq "${#DAEMONS[@]}" ]
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 install|start|stop|status   (state in $DIR)" >&2; exit 2 ;;
esac
