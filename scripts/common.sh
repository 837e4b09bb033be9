# shellcheck shell=bash disable=SC2154
# Shared by scripts/test.sh and scripts/demo.sh: installs what the build and the tests need when it is
# missing. The caller sets repo_dir, FLEET_VENV, CARGO_TARGET_DIR and script_name.
requirements="$repo_dir/scripts/requirements-test.txt"

log() { printf '[%s] %s\n' "$script_name" "$*" >&2; }
fail() { printf '[%s] error: %s\n' "$script_name" "$*" >&2; exit 1; }

# Installs the Debian packages behind the commands that are missing: etcd-server for `etcd`, and
# protobuf-compiler for `protoc`, which the etcd client's build script runs. The argument is `base`, or
# `with-checks` for the checkers of the deploy files that the tests also run: yamllint, shellcheck, packer.
install_system_packages() {
    local packages=()
    command -v etcd >/dev/null 2>&1 || packages+=(etcd-server)
    command -v protoc >/dev/null 2>&1 || packages+=(protobuf-compiler)
    if [ "${1:-}" = with-checks ]; then
        local tool
        for tool in yamllint shellcheck packer; do
            command -v "$tool" >/dev/null 2>&1 || packages+=("$tool")
        done
    fi
    if [ ${#packages[@]} -eq 0 ]; then
        log "etcd present: $(etcd --version | head -n1)"
        log "protoc present: $(protoc --version)"
        return
    fi
    [ -f /etc/debian_version ] || fail "missing ${packages[*]} and this is not Debian; install them so they are on PATH (etcd 3.4 or newer)"
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || fail "missing Debian packages ${packages[*]}; run as root or install them"
        sudo="sudo"
    fi
    log "installing ${packages[*]} with apt-get"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
    # The etcd package may start a system etcd on the default ports; tests start their own on free ports.
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet etcd 2>/dev/null; then
        $sudo systemctl stop etcd || true
    fi
    log "installed ${packages[*]}: $(etcd --version | head -n1), $(protoc --version)"
}

install_venv() {
    local stamp="$FLEET_VENV/.requirements.sha256"
    local wanted
    wanted="$(sha256sum "$requirements" | cut -d' ' -f1)"
    if [ -x "$FLEET_VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$wanted" ]; then
        log "Python venv up to date: $FLEET_VENV"
        return
    fi
    command -v python3 >/dev/null 2>&1 || fail "python3 is missing; install Python 3.9 or newer"
    log "installing Python packages into $FLEET_VENV"
    if [ ! -x "$FLEET_VENV/bin/python" ]; then
        python3 -m venv "$FLEET_VENV" || fail "cannot create a venv at $FLEET_VENV; on Debian install python3-venv"
    fi
    "$FLEET_VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
    echo "$wanted" > "$stamp"
    log "installed: $("$FLEET_VENV/bin/python" -m pip freeze --disable-pip-version-check | grep -iE '^(moto|clearml|clearml-agent)==' | tr '\n' ' ')"
}

