#!/usr/bin/env bash
# Starts and stops the real services ebb's tests run against, on loopback, without Docker:
# one Apache Kafka broker (KRaft, combined broker+controller) and AxonOps Schema Registry
# (Confluent-compatible REST API, memory storage).
#
#   compose/kafka.sh up [--fresh]   start both (reusing what is downloaded); exit 0 once both answer
#   compose/kafka.sh down           stop both
#   compose/kafka.sh status         say what runs; exit 0 only if both answer
#   compose/kafka.sh env            print the variables a test run needs (EBB_TEST_BROKERS, ...)
#
# Environment (all optional):
#   EBB_KAFKA_PORT (9092)  EBB_KAFKA_CONTROLLER_PORT (9093)  EBB_REGISTRY_PORT (8081)
#   EBB_SERVICES_CACHE  downloads, reused across runs   (default ~/.cache/ebb)
#   EBB_SERVICES_DATA   logs, pids and broker storage   (default <repo>/.services)
set -euo pipefail

# Pinned versions: bump deliberately, never float.
KAFKA_VERSION=4.1.1            # also in compose/kafka/pom.xml
REGISTRY_MODULE=github.com/axonops/axonops-schema-registry
REGISTRY_VERSION=v0.2.1

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
kafka_port="${EBB_KAFKA_PORT:-9092}"
controller_port="${EBB_KAFKA_CONTROLLER_PORT:-9093}"
registry_port="${EBB_REGISTRY_PORT:-8081}"
cache="${EBB_SERVICES_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ebb}"
data="${EBB_SERVICES_DATA:-$repo/.services}"
jars="$cache/kafka-$KAFKA_VERSION"
registry_bin="$cache/schema-registry-$REGISTRY_VERSION"

say() { printf 'kafka.sh: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

kafka_ready() {
  pid_alive "$data/kafka.pid" && port_open "$kafka_port" \
    && grep -q 'Kafka Server started' "$data/kafka.log" 2>/dev/null
}

registry_ready() {
  pid_alive "$data/registry.pid" \
    && curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:$registry_port/subjects"
}

fetch_kafka() {
  [[ -f "$jars/.complete" ]] && return 0
  command -v mvn >/dev/null || die "mvn not found: Maven is needed to fetch Apache Kafka's jars"
  command -v java >/dev/null || die "java not found: Apache Kafka $KAFKA_VERSION needs Java 17+"
  say "fetching Apache Kafka $KAFKA_VERSION jars from Maven Central into $jars"
  rm -rf "$jars" && mkdir -p "$jars"
  mvn -q -B -Dstyle.color=never -f "$here/kafka/pom.xml" dependency:copy-dependencies \
    -Dkafka.version="$KAFKA_VERSION" -DincludeScope=runtime -DoutputDirectory="$jars" \
    || die "mvn dependency:copy-dependencies failed"
  touch "$jars/.complete"
}

fetch_registry() {
  [[ -x "$registry_bin" ]] && return 0
  command -v go >/dev/null || die "go not found: the registry is built from the Go module proxy"
  say "building $REGISTRY_MODULE@$REGISTRY_VERSION into $registry_bin"
  # `go install pkg@version` also asks the proxy for the module's version list (to report
  # deprecations), which the proxy refuses for this module; downloading the pinned version
  # and building it from the module cache needs only that version.
  local dir
  dir="$(go mod download -json "$REGISTRY_MODULE@$REGISTRY_VERSION" \
    | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
  [[ -n "$dir" && -d "$dir" ]] || die "go mod download $REGISTRY_MODULE@$REGISTRY_VERSION failed"
  mkdir -p "$cache"
  (cd "$dir" && GOFLAGS=-mod=mod go build -o "$registry_bin.tmp" ./cmd/schema-registry) \
    || die "go build of the schema registry failed"
  mv "$registry_bin.tmp" "$registry_bin"
}

write_kafka_config() {
  mkdir -p "$data/kafka-logs"
  cat >"$data/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$controller_port
listeners=PLAINTEXT://127.0.0.1:$kafka_port,CONTROLLER://127.0.0.1:$controller_port
advertised.listeners=PLAINTEXT://127.0.0.1:$kafka_port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$data/kafka-logs
num.partitions=3
# One broker: every internal topic has one replica.
offsets.topic.replication.factor=1
offsets.topic.num.partitions=6
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=6
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
# Topics are declared in topics/ and created by 'ebb topics apply', never by accident.
auto.create.topics.enable=false
# Oversized telemetry must still reach the dead-letter topic unchanged.
message.max.bytes=4194304
EOF
  cat >"$data/log4j2.properties" <<EOF
rootLogger.level=INFO
rootLogger.appenderRef.file.ref=file
appender.file.type=File
appender.file.name=file
appender.file.fileName=$data/kafka.log
appender.file.layout.type=PatternLayout
appender.file.layout.pattern=[%d] %p %m (%c)%n
EOF
}

wait_for() { # name, seconds, check-function
  local name="$1" secs="$2" check="$3" i
  for ((i = 0; i < secs * 4; i++)); do
    "$check" && return 0
    sleep 0.25
  done
  return 1
}

start_kafka() {
  if kafka_ready; then say "Kafka already up on 127.0.0.1:$kafka_port"; return 0; fi
  port_open "$kafka_port" && die "port $kafka_port is taken by another process (set EBB_KAFKA_PORT)"
  fetch_kafka
  write_kafka_config
  local cp="$jars/*" java_opts=(-Xms256m -Xmx1g -Dlog4j2.configurationFile="$data/log4j2.properties")
  if [[ ! -f "$data/kafka-logs/meta.properties" ]]; then
    local id
    id="$(java -cp "$cp" "${java_opts[@]}" kafka.tools.StorageTool random-uuid 2>>"$data/kafka.err")"
    java -cp "$cp" "${java_opts[@]}" kafka.tools.StorageTool format --standalone -t "$id" \
      -c "$data/server.properties" >>"$data/kafka.err" 2>&1 || die "formatting storage failed: $(tail -5 "$data/kafka.err")"
  fi
  : >"$data/kafka.log"
  nohup java -cp "$cp" "${java_opts[@]}" kafka.Kafka "$data/server.properties" \
    >>"$data/kafka.err" 2>&1 </dev/null &
  echo $! >"$data/kafka.pid"
  if ! wait_for kafka 90 kafka_ready; then
    die "Kafka did not start within 90 s; last lines of $data/kafka.err and kafka.log:
$(tail -5 "$data/kafka.err" 2>/dev/null) $(tail -5 "$data/kafka.log" 2>/dev/null)"
  fi
  say "Kafka $KAFKA_VERSION up on 127.0.0.1:$kafka_port"
}

start_registry() {
  if registry_ready; then say "registry already up on http://127.0.0.1:$registry_port"; return 0; fi
  port_open "$registry_port" && die "port $registry_port is taken by another process (set EBB_REGISTRY_PORT)"
  fetch_registry
  SCHEMA_REGISTRY_HOST=127.0.0.1 SCHEMA_REGISTRY_PORT="$registry_port" \
    SCHEMA_REGISTRY_STORAGE_TYPE=memory SCHEMA_REGISTRY_LOG_LEVEL=warn \
    nohup "$registry_bin" >>"$data/registry.log" 2>&1 </dev/null &
  echo $! >"$data/registry.pid"
  wait_for registry 30 registry_ready \
    || die "registry did not answer within 30 s: $(tail -5 "$data/registry.log")"
  say "AxonOps Schema Registry $REGISTRY_VERSION up on http://127.0.0.1:$registry_port"
}

stop() { # name
  local pidfile="$data/$1.pid" pid i
  pid_alive "$pidfile" || { rm -f "$pidfile"; return 0; }
  pid="$(cat "$pidfile")"
  kill "$pid" 2>/dev/null || true
  for ((i = 0; i < 120; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$pidfile"
  say "$1 stopped"
}

cmd="${1:-}"
shift || true
case "$cmd" in
  up)
    fresh=0
    for arg in "$@"; do
      case "$arg" in
        --fresh) fresh=1 ;;
        *) die "unknown option to up: $arg" ;;
      esac
    done
    mkdir -p "$data"
    if ((fresh)); then stop registry; stop kafka; rm -rf "$data"; mkdir -p "$data"; fi
    start_kafka
    start_registry
    ;;
  down)
    stop registry
    stop kafka
    ;;
  status)
    ok=0
    if kafka_ready; then say "Kafka: up on 127.0.0.1:$kafka_port"; else say "Kafka: down"; ok=1; fi
    if registry_ready; then say "registry: up on http://127.0.0.1:$registry_port"; else say "registry: down"; ok=1; fi
    exit "$ok"
    ;;
  env)
    echo "EBB_TEST_BROKERS=127.0.0.1:$kafka_port"
    echo "EBB_TEST_REGISTRY=http://127.0.0.1:$registry_port"
    ;;
  *)
    echo "usage: compose/kafka.sh up [--fresh] | down | status | env" >&2
    exit 2
    ;;
esac
