#!/usr/bin/env bash
# Runs every benchmark and writes one Markdown report with the command and the machine.
set -euo pipefail
out="${1:-docs/benchmarks.md}"
cd "$(dirname "$0")/.."
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT

cargo bench --locked --bench store >"$tmp"
# nginx and wrk (the proxy bench), the API server's etcd (the controller bench): nothing else.
e2e/install-deps.sh
cargo bench --locked --bench proxy >>"$tmp"
cargo bench --locked --features e2e --bench controller >>"$tmp"

cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
{
  echo "# Benchmarks"
  echo
  echo "Produced by \`make bench\` (\`benches/run.sh\`); every number below comes from one run."
  echo "Absolute times on a shared machine are noisy: read the medians and the ratios measured"
  echo "side by side in the same run."
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- machine: $(nproc) cores, ${cpu:-unknown CPU}, $(free -g | awk '/Mem:/ {print $2}') GiB"
  echo "- $(rustc --version)"
  echo "- $(redis-server --version | cut -d' ' -f1-3)"
  echo "- $(nginx -v 2>&1 | sed 's/^nginx version: //'), $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2)"
  echo
  sed -n '/^## /,$p' "$tmp"
} >"$out"
echo "wrote $out"
