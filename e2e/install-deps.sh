#!/usr/bin/env bash
# Installs what the e2e harness needs when it is missing: redis-server,
# openssl, curl, python3, nginx, wrk, and helm (built with `go install` into the cache directory).
#   e2e/install-deps.sh               install what is missing
#   e2e/install-deps.sh --print-helm  print the helm binary path (installing it if needed)
#   e2e/install-deps.sh --print-pebble  print the directory of pebble and pebble-challtestsrv
set -euo pipefail

HELM_VERSION="v3.22.0"
# The ACME test's CA: pebble and its DNS/challenge test server (the e2e scenario
# https_certificates_from_acme).
PEBBLE_VERSION="v2.10.1"
cache="${TUNNOX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tunnox}"
helm_bin="$cache/helm/$HELM_VERSION/helm"
pebble_dir="$cache/pebble/$PEBBLE_VERSION"
log() { printf 'install-deps: %s\n' "$*" >&2; }

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v setsid >/dev/null 2>&1 || need+=(util-linux)
# The proxy's drain test and benchmarks: nginx as the balancer / the comparison, wrk as load.
command -v nginx >/dev/null 2>&1 || need+=(nginx)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
if ((${#need[@]})); then
    sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    log "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    # Packaged services are not used: the harness starts its own on free loopback ports.
    if command -v systemctl >/dev/null 2>&1; then
        $sudo systemctl disable --now redis-server nginx >/dev/null 2>&1 || true
    fi
fi

if [[ ! -x $helm_bin ]]; then
    command -v go >/dev/null 2>&1 || { log "error: go is needed to build helm"; exit 1; }
    log "building helm $HELM_VERSION (first time: ~2 minutes)"
    mkdir -p "$(dirname "$helm_bin")"
    GOBIN="$(dirname "$helm_bin")" GOTOOLCHAIN=local GOFLAGS=-buildvcs=false \
        go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >&2
fi

if [[ ! -x $pebble_dir/pebble || ! -x $pebble_dir/pebble-challtestsrv ]]; then
    command -v go >/dev/null 2>&1 || { log "error: go is needed to build pebble"; exit 1; }
    log "building pebble $PEBBLE_VERSION (first time: ~1 minute)"
    mkdir -p "$pebble_dir"
    GOBIN="$pebble_dir" GOTOOLCHAIN=local GOFLAGS=-buildvcs=false \
        go install "github.com/letsencrypt/pebble/v2/cmd/pebble@$PEBBLE_VERSION" \
        "github.com/letsencrypt/pebble/v2/cmd/pebble-challtestsrv@$PEBBLE_VERSION" >&2
fi

if [[ ${1:-} == --print-pebble ]]; then
    echo "$pebble_dir"
fi
if [[ ${1:-} == --print-helm ]]; then
    echo "$helm_bin"
fi
