#!/usr/bin/env bash
# Checks `make run` as a newcomer uses it: wait for the "try this" block, run its kubectl and
# curl commands (the demo page through the proxy, the second page through the agent's tunnel),
# press Ctrl-C (SIGINT to the process group), and check nothing is left running.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$(mktemp)"
pid=""
stop() { # on any exit: never leave the stack running
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
        kill -INT -- "-$pid" 2>/dev/null || true
        for _ in $(seq 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    fi
    rm -f "$out" "$out.headers"
}
trap stop EXIT
fail() { echo "run-smoke: FAILED: $*" >&2; cat "$out" >&2; exit 1; }

# Job control: the stack gets its own process group and, unlike a plain background job, does
# not start with SIGINT ignored, so Ctrl-C can be simulated with SIGINT to that group.
# Build first: the 15 minutes below are for the stack to come up, not for a cold release build.
(cd "$root" && cargo build --locked --profile "${TUNNOX_PROFILE:-release}")
set -m
"$root/e2e/run-local.sh" >"$out" 2>&1 &
pid=$!
for _ in $(seq 1800); do
    grep -q 'Press Ctrl-C' "$out" && break
    kill -0 "$pid" 2>/dev/null || fail "make run exited early"
    sleep 0.5
done
grep -q 'Press Ctrl-C' "$out" || fail "no 'try this' block within 15 minutes"
run_dir=$(sed -n 's|^Logs: \(.*\)/{.*|\1|p' "$out")
kubeconfig=$(sed -n 's|^  export KUBECONFIG=||p' "$out")
kubectl=$(sed -n 's|^  alias kubectl=||p' "$out")
url=$(sed -n "s|^  curl -H 'Host: demo.tunnox.net' ||p" "$out")
# (Not `tee /dev/stderr`: reopening a log file that way truncates it.)
listed=$(KUBECONFIG="$kubeconfig" "$kubectl" get hdm -A)
echo "$listed" >&2
grep -q 'demo.tunnox.net.*Active' <<<"$listed" ||
    fail "kubectl get hdm does not show the demo mapping Active"
curl -fsS -H 'Host: demo.tunnox.net' "$url" | grep -q 'Hello from behind tunnox' ||
    fail "the demo page is not served through the proxy"
grep -q 'demo-tunnel.*laptop.tunnox.net.*Active' <<<"$listed" ||
    fail "kubectl get hdm does not show the tunnel mapping Active"
# The try-this block's curl through the agent's tunnel, as printed.
tunnel_url=$(sed -n "s|^  curl -H 'Host: laptop.tunnox.net' \([^ ]*\).*|\1|p" "$out")
[[ -n $tunnel_url ]] || fail "the try-this block has no curl through the tunnel"
page=$(curl -sS -D "$out.headers" -H 'Host: laptop.tunnox.net' "$tunnel_url") ||
    fail "curl through the tunnel failed"
grep -q 'Hello through the tunnel' <<<"$page" ||
    fail "the laptop page does not come through the tunnel: $(head -1 "$out.headers") $page"
rm -f "$out.headers"
# The try-this block's curl to the TunnelSet's remote port (TCP through the agent).
remote_url=$(sed -n "s|^  curl \(http://127.0.0.1:[0-9]*/\)     # plain TCP.*|\1|p" "$out")
[[ -n $remote_url ]] || fail "the try-this block has no curl to the remote port"
page=$(curl -sS "$remote_url") || fail "curl to the TunnelSet's remote port failed"
grep -q 'Hello through the tunnel' <<<"$page" ||
    fail "the laptop page does not come through the remote port: $page"
# The try-this block's management API calls: the listing shows the demo mapping; a create
# answers Active and the proxy serves it.
api_list=$(sed -n 's|^  curl -H "Authorization: Bearer \$(cat \([^)]*\))" \(http://[^ ]*\)     # the management API$|\1 \2|p' "$out")
read -r api_token_file api_url <<<"$api_list"
[[ -n ${api_url:-} ]] || fail "the try-this block has no management API call"
api_auth="Authorization: Bearer $(cat "$api_token_file")"
curl -fsS -H "$api_auth" "$api_url" | grep -q '"domain":"demo.tunnox.net"' ||
    fail "the management API does not list the demo mapping"
create_body=$(sed -n "s|^  curl -H \"Authorization: Bearer [^\"]*\" -d '\([^']*\)' .*|\1|p" "$out")
[[ -n $create_body ]] || fail "the try-this block has no create through the API"
created=$(curl -sS -H "$api_auth" -d "$create_body" "$api_url") || fail "create through the API failed"
grep -q '"phase":"Active"' <<<"$created" || fail "create through the API did not answer Active: $created"
curl -fsS -H 'Host: from-api.tunnox.net' "$url" | grep -q 'Hello from behind tunnox' ||
    fail "the mapping created through the API is not served"
echo "run-smoke: kubectl get hdm, the demo page, the page behind the agent and the management API work; pressing Ctrl-C" >&2
kill -INT -- "-$pid"
for _ in $(seq 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
kill -0 "$pid" 2>/dev/null && fail "make run did not stop within 60 s of Ctrl-C"
grep 'did not stop within' "$out" >&2 || true
left=$(pgrep -af -- "$run_dir" | grep -v pgrep || true)
[[ -z $left ]] || fail "processes left behind: $left"
[[ ! -d $run_dir ]] || fail "$run_dir left behind"
grep -q 'nothing left running' "$out" || fail "no clean stop reported"
echo "run-smoke: ok (Ctrl-C left no process behind)" >&2
