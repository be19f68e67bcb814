#!/usr/bin/env bash
# Installs the system packages the tests and benchmarks use (redis-server, nginx, wrk, curl),
# when they are missing.
# Safe to run repeatedly; needs root (or sudo) only when something is missing.
set -euo pipefail

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
# The proxy's drain test (nginx as the balancer, wrk as load) and benchmarks.
command -v nginx >/dev/null 2>&1 || need+=(nginx)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v curl >/dev/null 2>&1 || need+=(curl)

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  sudo="sudo"
fi
echo "installing: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# The packaged service is not used: tests start their own servers on free loopback ports.
if command -v systemctl >/dev/null 2>&1; then
  $sudo systemctl disable --now redis-server nginx >/dev/null 2>&1 || true
fi
