#!/usr/bin/env bash
# A real single-node Slurm (Debian's slurm-wlm + munge) for development and the `slurm` tests.
#
#   sudo slurm/local_cluster.sh up       # install if needed, configure, start; idempotent (~1 s when up)
#   sudo slurm/local_cluster.sh status   # daemons and node state; exit 0 when the controller answers
#   sudo slurm/local_cluster.sh down     # stop the daemons this script started
#
# Needs root and a Debian-like system without systemd (CI containers, dev VMs). It writes
# /etc/slurm/slurm.conf only if that file is absent or was written by this script, so it never
# overwrites the configuration of a real cluster.
# Environment: RCM_SLURM_CPUS (default: nproc), RCM_SLURM_MEMORY_MB (default: 80 % of RAM),
# RCM_SLURM_GPUS (default: the /dev/nvidiaN devices; on a machine without any, 2 placeholder GPUs backed
# by empty files, so GPU-shaped job scripts and launcher presets schedule unchanged on a CPU machine;
# their jobs see an empty CUDA_VISIBLE_DEVICES and must run with train.device=cpu).
set -euo pipefail

CONF=/etc/slurm/slurm.conf
GRES_CONF=/etc/slurm/gres.conf
PLACEHOLDER_GPU_DIR=/run/rcm-placeholder-gpus
MARKER="# written by rcm-slurm slurm/local_cluster.sh"
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid
LOG_DIR=/var/log/slurm
NODE=$(hostname -s)

say() { echo "local_cluster: $*" >&2; }
die() { say "$*"; exit 1; }

pid_alive() {  # pid_alive FILE: the process named in FILE runs
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

controller_answers() {
    command -v scontrol >/dev/null && timeout 5 scontrol ping 2>/dev/null | grep -q "is UP"
}

node_usable() {  # the node takes jobs: idle, mixed or allocated (not down, drained or unknown)
    timeout 5 sinfo -h -N -n "$NODE" -o %T 2>/dev/null | grep -Eq "^(idle|mixed|allocated|completing)"
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null; then
        return
    fi
    say "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

start_munge() {
    if pid_alive "$MUNGE_PID" && munge -n </dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
    chmod 700 /etc/munge && chmod 400 /etc/munge/munge.key && chmod 755 /run/munge
    rm -f /run/munge/munge.socket.2.lock  # a stale lock from a killed munged blocks the restart
    su -s /bin/sh munge -c "/usr/sbin/munged --pid-file=$MUNGE_PID"
    for _ in $(seq 50); do
        munge -n </dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    die "munged did not start (see /var/log/munge/munged.log)"
}

write_config() {
    local file
    for file in "$CONF" "$GRES_CONF"; do
        if [ -f "$file" ] && ! grep -qF "$MARKER" "$file"; then
            die "$file exists and was not written by this script; refusing to overwrite a real cluster's config"
        fi
    done
    local cpus memory_mb gpus gpu_files
    cpus=${RCM_SLURM_CPUS:-$(nproc)}
    memory_mb=${RCM_SLURM_MEMORY_MB:-$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)}
    mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$LOG_DIR"
    gpus=$(find /dev -maxdepth 1 -regex '/dev/nvidia[0-9]+' 2>/dev/null | wc -l)
    if [ "$gpus" -gt 0 ]; then
        gpus=${RCM_SLURM_GPUS:-$gpus}
        gpu_files="/dev/nvidia[0-$((gpus - 1))]"
    else
        gpus=${RCM_SLURM_GPUS:-2}
        mkdir -p "$PLACEHOLDER_GPU_DIR"
        for i in $(seq 0 $((gpus - 1))); do touch "$PLACEHOLDER_GPU_DIR/gpu$i"; done
        gpu_files="$PLACEHOLDER_GPU_DIR/gpu[0-$((gpus - 1))]"
    fi
    local node_gres="" gres_types=""
    if [ "$gpus" -eq 0 ] && [ -f "$GRES_CONF" ]; then
        rm -f "$GRES_CONF"
        CONFIG_CHANGED=1
    fi
    if [ "$gpus" -gt 0 ]; then
        node_gres=" Gres=gpu:$gpus"
        gres_types="GresTypes=gpu"
        local new_gres="$MARKER
NodeName=$NODE Name=gpu File=$gpu_files"
        if [ ! -f "$GRES_CONF" ] || [ "$(cat "$GRES_CONF")" != "$new_gres" ]; then
            printf '%s\n' "$new_gres" >"$GRES_CONF"
            CONFIG_CHANGED=1
        fi
    fi
    # Why the less common settings:
    #   127.0.0.1             controller and node by address: no DNS entry for the host name needed.
    #   AuthInfo=cred_expire  a requeued job waits cred_expire (default 120 s) before it may start
    #                         again (BeginTime); 10 s keeps the requeue tests short.
    #   sched/builtin, sched_interval=1  FIFO, and pending jobs are looked at every second (default 60 s).
    #   MinJobAge=600         `scontrol show job` keeps a finished job's state and exit code 10 minutes
    #                         (there is no sacct without slurmdbd).
    #   KillWait=5            SIGTERM -> SIGKILL grace period (default 30 s).
    #   DefMemPerCPU          without it a job gets the whole node's memory and jobs cannot share it.
    #   SlurmdParameters=config_overrides  RCM_SLURM_CPUS may exceed the real core count.
    local new_conf
    new_conf=$(cat <<EOF
$MARKER
ClusterName=rcmlocal
SlurmctldHost=$NODE(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SlurmdParameters=config_overrides
$gres_types
ReturnToService=2
KillWait=5
InactiveLimit=0
MinJobAge=600
DefMemPerCPU=1000
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory_mb$node_gres State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
)
    if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$new_conf" ]; then
        printf '%s\n' "$new_conf" >"$CONF"
        CONFIG_CHANGED=1
    fi
}

stop_pid_file() {  # stop_pid_file FILE NAME: TERM the process, wait up to 10 s, then KILL
    local pid
    pid_alive "$1" || { rm -f "$1"; return 0; }
    pid=$(cat "$1")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$1"; return 0; }
        sleep 0.1
    done
    say "$2 ($pid) did not stop on SIGTERM; killing it"
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$1"
}

start_slurm() {
    if [ "${CONFIG_CHANGED:-0}" = 1 ]; then  # daemons started with another config must restart
        stop_pid_file "$SLURMD_PID" slurmd
        stop_pid_file "$CTLD_PID" slurmctld
    fi
    pid_alive "$CTLD_PID" || slurmctld
    for _ in $(seq 100); do
        controller_answers && break
        sleep 0.2
    done
    controller_answers || die "slurmctld does not answer (see $LOG_DIR/slurmctld.log)"
    pid_alive "$SLURMD_PID" || slurmd
    for _ in $(seq 150); do
        node_usable && return
        sleep 0.2
    done
    # A node left DOWN or DRAINED by an earlier run (killed daemons, changed CPUs) is taken back.
    scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true
    for _ in $(seq 50); do
        node_usable && return
        sleep 0.2
    done
    die "node $NODE is not usable: $(sinfo -h -N -o '%T %E' 2>&1) (see $LOG_DIR/slurmd.log)"
}

cmd_up() {
    [ "$(id -u)" = 0 ] || die "run as root (it installs packages and starts system daemons)"
    if [ -f "$CONF" ] && grep -qF "$MARKER" "$CONF" && pid_alive "$CTLD_PID" && pid_alive "$SLURMD_PID" \
        && controller_answers && node_usable; then
        write_config
        if [ "${CONFIG_CHANGED:-0}" = 0 ]; then
            say "already up: node $NODE $(sinfo -h -N -o %T)"
            return
        fi
    fi
    local started=$SECONDS
    install_packages
    start_munge
    write_config
    start_slurm
    say "up in $((SECONDS - started)) s: node $NODE $(sinfo -h -N -o '%T, %c CPUs, %m MB')"
}

cmd_down() {
    stop_pid_file "$SLURMD_PID" slurmd
    stop_pid_file "$CTLD_PID" slurmctld
    stop_pid_file "$MUNGE_PID" munged
    say "down"
}

cmd_status() {
    local name file
    for name in munged slurmctld slurmd; do
        case $name in munged) file=$MUNGE_PID ;; slurmctld) file=$CTLD_PID ;; slurmd) file=$SLURMD_PID ;; esac
        if pid_alive "$file"; then echo "$name: running (pid $(cat "$file"))"; else echo "$name: stopped"; fi
    done
    if controller_answers; then
        sinfo
        squeue
        return 0
    fi
    echo "controller: not answering"
    return 1
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
