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
# The tunnel bench's peers live outside the clone, never in CI: rathole from the crate registry
# (pinned; its TCP transport only), installed when missing. frp is used when its binaries are in
# $peers/frp-<version>/ (built from its repository by whoever runs the bench); without them the
# frp side is reported as not measured.
peers="${TUNNOX_PEERS:-$HOME/.cache/tunnox/peers}"
rathole_version=0.5.0
if [[ ! -x $peers/rathole-$rathole_version/bin/rathole ]]; then
    # Without --locked: rathole's lock file pins a `time` that no longer builds on current Rust.
    CARGO_TARGET_DIR="$peers/rathole-build" cargo install rathole --version "$rathole_version" \
        --no-default-features --features server,client --root "$peers/rathole-$rathole_version"
fi
TUNNOX_PEERS="$peers" cargo bench --locked --bench tunnel >>"$tmp"
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
