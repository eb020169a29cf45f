#!/usr/bin/env bash
# Stop the one-machine cluster that slurm/start_cluster.sh started: slurmctld and slurmd via
# `scontrol shutdown`, then slurmdbd, MariaDB and munged. Running jobs are not killed: their
# slurmstepd keeps them going, and the next start picks them up from the state saved in
# /var/spool/slurmctld. Safe to run when nothing (or only part) is running.
set -uo pipefail

say() { echo "slurm: $*"; }
running() { [ -f "$1" ] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }
TIMEOUT="${SLURM_START_TIMEOUT:-60}"

if command -v scontrol >/dev/null && scontrol ping 2>/dev/null | grep -q "is UP"; then
  jobs="$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')"
  # Not cancelled here (see above); `scancel <ids>` first if they should go.
  [ -z "$jobs" ] || say "jobs still queued or running (kept): $jobs"
  say "scontrol shutdown"
  scontrol shutdown >/dev/null 2>&1 || say "scontrol shutdown failed (continuing)"
elif running /run/slurmd.pid || running /run/slurmctld.pid; then
  # The controller is gone but a daemon lives on: shutdown cannot reach it, a signal can.
  for pidfile in /run/slurmd.pid /run/slurmctld.pid; do
    running "$pidfile" && { say "SIGTERM to $(basename "$pidfile" .pid)"; kill -TERM "$(cat "$pidfile")"; }
  done
else
  say "slurmctld/slurmd not running"
fi
deadline=$((SECONDS + TIMEOUT))
while running /run/slurmctld.pid || running /run/slurmd.pid; do
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "slurm: ERROR: slurmctld/slurmd still running after ${TIMEOUT}s" >&2
    exit 1
  fi
  sleep 0.5
done

if running /run/slurmdbd.pid; then
  pid="$(cat /run/slurmdbd.pid)"
  say "stopping slurmdbd"
  kill -TERM "$pid"
  while kill -0 "$pid" 2>/dev/null; do
    [ "$SECONDS" -lt "$deadline" ] || { echo "slurm: ERROR: slurmdbd ($pid) still running" >&2; exit 1; }
    sleep 0.2
  done
fi
if command -v mariadb-admin >/dev/null && mariadb-admin --connect-timeout=2 ping >/dev/null 2>&1; then
  say "stopping mariadbd"
  mariadb-admin shutdown || { echo "slurm: ERROR: mariadb-admin shutdown failed" >&2; exit 1; }
fi
if running /run/munge/munged.pid; then
  pid="$(cat /run/munge/munged.pid)"
  say "stopping munged"
  kill -TERM "$pid"
  while kill -0 "$pid" 2>/dev/null; do
    [ "$SECONDS" -lt "$deadline" ] || { echo "slurm: ERROR: munged ($pid) still running" >&2; exit 1; }
    sleep 0.2
  done
fi
say "cluster stopped"
