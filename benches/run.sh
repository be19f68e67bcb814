#!/usr/bin/env bash
# Runs the benchmarks and writes one Markdown report with the command and the machine.
#
#   benches/run.sh [OUT] [BENCH...]
#
# Without BENCH names every benchmark runs and OUT (default docs/benchmarks.md) is rewritten.
# With names (store, proxy, https, tunnel, tunnel_tcp, tunnel_udp, controller, scale) only those run: their sections
# replace the same sections of OUT, the other sections are kept, and the header says which
# sections come from which run.
set -euo pipefail
out="${1:-docs/benchmarks.md}"
shift || true
only=("$@")
cd "$(dirname "$0")/.."
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT

wanted() {
    ((${#only[@]} == 0)) && return 0
    local b
    for b in "${only[@]}"; do [[ $b == "$1" ]] && return 0; done
    return 1
}
for b in "${only[@]}"; do
    case $b in store | proxy | https | tunnel | tunnel_tcp | tunnel_udp | controller | scale) ;; *) echo "unknown benchmark: $b" >&2; exit 2 ;; esac
done

if wanted store; then cargo bench --locked --bench store >>"$tmp"; fi
# nginx and wrk (the proxy and tunnel benches), the API server's etcd (the controller bench).
e2e/install-deps.sh
if wanted proxy; then cargo bench --locked --bench proxy >>"$tmp"; fi
if wanted https; then cargo bench --locked --bench https >>"$tmp"; fi
# The tunnel benches' peers live outside the clone, never in CI: rathole from the crate
# registry (pinned; plain TCP, and a second build with its Noise transport), installed when
# missing. frp is used when its
# binaries are in $peers/frp-<version>/ (built from its repository by whoever runs the
# bench); without them the frp side is reported as not measured.
peers="${TUNNOX_PEERS:-$HOME/.cache/tunnox/peers}"
rathole_version=0.5.0
rathole() {
    if [[ ! -x $peers/rathole-$rathole_version/bin/rathole ]]; then
        # Without --locked: rathole's lock file pins a `time` that no longer builds on current Rust.
        CARGO_TARGET_DIR="$peers/rathole-build" cargo install rathole --version "$rathole_version" \
            --no-default-features --features server,client --root "$peers/rathole-$rathole_version"
    fi
    # The same rathole with its Noise transport: encrypted, as tunnox's and frp's tunnels are.
    if [[ ! -x $peers/rathole-$rathole_version-noise/bin/rathole ]]; then
        CARGO_TARGET_DIR="$peers/rathole-build" cargo install rathole --version "$rathole_version" \
            --no-default-features --features server,client,noise --root "$peers/rathole-$rathole_version-noise"
    fi
}
if wanted tunnel; then
    rathole
    TUNNOX_PEERS="$peers" cargo bench --locked --bench tunnel >>"$tmp"
fi
if wanted tunnel_tcp; then
    rathole
    TUNNOX_PEERS="$peers" cargo bench --locked --bench tunnel_tcp >>"$tmp"
fi
if wanted tunnel_udp; then
    TUNNOX_PEERS="$peers" cargo bench --locked --bench tunnel_udp >>"$tmp"
fi
if wanted controller; then cargo bench --locked --features e2e --bench controller >>"$tmp"; fi
if wanted scale; then cargo bench --locked --bench scale >>"$tmp"; fi

cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
now=$(date -u +%Y-%m-%dT%H:%MZ)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
machine="$(nproc) cores, ${cpu:-unknown CPU}, $(free -g | awk '/Mem:/ {print $2}') GiB"
# A partial re-run keeps the machine the other sections were measured on and names its own.
header() {
    echo "# Benchmarks"
    echo
    echo "Produced by \`make bench\` (\`benches/run.sh\`); every number in a section comes from one run."
    echo "Absolute times on a shared machine are noisy: read the medians and the ratios measured"
    echo "side by side in the same run."
    echo
    echo "- date: $1"
    echo "- commit: $2"
    if [[ -n ${3:-} ]]; then echo "$3"; fi
    echo "- machine: ${4:-$machine}"
    echo "- $(rustc --version)"
    echo "- $(redis-server --version | cut -d' ' -f1-3)"
    echo "- $(nginx -v 2>&1 | sed 's/^nginx version: //'), $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2)"
    echo
}
new=$(mktemp)
trap 'rm -f "$tmp" "$new"' EXIT
if ((${#only[@]} == 0)) || [[ ! -f $out ]]; then
    { header "$now" "$commit"; sed -n '/^## /,$p' "$tmp"; } >"$new"
else
    # Keep the other sections (and the date and commit they were measured at).
    old_date=$(sed -n 's/^- date: //p' "$out" | head -1)
    old_commit=$(sed -n 's/^- commit: //p' "$out" | head -1)
    old_machine=$(sed -n 's/^- machine: //p' "$out" | head -1)
    titles=$(grep '^## ' "$tmp" | sed 's/^## //; s/ (issue:.*//' | paste -sd, - | sed 's/,/, /g')
    reruns=$(grep '^- re-run on ' "$out" || true)
    reruns="${reruns:+$reruns
}- re-run on $now at commit $commit ($machine): $titles"
    {
        header "$old_date" "$old_commit" "$reruns" "${old_machine:-$machine}"
        python3 - "$out" "$tmp" <<'PY'
import re, sys
def sections(text):
    parts = re.split(r'(?m)^(?=## )', text)
    return [(p.split('\n', 1)[0].split(' (issue:')[0], p) for p in parts if p.startswith('## ')]
old = sections(open(sys.argv[1]).read())
new = dict(sections(open(sys.argv[2]).read()))
done = set()
for title, body in old:
    if title in new:
        body = new[title]
        done.add(title)
    sys.stdout.write(body if body.endswith('\n') else body + '\n')
for title, body in sections(open(sys.argv[2]).read()):
    if title not in done:
        sys.stdout.write(body if body.endswith('\n') else body + '\n')
PY
    } >"$new"
fi
mv "$new" "$out"
echo "wrote $out"
