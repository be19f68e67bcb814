#!/usr/bin/env bash
# Installs a Python tool from PyPI into its own venv in a cache directory outside the clone when
# it is missing, and prints the path of its binary (checkov, schemathesis: see their scripts).
#   .ci/pip-tool.sh <package> <version> <binary>
set -euo pipefail

package="$1" version="$2" binary="$3"
cache="${TUNNOX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tunnox}"
venv="$cache/$package/$version"
bin="$venv/bin/$binary"
log() { printf '%s: %s\n' "$package" "$*" >&2; }

if [[ ! -x $bin ]]; then
    log "installing $package $version into $venv (first time: a few minutes)"
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
    "$venv/bin/pip" install --quiet --disable-pip-version-check "$package==$version" >&2
fi
echo "$bin"
