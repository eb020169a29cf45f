#!/usr/bin/env bash
# Start a real one-machine Slurm cluster (munged + slurmctld + slurmd) for `make test-slurm`
# and for trying `sculpt -m launcher=slurm ...` locally. Idempotent: on a machine where the
# cluster already runs with the same configuration it only checks the node and returns.
# Needs root the first time (apt-get, /etc, daemons); no systemd is assumed.
#
# By default it also runs slurmdbd on a local MariaDB, so that sacct (and submitit) learn how
# each job ended: without it a job that dies before writing its result leaves the sweep
# waiting forever (slurm/README.md).
#
# Environment: SLURM_ACCOUNTING=0 skips slurmdbd/MariaDB; SLURM_START_TIMEOUT (s, default
# 60) bounds every wait; SLURM_FORCE_CONF=1 overwrites an /etc/slurm/slurm.conf that this
# script did not write.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TEMPLATE="$HERE/slurm.conf.in"
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
ACCOUNTING="${SLURM_ACCOUNTING:-1}"
ADDR=127.0.0.1
MARKER="# written by sculpt slurm/start_cluster.sh"
TIMEOUT="${SLURM_START_TIMEOUT:-60}"
HOST="$(hostname -s)"

say() { echo "slurm: $*"; }
die() {
  echo "slurm: ERROR: $*" >&2
  for log in /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log /var/log/slurm/slurmdbd.log; do
    [ -f "$log" ] && { echo "--- last lines of $log" >&2; tail -n 15 "$log" >&2; }
  done
  exit 1
}

# Waits until "$@" succeeds, up to TIMEOUT seconds.
wait_for() {
  local what="$1"; shift
  local deadline=$((SECONDS + TIMEOUT))
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || die "timed out after ${TIMEOUT}s waiting for $what"
    sleep 0.5
  done
}

render_conf() {
  local cpus mem_total headroom mem storage
  cpus="$(nproc)"
  mem_total="$(free -m | awk '/^Mem:/ {print $2}')"
  # Leave room for the OS and the daemons; slurmd drains a node whose RealMemory exceeds
  # what it measures, so erring low is the safe side.
  headroom=$(( mem_total / 8 > 1024 ? mem_total / 8 : 1024 ))
  mem=$(( mem_total - headroom ))
  [ "$mem" -gt 256 ] || die "only ${mem_total} MB of memory; need more than $((headroom + 256)) MB"
  storage=accounting_storage/none
  [ "$ACCOUNTING" = 1 ] && storage=accounting_storage/slurmdbd
  sed -e "s/@HOST@/$HOST/g" -e "s/@ADDR@/$ADDR/g" -e "s/@CPUS@/$cpus/g" \
      -e "s/@MEM_MB@/$mem/g" -e "s/@DEF_MEM_MB@/$(( mem / cpus ))/g" \
      -e "s|@ACCT_STORAGE@|$storage|g" "$TEMPLATE"
}

node_state() { sinfo -h -N -n "$HOST" -o %t 2>/dev/null | head -n 1; }
ctld_up() { scontrol ping 2>/dev/null | grep -q "is UP"; }
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
running() { [ -f "$1" ] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }
db_up() { mariadb-admin --connect-timeout=2 ping 2>/dev/null | grep -q alive; }
dbd_up() { timeout 10 sacctmgr -n -P list cluster format=cluster >/dev/null 2>&1; }
sacct_ok() { [ "$ACCOUNTING" != 1 ] || timeout 10 sacct -n -X -S now >/dev/null 2>&1; }
dbd_wanted() { sed -e "s/@ADDR@/$ADDR/g" "$HERE/slurmdbd.conf.in"; }

wanted="$(render_conf 2>/dev/null || true)"

# Fast path: already up with this very configuration (works without root).
if command -v sinfo >/dev/null && [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$wanted" ] \
   && ctld_up && sacct_ok && [[ "$(node_state)" =~ ^(idle|mix|alloc)$ ]]; then
  say "cluster already running: node $HOST is $(node_state) ($(nproc) CPUs)"
  exit 0
fi

[ "$(id -u)" = 0 ] || die "not running, and starting it needs root (sudo $0)"

# 1. Packages (only what is missing; the lists may be empty on a fresh image).
packages=(slurm-wlm munge slurm-client)
commands=(slurmctld slurmd sbatch munged)
if [ "$ACCOUNTING" = 1 ]; then packages+=(slurmdbd mariadb-server); commands+=(slurmdbd mariadbd); fi
for cmd in "${commands[@]}"; do
  if ! command -v "$cmd" >/dev/null; then
    say "installing ${packages[*]} (apt-get, about a minute)"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${packages[@]}"; } \
      >/var/log/sculpt-slurm-apt.log 2>&1 \
      || { tail -n 20 /var/log/sculpt-slurm-apt.log >&2; die "apt-get install ${packages[*]} failed"; }
    break
  fi
done

# 2. munge: one key shared by every daemon and client (here all on one host).
if [ ! -s /etc/munge/munge.key ]; then
  say "creating /etc/munge/munge.key"
  mkdir -p /etc/munge
  if command -v mungekey >/dev/null; then
    mungekey --create --keyfile=/etc/munge/munge.key
  else
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge
if ! munge_ok; then
  say "starting munged"
  # --force: a socket or pid file left by a munged that died would otherwise stop it.
  runuser -u munge -- /usr/sbin/munged --force || die "munged did not start (see /var/log/munge/munged.log)"
  wait_for "munged to answer" munge_ok
fi

# 3. slurm.conf from the template with this machine's name, CPUs and memory (first: sacctmgr
# finds slurmdbd through it).
[ -n "$wanted" ] || die "could not render $TEMPLATE"
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$wanted" ]; then
  if [ -f "$CONF" ] && ! head -n 1 "$CONF" | grep -qF "$MARKER" && [ "${SLURM_FORCE_CONF:-0}" != 1 ]; then
    die "$CONF exists and was not written by this script; set SLURM_FORCE_CONF=1 to replace it"
  fi
  if ctld_up || running /run/slurmd.pid; then
    # Node CPUs/memory changes need both daemons restarted, not `scontrol reconfigure`.
    say "configuration changed: stopping the running daemons first"
    scontrol shutdown >/dev/null 2>&1 || true
    wait_for "slurmctld and slurmd to exit" bash -c \
      '! { [ -f /run/slurmctld.pid ] && kill -0 $(cat /run/slurmctld.pid); } && ! { [ -f /run/slurmd.pid ] && kill -0 $(cat /run/slurmd.pid); }'
  fi
  printf '%s\n' "$wanted" >"$CONF.tmp" && mv "$CONF.tmp" "$CONF"
  say "wrote $CONF (node $HOST: $(nproc) CPUs, $(awk -F'RealMemory=' '/^NodeName/ {split($2,a," "); print a[1]}' "$CONF") MB)"
fi

# 4. Accounting: MariaDB, then slurmdbd, then the cluster's row in it (before slurmctld,
# which registers with slurmdbd as it starts).
if [ "$ACCOUNTING" = 1 ]; then
  if ! db_up; then
    [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql >/var/log/slurm/mariadb-install.log 2>&1 \
      || die "mariadb-install-db failed (see /var/log/slurm/mariadb-install.log)"
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
    say "starting mariadbd"
    # mariadbd stays in the foreground: detach it from this shell and from make's pipes.
    setsid /usr/sbin/mariadbd --user=mysql </dev/null >>/var/log/slurm/mariadb.log 2>&1 &
    wait_for "mariadbd to answer (see /var/log/slurm/mariadb.log)" db_up
  fi
  mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db" || die "cannot create the slurm_acct_db database"
  dbd_conf="$(dbd_wanted)"
  if [ ! -f "$DBD_CONF" ] || [ "$(cat "$DBD_CONF")" != "$dbd_conf" ]; then
    if running /run/slurmdbd.pid; then kill -TERM "$(cat /run/slurmdbd.pid)"; wait_for "slurmdbd to exit" bash -c '! kill -0 $(cat /run/slurmdbd.pid)'; fi
    # slurmdbd refuses a configuration file that others can read.
    (umask 077 && printf '%s\n' "$dbd_conf" >"$DBD_CONF.tmp") && mv "$DBD_CONF.tmp" "$DBD_CONF"
    say "wrote $DBD_CONF"
  fi
  if ! running /run/slurmdbd.pid; then
    say "starting slurmdbd"
    /usr/sbin/slurmdbd || die "slurmdbd did not start"
  fi
  wait_for "slurmdbd to answer sacctmgr" dbd_up
  if ! sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx localcluster; then
    sacctmgr -i add cluster localcluster >/dev/null || die "sacctmgr add cluster localcluster failed"
    say "registered cluster localcluster with slurmdbd"
  fi
fi

# 5. Daemons. A controller that runs but does not answer is a stale pid file at worst.
if ! ctld_up; then
  if running /run/slurmctld.pid; then
    die "slurmctld (pid $(cat /run/slurmctld.pid)) runs but does not answer 'scontrol ping'"
  fi
  say "starting slurmctld"
  /usr/sbin/slurmctld || die "slurmctld did not start"
  wait_for "slurmctld to answer 'scontrol ping'" ctld_up
fi
[ "$ACCOUNTING" != 1 ] || wait_for "sacct to answer" sacct_ok
if ! running /run/slurmd.pid; then
  say "starting slurmd"
  /usr/sbin/slurmd || die "slurmd did not start"
fi

# 6. The node: idle (or busy with jobs). A node left down/drained by an earlier run whose
# slurmd vanished is resumed once; anything else is reported with Slurm's own reason.
deadline=$((SECONDS + TIMEOUT))
resumed=0
while :; do
  state="$(node_state)"
  case "$state" in
    idle|mix|alloc) break ;;
    down|drain|drng|fail|failg)
      if [ "$resumed" = 0 ]; then
        say "node $HOST is $state ($(scontrol show node "$HOST" | sed -n 's/.*Reason=//p')); resuming"
        scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
        resumed=1
      fi ;;
  esac
  if [ "$SECONDS" -ge "$deadline" ]; then
    die "node $HOST is '${state:-absent}' after ${TIMEOUT}s, not idle: $(scontrol show node "$HOST" 2>/dev/null | sed -n 's/.*Reason=//p')"
  fi
  sleep 0.5
done
say "cluster up: node $HOST is $state ($(nproc) CPUs); try: sinfo; squeue"
