#!/usr/bin/env bash
# A real Slurm (Debian's slurm-wlm + munge) for development and the `slurm` tests: one node, or several
# "nodes" on this one machine, each a slurmd in its own network, UTS and mount namespace.
#
#   sudo slurm/local_cluster.sh up              # one node (this host); install if needed; idempotent (~1 s when up)
#   sudo slurm/local_cluster.sh up --nodes 3    # a separate multi-node cluster n1..n3 (see below)
#   sudo slurm/local_cluster.sh status          # daemons and node states of both; exit 0 when a controller answers
#   sudo slurm/local_cluster.sh down            # stop everything this script started, remove what it made
#   sudo slurm/local_cluster.sh down --multi-node   # only the multi-node cluster (the one-node one keeps running)
#   sudo slurm/local_cluster.sh node-kill K | node-start K | link-down K | link-up K   # fault drills on node nK
#
# Needs root and a Debian-like system without systemd (CI containers, dev VMs). It writes
# /etc/slurm/slurm.conf only if that file is absent or was written by this script, so it never
# overwrites the configuration of a real cluster.
# Environment: RCM_SLURM_CPUS (default: nproc), RCM_SLURM_MEMORY_MB (default: 80 % of RAM),
# RCM_SLURM_GPUS (default: the /dev/nvidiaN devices; on a machine without any, 2 placeholder GPUs backed
# by empty files, so GPU-shaped job scripts and launcher presets schedule unchanged on a CPU machine;
# their jobs see an empty CUDA_VISIBLE_DEVICES and must run with train.device=cpu).
#
# The multi-node cluster (--nodes N, N >= 2) runs beside the one-node one and shares only munged:
# its own controller (ports 7817/7818) and state under $RCM_MULTINODE_DIR (default /var/lib/rcm-multinode);
# clients reach it with SLURM_CONF=$RCM_MULTINODE_DIR/etc/slurm.conf (jobs inherit it). Node nK is a slurmd
# in network namespace rcm-nK (address 10.77.0.(10+K) on bridge rcmbr0, hostname nK, a private /etc/hosts
# that names every node), so tasks on different nodes talk over TCP only and a node can be cut off
# (link-down) or crashed (node-kill: its slurmd and every process in its namespace SIGKILLed).
# Each node advertises RCM_SLURM_CPUS CPUs and the placeholder GPUs; all share this machine's cores.
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

common_settings() {  # the slurm.conf lines both clusters share: munge auth as root, no accounting, no cgroups
    cat <<EOF
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
EOF
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
$(common_settings)
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
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

# ---- the multi-node cluster ----
MN_DIR=${RCM_MULTINODE_DIR:-/var/lib/rcm-multinode}
MN_CONF=$MN_DIR/etc/slurm.conf
MN_BRIDGE=rcmbr0
MN_NET=10.77.0
MN_MAX_NODES=8

mn_slurm() {  # a Slurm client command against the multi-node cluster
    SLURM_CONF=$MN_CONF timeout 5 "$@"
}

mn_node_count() {  # nodes in the current multi-node config (0 if none)
    if [ -f "$MN_CONF" ]; then grep -c '^NodeName=' "$MN_CONF" || true; else echo 0; fi
}

mn_usable_nodes() {  # how many nodes take jobs
    mn_slurm sinfo -h -N -o %T 2>/dev/null | grep -Ec "^(idle|mixed|allocated|completing)" || true
}

mn_write_config() {  # mn_write_config N DIR: the slurm.conf, gres.conf, hosts and resolv.conf of an N-node cluster
    local nodes=$1 etc=$2 cpus memory_mb gpus node_lines="" hosts k i
    cpus=${RCM_SLURM_CPUS:-$(nproc)}
    memory_mb=${RCM_SLURM_MEMORY_MB:-$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)}
    gpus=${RCM_SLURM_GPUS:-2}
    mkdir -p "$etc" "$PLACEHOLDER_GPU_DIR"
    for i in $(seq 0 $((gpus - 1))); do touch "$PLACEHOLDER_GPU_DIR/gpu$i"; done
    hosts="127.0.0.1 localhost
$MN_NET.1 mnctl"
    for k in $(seq "$nodes"); do
        node_lines+="NodeName=n$k NodeAddr=$MN_NET.$((10 + k)) NodeHostname=n$k CPUs=$cpus Sockets=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$memory_mb Gres=gpu:$gpus State=UNKNOWN
"
        hosts+="
$MN_NET.$((10 + k)) n$k"
    done
    printf '%s\n' "$hosts" >"$etc/hosts"
    # No nameserver inside a node's namespace: an unknown name must fail at once, not after 10-20 s.
    printf 'nameserver 127.0.0.1\noptions timeout:1 attempts:1\n' >"$etc/resolv.conf"
    printf '%s\nNodeName=n[1-%d] Name=gpu File=%s/gpu[0-%d]\n' "$MARKER" "$nodes" "$PLACEHOLDER_GPU_DIR" \
        $((gpus - 1)) >"$etc/gres.conf"
    # As the one-node config, and: SlurmdTimeout=10 (a lost node is DOWN and its job requeued ~25 s
    # after it stops answering; default 300 s); EnforcePartLimits=ALL (a job asking for more nodes than the
    # partition has is refused at submission instead of pending forever); sched/backfill with bf_interval=1 (the FIFO scheduler keeps a
    # --nodes=1-2 job waiting behind a job that needs a DOWN node); CR_Core (memory is not a resource here:
    # every node advertises most of this one machine's RAM).
    cat >"$etc/slurm.conf" <<EOF
$MARKER
ClusterName=rcmmulti
SlurmctldHost=mnctl($MN_NET.1)
SlurmctldPort=7817
SlurmdPort=7818
$(common_settings)
StateSaveLocation=$MN_DIR/state
SlurmdSpoolDir=$MN_DIR/spool/%n
SlurmctldPidFile=$MN_DIR/run/slurmctld.pid
SlurmdPidFile=$MN_DIR/run/slurmd-%n.pid
SlurmctldLogFile=$MN_DIR/log/slurmctld.log
SlurmdLogFile=$MN_DIR/log/slurmd-%n.log
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SlurmdParameters=config_overrides
EnforcePartLimits=ALL
GresTypes=gpu
ReturnToService=2
SlurmdTimeout=10
KillWait=5
InactiveLimit=0
MinJobAge=600
${node_lines}PartitionName=mn Nodes=n[1-$nodes] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
}

mn_start_node() {  # mn_start_node K: network namespace, link and slurmd of node nK (nothing that exists already)
    local k=$1 ns=rcm-n$1 veth=rcmv$1
    [ -e "/run/netns/$ns" ] || ip netns add "$ns"
    if ! ip link show "$veth" >/dev/null 2>&1; then
        ip link add "$veth" type veth peer name eth0 netns "$ns"
        ip link set "$veth" master "$MN_BRIDGE" up
        ip -n "$ns" addr add "$MN_NET.$((10 + k))/24" dev eth0
        ip -n "$ns" link set lo up
        ip -n "$ns" link set eth0 up
        ip -n "$ns" route add default via "$MN_NET.1"
    fi
    pid_alive "$MN_DIR/run/slurmd-n$k.pid" && return
    # nsenter, not `ip netns exec`: the latter remounts /sys, which hides the cgroup tree from slurmd.
    # The mount namespace lets the node see its own /etc/hosts and resolv.conf; nothing else differs.
    SLURM_CONF=$MN_CONF setsid nsenter --net="/run/netns/$ns" unshare --uts --mount sh -c "hostname n$k &&
        mount --bind '$MN_DIR/etc/hosts' /etc/hosts && mount --bind '$MN_DIR/etc/resolv.conf' /etc/resolv.conf &&
        exec slurmd -D" >>"$MN_DIR/log/slurmd-n$k.out" 2>&1 </dev/null &
}

mn_wait_usable() {  # mn_wait_usable N SECONDS: until N nodes take jobs; false after SECONDS
    local deadline=$((SECONDS + $2))
    while [ "$SECONDS" -lt "$deadline" ]; do
        [ "$(mn_usable_nodes)" = "$1" ] && return 0
        sleep 0.1
    done
    return 1
}

mn_up() {  # mn_up N
    local nodes=$1 started=$SECONDS k wanted
    wanted=$(mktemp -d)
    mn_write_config "$nodes" "$wanted"
    if [ -d "$MN_DIR/etc" ] && diff -rq "$wanted" "$MN_DIR/etc" >/dev/null && pid_alive "$MN_DIR/run/slurmctld.pid"; then
        # The same cluster: restart only what is missing (a killed node), so running jobs survive.
        for k in $(seq "$nodes"); do ip link set "rcmv$k" up 2>/dev/null || true; mn_start_node "$k"; done
        if mn_wait_usable "$nodes" 15; then
            rm -rf "$wanted"
            say "multi-node cluster already up: $(mn_slurm sinfo -h -o '%D nodes %N %T' | tr '\n' ' ')"
            return
        fi
    fi
    install_packages
    start_munge
    mn_down quiet  # whatever is left of an earlier cluster (another size or config, a killed daemon) goes first
    mkdir -p "$MN_DIR"/{state,run,log}
    mv "$wanted" "$MN_DIR/etc"
    chmod 755 "$MN_DIR/etc"  # mktemp's 700 would hide the config from job steps of other users
    for k in $(seq "$nodes"); do mkdir -p "$MN_DIR/spool/n$k"; done  # slurmd does not create its %n spool
    ip link add "$MN_BRIDGE" type bridge
    ip addr add "$MN_NET.1/24" dev "$MN_BRIDGE"
    ip link set "$MN_BRIDGE" up
    # slurmctld checks that the host's name is its SlurmctldHost: give it its own UTS namespace.
    SLURM_CONF=$MN_CONF setsid unshare --uts sh -c 'hostname mnctl && exec slurmctld -D' \
        >>"$MN_DIR/log/slurmctld.out" 2>&1 </dev/null &
    for k in $(seq "$nodes"); do mn_start_node "$k"; done
    mn_wait_usable "$nodes" 20 || die "the multi-node cluster did not come up within 20 s: $(mn_slurm sinfo -h -N -o '%N %T %E' 2>&1 | tr '\n' ';') (see $MN_DIR/log)"
    say "multi-node cluster up in $((SECONDS - started)) s: $(mn_slurm sinfo -h -o '%D nodes %N %T' | tr '\n' ' ')(SLURM_CONF=$MN_CONF)"
}

stop_pids() {  # stop_pids PID...: TERM them all at once, KILL whatever still runs after 10 s
    local pid alive
    [ $# -gt 0 ] || return 0
    kill "$@" 2>/dev/null || true
    for _ in $(seq 100); do
        alive=0
        for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && return 0
        sleep 0.1
    done
    say "pids $* did not stop on SIGTERM; killing them"
    kill -9 "$@" 2>/dev/null || true
}

mn_down() {  # mn_down [quiet]: jobs, daemons, namespaces (and what runs in them), links, bridge, state
    local pids=() file k ns
    if [ -f "$MN_CONF" ] && pid_alive "$MN_DIR/run/slurmctld.pid"; then
        mn_slurm scancel --quiet --full --signal=KILL --state=RUNNING 2>/dev/null || true  # no KillWait to sit out
        mn_slurm scancel --quiet 2>/dev/null || true
    fi
    for file in "$MN_DIR"/run/slurmd-*.pid "$MN_DIR/run/slurmctld.pid"; do
        if pid_alive "$file"; then pids+=("$(cat "$file")"); fi
    done
    stop_pids "${pids[@]}"  # in parallel: each slurmd takes ~1.5 s to exit
    for ns in $(ip netns list 2>/dev/null | awk '$1 ~ /^rcm-n[0-9]+$/ {print $1}'); do
        pids=($(ip netns pids "$ns" 2>/dev/null))  # orphaned job steps
        [ ${#pids[@]} -eq 0 ] || kill -9 "${pids[@]}" 2>/dev/null || true
        k=${ns#rcm-n}
        ip link del "rcmv$k" 2>/dev/null || true  # before the namespace: its veth is freed asynchronously
        ip netns del "$ns"
    done
    ip link del "$MN_BRIDGE" 2>/dev/null || true
    rm -rf "$MN_DIR/state" "$MN_DIR/spool" "$MN_DIR/run" "$MN_DIR/etc"  # logs stay for a post-mortem
    [ "${1:-}" = quiet ] || say "multi-node cluster down (logs kept in $MN_DIR/log)"
}

mn_check_node() {  # mn_check_node K: K names a node of the running multi-node cluster
    case "$1" in ''|*[!0-9]*) die "node number '$1' is not a number (node nK is given as K)" ;; esac
    [ "$1" -ge 1 ] && [ "$1" -le "$(mn_node_count)" ] \
        || die "node n$1 is not in the multi-node cluster (it has $(mn_node_count) nodes; start one with up --nodes N)"
}

mn_node_kill() {  # a crash: node nK's slurmd and every task in its namespace die at once
    mn_check_node "$1"
    local pids
    pids=$(ip netns pids "rcm-n$1" | tr '\n' ' ')
    [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
    rm -f "$MN_DIR/run/slurmd-n$1.pid"
    say "node n$1 killed (pids: $pids)"
}

mn_node_start() {  # bring node nK back (after node-kill or link-down) and wait until it takes jobs again
    mn_check_node "$1"
    ip link set "rcmv$1" up
    mn_start_node "$1"
    say "node n$1 started"
}

mn_link() {  # mn_link K up|down: connect or cut node nK's only link
    mn_check_node "$1"
    ip link set "rcmv$1" "$2"
    say "node n$1 link $2"
}

mn_status() {
    local file
    [ -f "$MN_CONF" ] || { echo "multi-node cluster: not running"; return 1; }
    echo "multi-node cluster ($(mn_node_count) nodes, SLURM_CONF=$MN_CONF):"
    for file in "$MN_DIR/run/slurmctld.pid" "$MN_DIR"/run/slurmd-*.pid; do
        [ -e "$file" ] || continue
        if pid_alive "$file"; then echo "  $(basename "$file" .pid): running (pid $(cat "$file"))"; else echo "  $(basename "$file" .pid): stopped"; fi
    done
    echo "  namespaces: $(ip netns list 2>/dev/null | awk '$1 ~ /^rcm-n/ {print $1}' | tr '\n' ' ')"
    mn_slurm sinfo -N -o '  %N %T %E' 2>/dev/null && mn_slurm squeue 2>/dev/null | sed 's/^/  /'
}

nodes_argument() {  # the N of `--nodes N` / `--nodes=N` (default 1)
    local nodes=1
    while [ $# -gt 0 ]; do
        case "$1" in
            --nodes) [ $# -ge 2 ] || die "--nodes needs a number"; nodes=$2; shift 2 ;;
            --nodes=*) nodes=${1#--nodes=}; shift ;;
            *) die "unknown option '$1' (usage: up [--nodes N])" ;;
        esac
    done
    case "$nodes" in ''|*[!0-9]*|0) die "--nodes '$nodes' is not a positive number of nodes" ;; esac
    [ "$nodes" -le "$MN_MAX_NODES" ] || die "--nodes $nodes: this machine's multi-node cluster holds at most $MN_MAX_NODES nodes"
    echo "$nodes"
}

command=${1:-}
[ $# -eq 0 ] || shift
case "$command" in
    up)
        nodes=$(nodes_argument "$@")
        [ "$(id -u)" = 0 ] || die "run as root (it installs packages, starts system daemons and makes namespaces)"
        if [ "$nodes" = 1 ]; then cmd_up; else mn_up "$nodes"; fi ;;
    down)
        case "${1:-}" in
            --multi-node) mn_down ;;
            "") mn_down quiet; cmd_down ;;
            *) die "unknown option '$1' (usage: down [--multi-node])" ;;
        esac ;;
    status)
        status=1
        cmd_status && status=0
        mn_status || true
        exit $status ;;
    node-kill) mn_node_kill "${1:-}" ;;
    node-start) mn_node_start "${1:-}" ;;
    link-down) mn_link "${1:-}" down ;;
    link-up) mn_link "${1:-}" up ;;
    *) echo "usage: $0 up [--nodes N] | down [--multi-node] | status | node-kill K | node-start K | link-down K | link-up K" >&2
       exit 2 ;;
esac
