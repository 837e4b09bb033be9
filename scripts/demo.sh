#!/usr/bin/env bash
# Runs fleet-demo: a burst of ClearML tasks scales a local fleet up and back to zero, with no cloud account
# and no ClearML server. Installs what the build needs first when it is missing (protoc from the Debian package
# protobuf-compiler) and the Python venv with clearml-agent, so the node agents run the real clearml-agent.
# Arguments go to fleet-demo, for example: scripts/demo.sh --exit-when-idle --json
set -euo pipefail

repo_dir="$(cd "$(dirname "$0")/.." && pwd)"
cache_dir="${XDG_CACHE_HOME:-$HOME/.cache}/clearml-fleet"
export FLEET_VENV="${FLEET_VENV:-$cache_dir/venv}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache_dir/target}"
# Incremental data of every clone's build piles up in the shared target directory (tens of GB after a
# few dozen runs) and saves little for a full build, so it is off unless the caller turns it on.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
script_name=demo.sh
# shellcheck source=scripts/common.sh
source "$repo_dir/scripts/common.sh"

command -v cargo >/dev/null 2>&1 || fail "cargo is missing; install Rust 1.94 or newer with rustup"
install_system_packages base
install_venv

cd "$repo_dir"
log "building fleet-demo (target dir $CARGO_TARGET_DIR; a first build takes about 10 minutes on two cores)"
cargo build --quiet -p fleet-tests --bin fleet-demo
exec "$CARGO_TARGET_DIR/debug/fleet-demo" "$@"
