#!/usr/bin/env bash
# A real single-node Slurm on this machine, for the tests of the Slurm path (tests/slurm/).
# Partitions: debug (the default, no limits), short (MaxTime=20 min, MaxNodes=1) and maint (whose
# only node, `ghost`, is drained), so the checks of a request against a partition's limits and of
# jobs that can never start run against a real controller.
#
#   .ci/slurm.sh start    install (Debian: slurmctld slurmd slurm-client munge) if needed, start
#                         munged, slurmctld and slurmd, wait until the node is idle, then print
#                         the lines to eval:  eval "$(.ci/slurm.sh start)"
#   .ci/slurm.sh env      print those lines again (export SLURM_CONF=...; export PATH=...)
#   .ci/slurm.sh status   exit 0 when the controller answers and the node is up
#   .ci/slurm.sh stop     stop the slurmd/slurmctld (and munged) that `start` started
#   .ci/slurm.sh clean    stop, then remove the state dir
#
# It is idempotent: `start` on a running cluster checks it and prints the exports.
# Everything lives under $NEOX_SLURM_DIR (default /tmp/neox-slurm): slurm.conf, state, logs,
# pid files, and bin/sacct, a stand-in for sacct (there is no accounting daemon here; see
# .ci/slurm/sacct). Nothing is written to /etc/slurm. Every process that calls Slurm needs the
# exported SLURM_CONF, and PATH with bin/ first.
# Exit codes: 0 ok, 2 not root, 3 cannot install, 4 did not come up (logs are printed).
set -euo pipefail

STATE="${NEOX_SLURM_DIR:-/tmp/neox-slurm}"
CONF="$STATE/slurm.conf"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# The node under this machine's own name, as on a real cluster (jobs see it in SLURM_NODELIST and
# use it as MASTER_ADDR); localhost only where that name does not resolve. (Slurm 22.05 refuses a
# second node beside one named localhost, so the drained node below needs the real name.)
NODE="$(hostname -s 2>/dev/null || true)"
getent hosts "$NODE" >/dev/null 2>&1 || NODE=localhost

log() { echo "slurm.sh: $*" >&2; }

print_env() {
  echo "export SLURM_CONF=$CONF"
  echo "export PATH=$STATE/bin:\$PATH"
}

alive() {  # alive PIDFILE: the process in it runs
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

node_state() {
  SLURM_CONF="$CONF" sinfo -h -n "$NODE" -o %t 2>/dev/null | head -1 || true
}

is_up() {
  [ -f "$CONF" ] && alive "$STATE/slurmctld.pid" && alive "$STATE/slurmd.pid" \
    && SLURM_CONF="$CONF" scontrol ping >/dev/null 2>&1 \
    && case "$(node_state)" in idle|mix|alloc|comp) true ;; *) false ;; esac
}

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
    && command -v sbatch >/dev/null && command -v munged >/dev/null; then
    return 0
  fi
  if ! command -v apt-get >/dev/null; then
    log "Slurm is not installed and there is no apt-get to install it (needs slurmctld slurmd slurm-client munge)"
    exit 3
  fi
  log "installing slurmctld slurmd slurm-client munge"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      slurmctld slurmd slurm-client munge; } >"$STATE/apt.log" 2>&1 \
    || { log "apt-get install failed:"; tail -20 "$STATE/apt.log" >&2; exit 3; }
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    return 0
  fi
  [ -s /etc/munge/munge.key ] || { mungekey -c -f 2>/dev/null || create-munge-key -f; }
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  # Started as root, munged refuses its log dir: run it as the munge user.
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
    sleep 0.1
  done
  munge -n | unmunge >/dev/null || { log "munged did not start"; exit 4; }
  cp /run/munge/munged.pid "$STATE/munged.pid" 2>/dev/null || pgrep -n -u munge -x munged >"$STATE/munged.pid"
}

write_conf() {
  # The node's hardware must be what slurmd -C reports, or the node is drained.
  local hw
  hw="$(slurmd -C | head -1 | sed -E 's/^NodeName=[^ ]+ //')"
  local ghost="" maint=""
  if [ "$NODE" != localhost ]; then
    # A node drained for maintenance (no slurmd answers on its port): the only node of partition maint.
    ghost="NodeName=ghost NodeAddr=127.0.0.1 Port=6829 CPUs=1 RealMemory=100 State=DRAIN Reason=maintenance"
    maint="PartitionName=maint Nodes=ghost MaxTime=60 State=UP"
  fi
  cat >"$CONF.new" <<EOF
# Written by .ci/slurm.sh: a single-node test cluster on this machine. Do not use in production.
ClusterName=neoxci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
MinJobAge=86400
KillWait=5
InactiveLimit=0
Waittime=0
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$NODE NodeAddr=127.0.0.1 $hw State=UNKNOWN
$ghost
# OverSubscribe lets the jobs of a sweep share the 2 cores, so they run side by side.
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
# Limits as a lab's debug partition has them (for the tests of jobs that cannot fit): a MaxTime,
# a node limit, and a partition whose only node is drained.
PartitionName=short Nodes=$NODE MaxTime=20 MaxNodes=1 State=UP OverSubscribe=FORCE:4
$maint
EOF
}

start() {
  if [ "$(id -u)" != 0 ]; then
    log "needs root (it installs packages and runs slurmd as root); run it as root or in CI"
    exit 2
  fi
  mkdir -p "$STATE/bin" "$STATE/ctld" "$STATE/d"
  install_packages
  install -m 755 "$HERE/slurm/sacct" "$STATE/bin/sacct"
  write_conf  # to $CONF.new
  if [ -f "$CONF" ] && cmp -s "$CONF" "$CONF.new"; then
    rm -f "$CONF.new"
    if is_up; then
      log "already up ($CONF)"
      print_env
      return 0
    fi
  elif alive "$STATE/slurmctld.pid" || alive "$STATE/slurmd.pid"; then
    log "the configuration changed: restarting"
    stop_daemons
  fi
  [ -f "$CONF.new" ] && mv "$CONF.new" "$CONF"
  start_munge
  export SLURM_CONF="$CONF"
  alive "$STATE/slurmctld.pid" || slurmctld -f "$CONF"
  for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.1; done
  alive "$STATE/slurmd.pid" || slurmd -f "$CONF" -N "$NODE"
  local st=""
  for _ in $(seq 150); do
    st="$(node_state)"
    case "$st" in
      idle|mix|alloc) break ;;
      drain*|down*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.2
  done
  if ! is_up; then
    log "the node did not come up (state '${st}'); the logs:"
    tail -15 "$STATE/slurmctld.log" "$STATE/slurmd.log" >&2 || true
    exit 4
  fi
  log "up: node $NODE is $(node_state) ($CONF)"
  print_env
}

stop_daemons() {
  local f
  for f in slurmd slurmctld; do
    if alive "$STATE/$f.pid"; then
      kill "$(cat "$STATE/$f.pid")" 2>/dev/null || true
      for _ in $(seq 50); do alive "$STATE/$f.pid" || break; sleep 0.1; done
      log "stopped $f"
    fi
  done
}

stop() {
  stop_daemons
  # munged only if this script started it.
  if alive "$STATE/munged.pid"; then
    kill "$(cat "$STATE/munged.pid")" 2>/dev/null || true
    rm -f "$STATE/munged.pid"
    log "stopped munged"
  fi
}

case "${1:-}" in
  start) start ;;
  env) print_env ;;
  status) if is_up; then log "up ($CONF)"; else log "down"; exit 1; fi ;;
  stop) stop ;;
  clean) stop; rm -rf "$STATE" ;;
  *) echo "usage: $0 start|env|status|stop|clean" >&2; exit 64 ;;
esac
