#!/usr/bin/env bash
# Runs the whole test suite. Installs what the tests need first, when it is missing:
#   - etcd and protoc (Debian packages etcd-server and protobuf-compiler),
#   - a Python venv at $FLEET_VENV (default ~/.cache/clearml-fleet/venv) with the pinned packages of
#     scripts/requirements-test.txt: moto's EC2 server, the clearml SDK and clearml-agent.
# Build output goes to $CARGO_TARGET_DIR (default ~/.cache/clearml-fleet/target), outside the clone, so
# a fresh clone reuses earlier builds.
# Extra arguments are passed to `cargo test`, for example: scripts/test.sh -p clearml-api
set -euo pipefail

repo_dir="$(cd "$(dirname "$0")/.." && pwd)"
cache_dir="${XDG_CACHE_HOME:-$HOME/.cache}/clearml-fleet"
export FLEET_VENV="${FLEET_VENV:-$cache_dir/venv}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache_dir/target}"
# Incremental data of every clone's build piles up in the shared target directory (tens of GB after a
# few dozen runs) and saves little for a full build, so it is off unless the caller turns it on.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
script_name=test.sh
# shellcheck source=scripts/common.sh
source "$repo_dir/scripts/common.sh"

command -v cargo >/dev/null 2>&1 || fail "cargo is missing; install Rust 1.94 or newer with rustup"
install_system_packages with-checks
install_venv

cd "$repo_dir"
# Without arguments the whole workspace runs; with them (for example -p clearml-api), exactly what they select.
if [ $# -eq 0 ]; then
    set -- --workspace
fi
log "running cargo test $* (target dir $CARGO_TARGET_DIR)"
started=$SECONDS
cargo test "$@"
log "cargo test finished in $((SECONDS - started)) s"
