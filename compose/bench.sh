#!/usr/bin/env bash
# Benchmarks that print figures. `compose/bench.sh window` installs DuckDB and pyarrow into
# a virtualenv under ~/.cache/ebb (pinned versions), then runs `ebb bench window` with it.
# `compose/bench.sh models` does the same with River (Python online ML) for `ebb bench models`.
# `compose/bench.sh filter [--brokers HOST:PORT]` runs the filter benchmark.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
# The one target directory the test command uses too (.ci/run): a fresh checkout builds
# nothing twice.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${EBB_CACHE:-$HOME/.cache/ebb}/target}"
what="${1:-window}"; shift || true
case "$what" in
  window)
    venv="${EBB_CACHE:-$HOME/.cache/ebb}/bench-venv"
    if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c 'import duckdb, pyarrow' 2>/dev/null; then
      python3 -m venv "$venv"
      "$venv/bin/pip" install --quiet duckdb==1.5.6 pyarrow==22.0.0
    fi
    cargo run --release -q -p ebb -- bench window --python "$venv/bin/python" "$@"
    ;;
  models)
    venv="${EBB_CACHE:-$HOME/.cache/ebb}/bench-venv"
    if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c 'import river' 2>/dev/null; then
      python3 -m venv "$venv"
      "$venv/bin/pip" install --quiet river==0.26.1
    fi
    cargo run --release -q -p ebb -- bench models --python "$venv/bin/python" "$@"
    ;;
  filter)
    cargo run --release -q -p ebb -- bench filter "$@"
    ;;
  *) echo "usage: compose/bench.sh window|models|filter [flags]" >&2; exit 2 ;;
esac
