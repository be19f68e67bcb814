#!/usr/bin/env bash
# Installs schemathesis (the property-based API fuzzer, from PyPI) into a cache directory
# outside the clone when it is missing, and prints the path of its binary.
#   .ci/schemathesis.sh
set -euo pipefail

ST_VERSION="4.32.5"
cache="${TUNNOX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tunnox}"
venv="$cache/schemathesis/$ST_VERSION"
bin="$venv/bin/st"
log() { printf 'schemathesis: %s\n' "$*" >&2; }

if [[ ! -x $bin ]]; then
    log "installing schemathesis $ST_VERSION into $venv (first time: a few minutes)"
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    if ! python3 -m venv "$venv" >/dev/null 2>&1; then
        # Debian's python3 needs python3-venv for venvs.
        sudo=""
        [[ $(id -u) -eq 0 ]] || sudo="sudo"
        export DEBIAN_FRONTEND=noninteractive
        $sudo apt-get update -qq
        $sudo apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
        rm -rf "$venv"
        python3 -m venv "$venv"
    fi
    "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$ST_VERSION" >&2
fi
echo "$bin"
