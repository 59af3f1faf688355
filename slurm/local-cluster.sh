#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, on loopback only, for tests.
#
#   slurm/local-cluster.sh install   apt-install the daemons (only the missing packages)
#   slurm/local-cluster.sh start     munge, MariaDB, slurmdbd, slurmctld, slurmd node1 + node2; wait until idle
#   slurm/local-cluster.sh stop      cancel jobs, stop every daemon and every job process it started
#   slurm/local-cluster.sh status    sinfo; exit 0 when up, 3 when down
#   slurm/local-cluster.sh clean     stop, then delete the state directory (job ids restart at 1)
#
# Everything (configs, sockets, logs, database, spool, fake GPU devices) lives under one directory,
# $FTLAUNCH_SLURM_DIR (default /tmp/ftlaunch-slurm). The only changes outside it are two /etc/hosts lines
# (node1, node2) and the symlink /etc/slurm/slurm.conf -> $DIR/etc/slurm.conf, so that plain `sinfo`,
# `sbatch` and submitit work without SLURM_CONF. Ports: $FTLAUNCH_SLURM_PORT_BASE (default 16817) + 0..3.
#
# Why each node runs in `unshare --uts` with its own hostname: jobs then see `hostname` = node1/node2, and
# MASTER_ADDR=node1 resolves (via /etc/hosts) to node1's own loopback address, as on a real cluster.
# Debian's slurmd is built with MULTIPLE_SLURMD, which is what allows two slurmd on one host.
#
# Network: all traffic uses 127.0.0.x. slurmctld binds 127.0.0.1 only and MariaDB has no TCP at all;
# slurmd and slurmdbd (22.05) still listen on every interface: the options that would bind them
# (NoInAddrAny) break srun inside jobs. Run it on machines whose other interfaces are firewalled.
set -euo pipefail

DIR="${FTLAUNCH_SLURM_DIR:-/tmp/ftlaunch-slurm}"
PORT_BASE="${FTLAUNCH_SLURM_PORT_BASE:-16817}"
START_TIMEOUT="${FTLAUNCH_SLURM_START_TIMEOUT:-90}"
CLUSTER="ftlaunch"
NODES=(node1 node2)
PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)

CTLD_PORT=$PORT_BASE
DBD_PORT=$((PORT_BASE + 3))
MUNGE_SOCK="$DIR/munge/munge.socket"
MYSQL_SOCK="$DIR/mysql/mysqld.sock"
CONF="$DIR/etc/slurm.conf"
# Two CPUs per node, whatever the box has (config_overrides lets slurmd accept it even on fewer cores):
# like one rank per GPU on a 2-GPU node, and it makes `srun -N2 -n4` place 2+2 tasks (block distribution
# over 4-CPU nodes would place 3+1).
NODE_CPUS="${FTLAUNCH_SLURM_NODE_CPUS:-2}"
NODE_MEM_MB=2048

log() { printf '[local-cluster] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

node_port() { echo $((PORT_BASE + $1)); }          # node1 -> base+1, node2 -> base+2
node_addr() { echo "127.0.0.$((10 + $1))"; }       # node1 -> 127.0.0.11, node2 -> 127.0.0.12

# Slurm client commands talking to *our* cluster, whatever /etc/slurm holds.
sl() { SLURM_CONF="$CONF" "$@"; }

# ---------------------------------------------------------------------------------------------------- install
cmd_install() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if ((${#missing[@]} == 0)); then log "packages present: ${PACKAGES[*]}"; return 0; fi
    [[ $EUID -eq 0 ]] || die "installing ${missing[*]} needs root"
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Update the index only when apt has none yet (fresh containers); otherwise install straight away.
    if ! compgen -G '/var/lib/apt/lists/*_Packages' >/dev/null; then apt-get update -qq; fi
    # A stale index gives 404s: refresh it once and retry.
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }
}

# ---------------------------------------------------------------------------------------------------- helpers
# pid_alive PIDFILE: the pid in PIDFILE runs *our* daemon. Checking the process name as well guards
# against a stale pid file whose pid now belongs to something else (we must never signal that).
pid_alive() {
    local f=$1 name pid
    [[ -f $f ]] || return 1
    name=$(basename "$f" .pid); name=${name%-node[0-9]}; [[ $name == mysqld ]] && name=mariadbd
    pid=$(cat "$f" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ && $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]]
}

# wait_for DESCRIPTION LOGFILE COMMAND...: poll COMMAND until it succeeds or START_TIMEOUT expires.
wait_for() {
    local what=$1 logfile=$2; shift 2
    local deadline=$((SECONDS + START_TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            log "timed out after ${START_TIMEOUT}s waiting for $what"
            if [[ -n $logfile && -f $logfile ]]; then log "--- tail of $logfile"; tail -n 30 "$logfile" >&2; fi
            exit 1
        fi
        sleep 0.3
    done
}

# Start a daemon only when its pid file does not point at a live process (start is idempotent).
need_start() { ! pid_alive "$1"; }

ensure_hosts() {
    local i
    for i in 1 2; do
        # Match the whole name so that "node1" never matches "node10".
        grep -Eq "^[[:space:]]*$(node_addr $i)[[:space:]]+node$i([[:space:]]|\$)" /etc/hosts \
            || echo "$(node_addr $i) node$i" >>/etc/hosts
    done
}

ensure_conf_link() {
    mkdir -p /etc/slurm
    local link=/etc/slurm/slurm.conf
    if [[ -e $link && ! -L $link ]]; then
        log "warning: $link is a regular file; left alone. Export SLURM_CONF=$CONF to use this cluster."
        return 0
    fi
    ln -sfn "$CONF" "$link"
}

# Fake GPUs: slurmd only accepts gres File= entries that are character devices (plain files make the node
# INVALID), so make /dev/null look-alikes (major 1, minor 3). Nothing ever opens them.
ensure_fake_gpus() {
    local n g
    mkdir -p "$DIR/dev"
    for n in "${NODES[@]}"; do
        for g in 0 1; do
            [[ -c $DIR/dev/$n-gpu$g ]] || { rm -f "$DIR/dev/$n-gpu$g"; mknod -m 666 "$DIR/dev/$n-gpu$g" c 1 3; }
        done
    done
}

# ---------------------------------------------------------------------------------------------------- configs
write_configs() {
    mkdir -p "$DIR"/{etc,log,run,ctld,spool/node1,spool/node2,munge,mysql}
    chmod 700 "$DIR/munge"
    local host; host=$(hostname -s)
    cat >"$CONF" <<EOF
# Generated by slurm/local-cluster.sh; rewritten on every start.
ClusterName=$CLUSTER
# The controller runs in the host's own UTS namespace, so it must be named by the real hostname.
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: a requeued job may restart after 10 s instead of the default 120 s.
AuthInfo=socket=$MUNGE_SOCK,cred_expire=10
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in containers: track job processes through /proc, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
GresTypes=gpu
# Accounting through slurmdbd: submitit reads job states from sacct.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
AccountingStorageTRES=gres/gpu
# Connections to slurmdbd take their munge socket from here, not from AuthInfo.
AccountingStoragePass=$MUNGE_SOCK
JobCompType=jobcomp/none
JobRequeue=1
ReturnToService=2
PreemptType=preempt/none
PreemptMode=OFF
# Fast turnaround for tests.
KillWait=5
MinJobAge=60
SchedulerParameters=sched_interval=2,bf_interval=1
SlurmdTimeout=30
SlurmctldTimeout=30
InactiveLimit=0
# slurmctld binds to 127.0.0.1 only. (NoInAddrAny, which would do the same for slurmd, breaks srun:
# steps launched from inside a job fail with "Slurmd could not connect IO".)
CommunicationParameters=NoCtldInAddrAny
# Trust the CPUs/RealMemory below rather than what slurmd detects (we oversubscribe a small box).
SlurmdParameters=config_overrides
EOF
    local i
    for i in 1 2; do
        echo "NodeName=node$i NodeHostname=node$i NodeAddr=$(node_addr $i) Port=$(node_port $i)" \
             "CPUs=$NODE_CPUS RealMemory=$NODE_MEM_MB Gres=gpu:2 State=UNKNOWN" >>"$CONF"
    done
    echo "PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=60 State=UP" >>"$CONF"

    {
        echo "# Generated by slurm/local-cluster.sh. Fake GPUs: character devices, see ensure_fake_gpus."
        echo "AutoDetect=off"
        for i in 1 2; do echo "NodeName=node$i Name=gpu File=$DIR/dev/node$i-gpu[0-1]"; done
    } >"$DIR/etc/gres.conf"

    # slurmdbd refuses a config that others can read; it holds no password (root via unix-socket auth).
    install -m 600 /dev/null "$DIR/etc/slurmdbd.conf"
    cat >"$DIR/etc/slurmdbd.conf" <<EOF
# Generated by slurm/local-cluster.sh.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$DIR/log/slurmdbd.log
PidFile=$DIR/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
EOF
    # cgroup.conf is read by slurmd even with proctrack/linuxproc on some versions; keep it harmless.
    echo "CgroupPlugin=autodetect" >"$DIR/etc/cgroup.conf"
}

# ---------------------------------------------------------------------------------------------------- daemons
start_munge() {
    [[ -f $DIR/munge/munge.key ]] || { dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
                                      chmod 400 "$DIR/munge/munge.key"; }
    if need_start "$DIR/run/munged.pid"; then
        munged 9>&- --force --socket="$MUNGE_SOCK" --key-file="$DIR/munge/munge.key" \
            --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
            --seed-file="$DIR/munge/munged.seed"
    fi
    wait_for "munged" "$DIR/log/munged.log" bash -c "munge -n -S '$MUNGE_SOCK' | unmunge -S '$MUNGE_SOCK'"
}

mysql_q() { mariadb --no-defaults --socket="$MYSQL_SOCK" -u root -N -e "$1"; }

start_mariadb() {
    if [[ ! -d $DIR/mysql/data/mysql ]]; then
        log "initialising MariaDB in $DIR/mysql/data (first start only)"
        mariadb-install-db --no-defaults --user=root --datadir="$DIR/mysql/data" \
            --auth-root-authentication-method=socket --skip-test-db \
            >"$DIR/log/mariadb-install.log" 2>&1 || { tail -n 30 "$DIR/log/mariadb-install.log" >&2; exit 1; }
    fi
    if need_start "$DIR/run/mysqld.pid"; then
        # setsid + nohup: the server must outlive this script and its terminal.
        setsid nohup mariadbd 9>&- --no-defaults --user=root --datadir="$DIR/mysql/data" \
            --socket="$MYSQL_SOCK" --pid-file="$DIR/run/mysqld.pid" --log-error="$DIR/log/mariadb.log" \
            --skip-networking --innodb-buffer-pool-size=32M --innodb-log-file-size=16M \
            --performance-schema=OFF --skip-name-resolve </dev/null >/dev/null 2>&1 &
    fi
    wait_for "MariaDB" "$DIR/log/mariadb.log" mysql_q "SELECT 1"
    mysql_q "CREATE DATABASE IF NOT EXISTS slurm_acct_db"
}

start_slurmdbd() {
    if need_start "$DIR/run/slurmdbd.pid"; then
        # libmariadb honours MYSQL_UNIX_PORT, which points slurmdbd at our socket (no TCP at all).
        SLURM_CONF="$CONF" MYSQL_UNIX_PORT="$MYSQL_SOCK" slurmdbd 9>&-
    fi
    wait_for "slurmdbd" "$DIR/log/slurmdbd.log" sl sacctmgr -n list cluster
    if ! sl sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
        sl sacctmgr -i add cluster "$CLUSTER" >/dev/null
    fi
    # No account setup: adding the cluster gives root a root/root association, which jobs use.
}

start_slurmctld() {
    if need_start "$DIR/run/slurmctld.pid"; then SLURM_CONF="$CONF" slurmctld -f "$CONF" 9>&-; fi
    wait_for "slurmctld" "$DIR/log/slurmctld.log" sl scontrol ping
}

start_slurmd() {
    local n=$1 pidf="$DIR/run/slurmd-$1.pid"
    need_start "$pidf" || return 0
    # slurmd forks into the background and keeps the new UTS namespace; its job steps inherit it,
    # which is how stop finds them (node_job_pids).
    SLURM_CONF="$CONF" unshare 9>&- --uts bash -c "hostname $n && exec slurmd -f '$CONF' -N $n"
    wait_for "slurmd $n pid file" "$DIR/log/slurmd-$n.log" pid_alive "$pidf"
}

nodes_idle() {
    local out; out=$(sl sinfo -h -N -o '%N %t') || return 1
    [[ $(grep -cE '^node[12] idle$' <<<"$out") -eq 2 ]]
}

ctld_registered() {
    # ControlPort is filled in once slurmctld has registered itself with slurmdbd.
    sl sacctmgr -n -P list cluster "$CLUSTER" format=controlport | grep -qx "$CTLD_PORT"
}

cmd_start() {
    [[ $EUID -eq 0 ]] || die "start needs root (daemons, /etc/hosts, mknod)"
    local p
    for p in munged mariadbd slurmdbd slurmctld slurmd; do
        command -v "$p" >/dev/null || die "$p not found; run: $0 install"
    done
    local t0=$SECONDS
    ensure_hosts
    write_configs
    ensure_conf_link
    ensure_fake_gpus
    start_munge
    start_mariadb
    start_slurmdbd
    start_slurmctld
    for p in "${NODES[@]}"; do start_slurmd "$p"; done
    # Nodes may come back DOWN/DRAIN from a previous run's saved state; resume them.
    local deadline=$((SECONDS + START_TIMEOUT))
    until nodes_idle; do
        if sl sinfo -h -N -o '%t' | grep -qE 'down|drain|drng'; then
            sl scontrol update nodename=node1,node2 state=resume >/dev/null 2>&1 || true
        fi
        if ((SECONDS >= deadline)); then
            log "timed out after ${START_TIMEOUT}s waiting for node1 and node2 to be idle:"
            sl sinfo -N -l >&2 || true
            for p in "${NODES[@]}"; do log "--- tail of slurmd-$p.log"; tail -n 20 "$DIR/log/slurmd-$p.log" >&2 || true; done
            log "--- tail of slurmctld.log"; tail -n 20 "$DIR/log/slurmctld.log" >&2 || true
            exit 1
        fi
        sleep 0.3
    done
    wait_for "slurmctld to register with slurmdbd" "$DIR/log/slurmdbd.log" ctld_registered
    log "up in $((SECONDS - t0)) s (state in $DIR)"
    sl sinfo
}

# ---------------------------------------------------------------------------------------------------- stop
# stop_pidfiles PIDFILE...: TERM every live daemon at once, wait up to 10 s for all, then KILL stragglers.
# Signalling them together makes stop take as long as the slowest daemon, not the sum.
stop_pidfiles() {
    local f pids=() pid i
    for f in "$@"; do
        if pid_alive "$f"; then
            pid=$(cat "$f")
            kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
        fi
        rm -f "$f"
    done
    for ((i = 0; i < 100 && ${#pids[@]} > 0; i++)); do
        local alive=()
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
        pids=("${alive[@]+"${alive[@]}"}")
        ((${#pids[@]} == 0)) || sleep 0.1
    done
    for pid in "${pids[@]+"${pids[@]}"}"; do log "pid $pid ignored TERM; killing"; kill -KILL "$pid" 2>/dev/null || true; done
}

# Pids of every process in slurmd's UTS namespace other than slurmd: the node's slurmstepd and job tasks.
# The namespace identifies them exactly, so nothing is matched by name.
node_job_pids() {
    local pidf=$1 slurmd p
    pid_alive "$pidf" || return 0
    slurmd=$(cat "$pidf")
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        [[ $p != "$slurmd" && /proc/$p/ns/uts -ef /proc/$slurmd/ns/uts ]] && echo "$p"
    done
    return 0
}

cmd_stop() {
    # Cancel jobs first so that accounting records them as CANCELLED rather than leaving them RUNNING.
    if pid_alive "$DIR/run/slurmctld.pid"; then
        sl scancel --user=root >/dev/null 2>&1 || true
    fi
    local n leftovers=()
    for n in "${NODES[@]}"; do
        while read -r p; do [[ -n $p ]] && leftovers+=("$p"); done < <(node_job_pids "$DIR/run/slurmd-$n.pid")
    done
    # Kill job processes before slurmd: a slurmd still waiting on its steps shuts down slowly.
    for p in "${leftovers[@]+"${leftovers[@]}"}"; do kill -KILL "$p" 2>/dev/null || true; done
    stop_pidfiles "$DIR"/run/slurmd-node{1,2}.pid "$DIR/run/slurmctld.pid"
    # slurmdbd before MariaDB and munge, which it needs while shutting down cleanly.
    stop_pidfiles "$DIR/run/slurmdbd.pid"
    stop_pidfiles "$DIR/run/mysqld.pid" "$DIR/run/munged.pid"
    # The test fixture's note that it started the cluster (tests/integration/conftest.py) is void now.
    rm -f "$DIR/run/started-by-pytest"
    log "stopped"
}

cmd_status() {
    if pid_alive "$DIR/run/slurmctld.pid" && sl sinfo 2>/dev/null; then return 0; fi
    log "down"
    return 3
}

cmd_clean() {
    cmd_stop
    rm -rf "$DIR"
    if [[ -L /etc/slurm/slurm.conf ]]; then rm -f /etc/slurm/slurm.conf; fi
    log "removed $DIR"
}

# One start/stop/clean at a time: two test sessions starting the cluster together would race on pid
# files. The lock lives next to the state directory so that clean can delete the directory.
# Daemons are started with `9>&-` so that they do not inherit (and hold forever) the lock.
serialize() { mkdir -p "$(dirname "$DIR")"; exec 9>"$DIR.lock"; flock -w 300 9 || die "could not lock $DIR.lock"; }

case "${1:-}" in
    install) cmd_install ;;
    start) serialize; cmd_start ;;
    stop) serialize; cmd_stop ;;
    status) cmd_status ;;
    clean) serialize; cmd_clean ;;
    *) echo "usage: $0 install|start|stop|status|clean" >&2; exit 2 ;;
esac
