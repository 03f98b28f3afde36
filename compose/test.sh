#!/usr/bin/env bash
# The whole test suite, on a fresh machine: starts real Apache Kafka and the schema registry
# (compose/kafka.sh), then format and lint checks, then every test, mock-cluster and
# real-broker alike. Stops the services it started.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

started=0
if ! compose/kafka.sh status >/dev/null 2>&1; then
  compose/kafka.sh up --fresh
  started=1
fi
cleanup() { if ((started)); then compose/kafka.sh down || true; fi; }
trap cleanup EXIT
eval "$(compose/kafka.sh env | sed 's/^/export /')"

# NAB's own scorer (../shared/tools/nab-scorer) checks `ebb eval anomalies`: it needs pandas.
nab_req="$repo/../shared/tools/nab-scorer/requirements.txt"
if [[ -f "$nab_req" ]]; then
  venv="${EBB_CACHE:-$HOME/.cache/ebb}/nab-venv"
  if ! "$venv/bin/python" -c 'import pandas' 2>/dev/null; then
    echo "== NAB scorer venv ($venv)"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q -r "$nab_req"
  fi
  export EBB_NAB_PYTHON="$venv/bin/python"
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test (mock cluster and real Kafka at $EBB_TEST_BROKERS, registry $EBB_TEST_REGISTRY)"
cargo test --workspace
echo "== Arroyo UDF plugins (own workspace, arrow 51): build each cdylib, call it through the ABI"
arroyo=(--manifest-path udfs/arroyo/Cargo.toml)
cargo fmt "${arroyo[@]}" --all -- --check
cargo build "${arroyo[@]}" --workspace
cargo clippy "${arroyo[@]}" --workspace --all-targets -- -D warnings
cargo test "${arroyo[@]}" --workspace
echo "== docker-compose.yml"
python3 compose/check_compose.py compose/docker-compose.yml
