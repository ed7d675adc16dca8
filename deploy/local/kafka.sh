#!/usr/bin/env bash
# Runs the local single-node Apache Kafka broker (KRaft, broker+controller in one JVM)
# on 127.0.0.1:9092 from the official jars, which Maven resolves from Maven Central
# into deploy/local/kafka/lib/ (see deploy/local/kafka/pom.xml).
#
#   deploy/local/kafka.sh up       resolve jars if needed, format storage on first start,
#                                  start the broker, wait until it answers a Kafka request
#                                  (harmless when it is already running)
#   deploy/local/kafka.sh down     stop it (SIGTERM, SIGKILL after 30 s; harmless when stopped)
#   deploy/local/kafka.sh status   print running/stopped; exit 0 when running, 1 when stopped
#   deploy/local/kafka.sh logs [-f]  print the end of the broker log (-f: follow it)
#
# Data lives in deploy/local/data/kafka, pid file and logs in deploy/local/run (both git-ignored).
# Topics are not created here: `make kafka-up` creates them from the catalogue afterwards.
# Environment: PY (python with confluent-kafka, default .venv/bin/python), JAVA (default java),
# MVN (default mvn), KAFKA_START_TIMEOUT (default 90 s).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."      # the repository root
ROOT=$PWD
LOCAL=$ROOT/deploy/local
KAFKA_DIR=$LOCAL/kafka
LIB=$KAFKA_DIR/lib
DATA=$LOCAL/data/kafka
RUN=$LOCAL/run
PID_FILE=$RUN/kafka.pid
LOG=$RUN/kafka.log
OUT=$RUN/kafka.out
CONFIG=$RUN/server.properties
# Ports can be moved (e.g. to run a second broker beside a developer's own); clients then
# need MAILRAIL_KAFKA_BOOTSTRAP=127.0.0.1:$KAFKA_PORT.
KAFKA_PORT=${KAFKA_PORT:-9092}
KAFKA_CONTROLLER_PORT=${KAFKA_CONTROLLER_PORT:-9093}
BOOTSTRAP=127.0.0.1:$KAFKA_PORT

PY=${PY:-.venv/bin/python}
JAVA=${JAVA:-java}
MVN=${MVN:-mvn}
START_TIMEOUT=${KAFKA_START_TIMEOUT:-90}   # seconds `up` waits for the broker to answer
STOP_TIMEOUT=30                          # seconds `down` waits before SIGKILL

JVM_OPTS=(
    -Xms256m -Xmx768m
    -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35
    -XX:+ExplicitGCInvokesConcurrent
    -Djava.awt.headless=true
    -Dlog4j2.configurationFile="$KAFKA_DIR/log4j2.xml"
    -Dkafka.logs.dir="$RUN"
)

log() { echo "kafka: $*"; }
die() { echo "kafka: $*" >&2; exit 1; }

# The broker's pid, when the pid file names a live kafka.Kafka process; empty otherwise.
broker_pid() {
    local pid
    [[ -f $PID_FILE ]] || return 0
    pid=$(<"$PID_FILE")
    if [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" \
        && tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -qx 'kafka\.Kafka'; then
        echo "$pid"
    fi
}

# True while the process exists and has not finished exiting. A dying JVM's main thread turns
# zombie before its other threads are gone (and with them its sockets), and a zombie may wait
# a while for PID 1 to reap it: so a zombie main thread counts as alive while other threads remain.
alive() {
    local stat tasks
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != Z ]] && return 0
    tasks=("/proc/$1/task/"*)
    ((${#tasks[@]} > 1))
}

# True when the broker answers a metadata request and lists itself.
answers() {
    "$PY" - "$BOOTSTRAP" 2>/dev/null <<'EOF'
import sys
from confluent_kafka.admin import AdminClient
admin = AdminClient({"bootstrap.servers": sys.argv[1], "log_level": 0})
sys.exit(0 if admin.list_topics(timeout=2).brokers else 1)
EOF
}

# Copy the jars into lib/ when lib/ is missing or older than the pom.
resolve_jars() {
    if [[ -f $LIB/.resolved && ! $KAFKA_DIR/pom.xml -nt $LIB/.resolved ]]; then
        return 0
    fi
    command -v "$MVN" >/dev/null || die "Maven ($MVN) is needed to fetch the Kafka jars"
    log "resolving the Kafka jars with Maven into ${LIB#"$ROOT"/}"
    local staging=$RUN/lib.tmp                # filled completely before it replaces lib/
    rm -rf "$staging"
    # Maven's output (only escape codes when all goes well) is shown only on failure.
    if ! (cd "$KAFKA_DIR" && "$MVN" -q -B -Dstyle.color=never dependency:copy-dependencies \
            -DincludeScope=runtime -DoutputDirectory="$staging") >"$RUN/mvn.log" 2>&1; then
        cat "$RUN/mvn.log" >&2
        die "Maven could not resolve the Kafka jars"
    fi
    touch "$staging/.resolved"
    rm -rf "$LIB"
    mv "$staging" "$LIB"
}

# The effective config: the template plus the absolute data directory.
write_config() {
    { sed -e "s/:9092/:$KAFKA_PORT/g" -e "s/:9093/:$KAFKA_CONTROLLER_PORT/g" "$KAFKA_DIR/server.properties"
      echo; echo "log.dirs=$DATA"; } >"$CONFIG"
}

# Format the storage (random cluster id, this node as the only controller) on first start only.
format_storage() {
    [[ -f $DATA/meta.properties ]] && return 0
    local cluster_id
    mkdir -p "$DATA"
    cluster_id=$("$JAVA" -cp "$LIB/*" "${JVM_OPTS[@]}" kafka.tools.StorageTool random-uuid)
    log "formatting ${DATA#"$ROOT"/} (cluster id $cluster_id)"
    "$JAVA" -cp "$LIB/*" "${JVM_OPTS[@]}" kafka.tools.StorageTool format \
        --config "$CONFIG" --cluster-id "$cluster_id" --standalone >>"$OUT" 2>&1 \
        || { tail -n 20 "$OUT" >&2; die "formatting the storage failed"; }
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# SIGTERM (Kafka then shuts down cleanly), SIGKILL after STOP_TIMEOUT; returns once the process
# is gone, so that its ports are free again.
stop_broker() {
    local pid=$1 deadline=$((SECONDS + STOP_TIMEOUT))
    kill -TERM "$pid" 2>/dev/null || true
    while alive "$pid" && ((SECONDS < deadline)); do
        sleep 0.2
    done
    if alive "$pid"; then
        log "still running after ${STOP_TIMEOUT}s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        while alive "$pid"; do sleep 0.1; done
    fi
}

show_tail() {
    echo "--- last lines of ${LOG#"$ROOT"/} ---" >&2
    tail -n 30 "$LOG" >&2 2>/dev/null || true
    if [[ -s $OUT ]]; then
        echo "--- last lines of ${OUT#"$ROOT"/} ---" >&2
        tail -n 15 "$OUT" >&2
    fi
}

cmd_up() {
    local pid deadline
    [[ -x $PY ]] || die "$PY not found: run 'make venv' first (or set PY)"
    command -v "$JAVA" >/dev/null || die "Java 17+ ($JAVA) is needed"
    mkdir -p "$RUN"
    exec 9>"$RUN/kafka.lock"
    flock 9                                  # one `up`/`down` at a time

    pid=$(broker_pid)
    if [[ -n $pid ]]; then
        deadline=$((SECONDS + START_TIMEOUT))
        until answers; do
            ((SECONDS < deadline)) || { show_tail; die "broker (pid $pid) runs but does not answer on $BOOTSTRAP"; }
            sleep 1
        done
        log "already running (pid $pid) on $BOOTSTRAP"
        return 0
    fi
    rm -f "$PID_FILE"                        # stale or absent
    for port in "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT"; do
        port_in_use "$port" && die "127.0.0.1:$port is taken by another process (not our broker)"
    done

    resolve_jars
    write_config
    : >"$OUT"
    format_storage

    log "starting the broker on $BOOTSTRAP"
    # setsid: the broker outlives the shell (and Ctrl-C) that started it.
    setsid "$JAVA" -cp "$LIB/*" "${JVM_OPTS[@]}" kafka.Kafka "$CONFIG" </dev/null >>"$OUT" 2>&1 9>&- &
    pid=$!
    echo "$pid" >"$PID_FILE"

    deadline=$((SECONDS + START_TIMEOUT))
    until answers; do
        if ! alive "$pid"; then
            rm -f "$PID_FILE"
            show_tail
            die "the broker exited during start-up"
        fi
        if ((SECONDS >= deadline)); then
            show_tail
            stop_broker "$pid"
            rm -f "$PID_FILE"
            die "the broker did not answer on $BOOTSTRAP within ${START_TIMEOUT}s (stopped it)"
        fi
        sleep 0.5
    done
    log "up (pid $pid) on $BOOTSTRAP"
}

cmd_down() {
    local pid
    mkdir -p "$RUN"
    exec 9>"$RUN/kafka.lock"
    flock 9
    pid=$(broker_pid)
    if [[ -z $pid ]]; then
        rm -f "$PID_FILE"
        log "not running"
        return 0
    fi
    log "stopping the broker (pid $pid)"
    stop_broker "$pid"
    rm -f "$PID_FILE"
    log "stopped"
}

cmd_status() {
    local pid
    pid=$(broker_pid)
    if [[ -n $pid ]]; then
        echo "running (pid $pid) on $BOOTSTRAP"
    else
        echo "stopped"
        return 1
    fi
}

cmd_logs() {
    [[ -f $LOG ]] || die "no log yet (${LOG#"$ROOT"/})"
    if [[ ${1:-} == -f ]]; then
        exec tail -n 100 -F "$LOG"
    fi
    tail -n 100 "$LOG"
}

case ${1:-} in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    logs) shift; cmd_logs "$@" ;;
    *) echo "usage: $0 up|down|status|logs [-f]" >&2; exit 2 ;;
esac
