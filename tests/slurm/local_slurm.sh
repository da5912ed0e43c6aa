#!/usr/bin/env bash
# local_slurm.sh up|down -- single-node Slurm on localhost for tests (root, Debian 12, no systemd).
# Daemons are started in the background and stopped by their saved PIDs; state under SLURM_CI_DIR.
set -euo pipefail
D=${SLURM_CI_DIR:-/tmp/slurm-ci}
up() {
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
  mkdir -p "$D"/state "$D"/spool "$D"/log /run/munge && chown munge:munge /run/munge
  [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
  local H; H=$(hostname -s)
  cat > /etc/slurm/slurm.conf <<EOF
ClusterName=ci
SlurmctldHost=${H}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=5,sched_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
NodeName=${H} NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=${H} Default=YES MaxTime=INFINITE State=UP
EOF
  setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged -F >"$D/log/munged.out" 2>&1 &
  echo $! > "$D/munged.bgpid"
  for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.2; done
  /usr/sbin/slurmctld -D >"$D/log/slurmctld.out" 2>&1 & echo $! > "$D/slurmctld.bgpid"
  /usr/sbin/slurmd -D -N "$H" >"$D/log/slurmd.out" 2>&1 & echo $! > "$D/slurmd.bgpid"
  for _ in $(seq 120); do
    [ "$(sinfo -h -o %T 2>/dev/null)" = idle ] && { sinfo; return 0; }; sleep 0.5
  done
  echo "Slurm did not come up" >&2; tail -n 20 "$D"/log/* >&2; return 1
}
down() {
  local p f
  for f in slurmd slurmctld munged; do
    [ -f "$D/$f.bgpid" ] || continue; p=$(cat "$D/$f.bgpid"); kill "$p" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
  done
  rm -rf "$D" /etc/slurm/slurm.conf
}
"${1:-up}"
