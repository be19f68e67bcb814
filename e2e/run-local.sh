#!/usr/bin/env bash
# `make run`: the whole product on this machine, no cluster needed. A real control plane
# (etcd + kube-apiserver), the Helm chart installed into it, Redis, `tunnox controller` and
# `tunnox proxy` as local processes with the chart's configuration and ServiceAccount, a demo
# page, and examples/demo.yaml applied. A second page sits behind `tunnox agent` (client
# demo-laptop, examples/demo-tunnel.yaml: TunnelSet + HTTPDomainMapping with a tunnel target),
# reached through the proxy's tunnel listener (TLS with a throwaway CA from e2e/tunnel-cert.sh).
# Ctrl-C stops everything.
#
# Ports: PROXY_PORT (default 8080); the demo pages are fixed at 3000 and 3001 (examples/demo.yaml
# and examples/demo-tunnel.yaml point there); the tunnel listener takes a free port.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
step() { printf '\n==> %s\n' "$*" >&2; }
die() { printf 'make run: error: %s\n' "$*" >&2; exit 1; }
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}
port_taken() { python3 -c 'import socket,sys; s=socket.socket(); sys.exit(0 if s.connect_ex(("127.0.0.1",int(sys.argv[1])))==0 else 1)' "$1"; }

proxy_port="${PROXY_PORT:-8080}"
demo_port=3000
laptop_port=3001
# The TunnelSet demo-laptop's remote port (examples/demo-tunnel.yaml): TCP to the laptop's page.
remote_port=23001
ns=tunnox-system
for p in "$proxy_port" "$demo_port" "$laptop_port" "$remote_port"; do
    port_taken "$p" && die "port $p on 127.0.0.1 is in use (set PROXY_PORT for the proxy; the demos need 3000, 3001 and 23001)"
done

run_dir="$(mktemp -d "${TMPDIR:-/tmp}/tunnox-run-XXXXXX")"
pids=()
# Running, not merely an unreaped zombie of ours.
alive() { ps -o stat= -p "$1" 2>/dev/null | grep -qv Z; }
stopped=""
cleanup() {
    [[ -z $stopped ]] || return 0
    stopped=1
    # A second Ctrl-C must not cut the clean-up short.
    trap "" INT TERM
    printf '\n==> stopping\n' >&2
    local pid
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do
        for _ in $(seq 50); do alive "$pid" || break; sleep 0.2; done
        if alive "$pid"; then
            printf 'process %s (%s) did not stop within 10 s: killed\n' "$pid" "$(ps -o args= -p "$pid" | cut -c1-80)" >&2
            kill -KILL "$pid" 2>/dev/null
        fi
    done
    wait "${pids[@]}" 2>/dev/null || true
    e2e/controlplane.sh down "$run_dir/cp" >/dev/null 2>&1 || true
    rm -rf "$run_dir"
    printf 'stopped; nothing left running\n' >&2
}
trap 'cleanup; exit 130' INT TERM
trap cleanup EXIT

step "installing what is missing (etcd, redis-server, helm, ...)"
e2e/install-deps.sh
# TUNNOX_PROFILE=dev runs the debug build (CI's smoke test: that build is already there).
profile="${TUNNOX_PROFILE:-release}"
step "building tunnox ($profile)"
cargo build --locked --profile "$profile"
bin="${CARGO_TARGET_DIR:-$root/target}/$([[ $profile == dev ]] && echo debug || echo "$profile")/tunnox"
step "building kube-apiserver and kubectl (cached after the first time; ~8 minutes then)"
e2e/build-controlplane.sh >/dev/null

step "starting the control plane"
mkdir -p "$run_dir/cp"
e2e/controlplane.sh up "$run_dir/cp"
# shellcheck disable=SC1091
source "$run_dir/cp/env"
export KUBECONFIG
k() { "$KUBECTL" "$@"; }

step "starting Redis"
redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$run_dir" --daemonize no >"$run_dir/redis.log" 2>&1 &
pids+=($!)

step "installing the chart (CRDs, RBAC, configuration)"
k apply -f crds/tunnox.yaml >/dev/null
k wait --for=condition=Established crd/httpdomainmappings.tunnox.net crd/tunnelsets.tunnox.net >/dev/null
# The demo page is on loopback, which tenants' mappings may not reach by default (the egress
# policy, docs/security.md): allow exactly that address.
# The tunnel listener's certificate: a throwaway CA and a certificate for 127.0.0.1, kept in
# the chart's Secret as in a cluster; the local proxy reads the same files.
e2e/tunnel-cert.sh "$run_dir/tunnel-tls" >/dev/null
k create namespace "$ns" >/dev/null
# The management API's admin token, kept in the chart's Secret as in a cluster.
openssl rand -hex 32 | tr -d '\n' >"$run_dir/api-admin.token"
k -n "$ns" create secret generic tunnox-api-tokens --from-file=admin="$run_dir/api-admin.token" >/dev/null
k -n "$ns" create secret tls tunnox-tunnel-tls --cert="$run_dir/tunnel-tls/tls.crt" \
    --key="$run_dir/tunnel-tls/tls.key" >/dev/null
"$HELM" install tunnox charts/tunnox --namespace "$ns" --skip-crds \
    --set "egress.allow[0]=127.0.0.1:$demo_port" \
    --set tunnel.enabled=true --set tunnel.tls.secretName=tunnox-tunnel-tls \
    --set api.enabled=true --set api.tokensSecret.name=tunnox-api-tokens >/dev/null
k -n "$ns" get configmap tunnox -o jsonpath='{.data.config\.yaml}' >"$run_dir/config.yaml"
token=$(k -n "$ns" create token tunnox-controller --duration=24h)
sed "s|^\(\s*token:\).*|\1 $token|" "$KUBECONFIG" >"$run_dir/controller.kubeconfig"

step "starting the demo page on 127.0.0.1:$demo_port"
mkdir -p "$run_dir/www"
cat >"$run_dir/www/index.html" <<HTML
<!doctype html><title>tunnox demo</title>
<h1>Hello from behind tunnox</h1>
<p>This page is served by a demo upstream on 127.0.0.1:$demo_port and reached through the
tunnox proxy by its Host header, as programmed from an HTTPDomainMapping.</p>
HTML
python3 -m http.server "$demo_port" --bind 127.0.0.1 --directory "$run_dir/www" >"$run_dir/demo.log" 2>&1 &
pids+=($!)

step "starting the laptop's page on 127.0.0.1:$laptop_port (reached only through the tunnel)"
mkdir -p "$run_dir/laptop"
cat >"$run_dir/laptop/index.html" <<HTML
<!doctype html><title>tunnox tunnel demo</title>
<h1>Hello through the tunnel</h1>
<p>This page is served on 127.0.0.1:$laptop_port beside <code>tunnox agent</code> (client demo-laptop). The
proxy sends the request down the agent's TLS session as an HTTP/2 stream; the agent forwards it
here because its --allow list names this address.</p>
HTML
python3 -m http.server "$laptop_port" --bind 127.0.0.1 --directory "$run_dir/laptop" >"$run_dir/laptop.log" 2>&1 &
pids+=($!)

# This Redis has no password: the chart's password file (a mounted Secret in pods) is unset.
common_env=(TUNNOX__STORAGE__REDIS__ADDR="127.0.0.1:$redis_port" TUNNOX__STORAGE__REDIS__PASSWORD_FILE=
    POD_NAMESPACE="$ns")
step "starting tunnox controller (as the chart's ServiceAccount; the management API on loopback)"
api_port=$(free_port)
env "${common_env[@]}" KUBECONFIG="$run_dir/controller.kubeconfig" POD_NAME=controller-local \
    TUNNOX__CONTROLLER__ADMIN_LISTEN="127.0.0.1:$(free_port)" \
    TUNNOX__API__LISTEN="127.0.0.1:$api_port" \
    TUNNOX__API__TOKENS="[{token_file: $run_dir/api-admin.token, role: admin}]" \
    "$bin" --config "$run_dir/config.yaml" controller >"$run_dir/controller.log" 2>&1 &
pids+=($!)
proxy_admin=$(free_port)
tunnel_port=$(free_port)
# The node token the chart generated (in a pod: a mounted file, proxy.tunnel.node_token_file).
k -n "$ns" get secret tunnox-node-token -o jsonpath='{.data.token}' | base64 -d >"$run_dir/node-token"
step "starting tunnox proxy on 127.0.0.1:$proxy_port (tunnel listener 127.0.0.1:$tunnel_port)"
env "${common_env[@]}" TUNNOX__PROXY__NODE_ID=proxy-local TUNNOX__PROXY__SET=default.default \
    TUNNOX__PROXY__LISTEN="127.0.0.1:$proxy_port" TUNNOX__PROXY__ADMIN_LISTEN="127.0.0.1:$proxy_admin" \
    TUNNOX__PROXY__TUNNEL__LISTEN="127.0.0.1:$tunnel_port" \
    TUNNOX__PROXY__TUNNEL__CERT_FILE="$run_dir/tunnel-tls/tls.crt" \
    TUNNOX__PROXY__TUNNEL__KEY_FILE="$run_dir/tunnel-tls/tls.key" \
    TUNNOX__PROXY__TUNNEL__NODE_TOKEN_FILE="$run_dir/node-token" \
    TUNNOX__PROXY__TUNNEL__ADVERTISE_ADDRESS="127.0.0.1:$tunnel_port" \
    "$bin" --config "$run_dir/config.yaml" proxy >"$run_dir/proxy.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:$proxy_admin/readyz" >/dev/null 2>&1 && break
    sleep 0.2
done
curl -fs "http://127.0.0.1:$proxy_admin/readyz" >/dev/null || die "proxy not ready; see $run_dir/proxy.log"

step "applying examples/demo.yaml"
k apply -n default -f examples/demo.yaml >/dev/null
for _ in $(seq 100); do
    [[ $(k -n default get hdm demo -o jsonpath='{.status.phase}' 2>/dev/null) == Active ]] && break
    sleep 0.2
done
for _ in $(seq 50); do
    [[ $(curl -s -o /dev/null -w '%{http_code}' -H 'Host: demo.tunnox.net' "http://127.0.0.1:$proxy_port/") == 200 ]] && break
    sleep 0.2
done

step "the tunnel: TunnelSet demo-laptop with its token Secret, tunnox agent, examples/demo-tunnel.yaml"
openssl rand -hex 32 | tr -d '\n' >"$run_dir/laptop.token"
k -n default create secret generic demo-laptop-token --from-file=token="$run_dir/laptop.token" >/dev/null
k apply -n default -f examples/demo-tunnel.yaml >/dev/null
env TUNNOX__LOG__LEVEL=info \
    "$bin" agent --server "127.0.0.1:$tunnel_port" --client-id demo-laptop \
    --token-file "$run_dir/laptop.token" --ca-file "$run_dir/tunnel-tls/ca.crt" \
    --allow "127.0.0.1:$laptop_port" >"$run_dir/agent.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
    [[ $(k -n default get hdm demo-tunnel -o jsonpath='{.status.phase}' 2>/dev/null) == Active ]] && break
    sleep 0.2
done
for _ in $(seq 100); do
    [[ $(curl -s -o /dev/null -w '%{http_code}' -H 'Host: laptop.tunnox.net' "http://127.0.0.1:$proxy_port/") == 200 ]] && break
    sleep 0.2
done
for _ in $(seq 100); do
    [[ $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$remote_port/") == 200 ]] && break
    sleep 0.2
done
k -n default get hdm
k -n default get tunnelset

cat <<TRY

tunnox is running: a control plane, Redis, the controller and a proxy on this machine.
Try this (in another terminal):

  export KUBECONFIG=$KUBECONFIG
  alias kubectl=$KUBECTL
  kubectl get hdm -A
  curl -H 'Host: demo.tunnox.net' http://127.0.0.1:$proxy_port/
  curl -H 'Host: laptop.tunnox.net' http://127.0.0.1:$proxy_port/     # through the agent's tunnel
  curl http://127.0.0.1:$remote_port/     # plain TCP: TunnelSet demo-laptop's remote port
  kubectl get tunnelset -A
  kubectl apply -f examples/hdm-address.yaml     # then: kubectl get hdm
  curl -H "Authorization: Bearer \$(cat $run_dir/api-admin.token)" http://127.0.0.1:$api_port/api/v1/mappings     # the management API
  curl -H "Authorization: Bearer \$(cat $run_dir/api-admin.token)" -d '{"subdomain": "from-api", "base_domain": "tunnox.net", "target_host": "127.0.0.1", "target_port": $demo_port}' http://127.0.0.1:$api_port/api/v1/mappings     # then: kubectl get hdm -n $ns
  curl http://127.0.0.1:$proxy_admin/status

Logs: $run_dir/{controller,proxy,agent,redis,demo,laptop}.log
Press Ctrl-C to stop everything.
TRY
# Until Ctrl-C (the trap stops everything), even if a child exits first.
while true; do
    sleep 3600 &
    pids+=($!)
    wait $! || true
done
