#!/usr/bin/env bash
# A real Kubernetes control plane on loopback, for e2e tests and `make run`: etcd and
# kube-apiserver (no kubelet, no scheduler), admin token auth, RBAC, ServiceAccount tokens.
#
#   e2e/controlplane.sh up DIR     start; writes DIR/kubeconfig and DIR/env (sourceable)
#   e2e/controlplane.sh down DIR   stop the API server first (it can hang once etcd is gone),
#                                  then etcd; SIGKILL after a timeout; idempotent
#
# Progress goes to stderr. Ports are free loopback ports picked at start.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
log() { printf 'controlplane: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

wait_for() { # what, seconds, command...
    local what=$1 secs=$2
    shift 2
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            return 1
        fi
        sleep 0.2
    done
}

stop_pid() { # pidfile, grace seconds
    local file=$1 grace=$2 pid
    [[ -f $file ]] || return 0
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + grace))
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            log "$(basename "$file" .pid) did not stop in ${grace}s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$file"
}

down() {
    local dir=$1
    stop_pid "$dir/kube-apiserver.pid" 10
    stop_pid "$dir/etcd.pid" 10
}

up() {
    local dir=$1
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    "$here/install-deps.sh"
    local bin
    bin=$("$here/build-controlplane.sh")
    # If anything below fails, leave nothing running.
    trap 'down "'"$dir"'"' ERR

    local etcd_port etcd_peer api_port token
    etcd_port=$(free_port)
    etcd_peer=$(free_port)
    api_port=$(free_port)
    token=$(openssl rand -hex 24)

    log "starting etcd on 127.0.0.1:$etcd_port"
    setsid "$bin/etcd" --name default --data-dir "$dir/etcd" \
        --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
        --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
        --initial-cluster "default=http://127.0.0.1:$etcd_peer" >"$dir/etcd.log" 2>&1 </dev/null &
    echo $! >"$dir/etcd.pid"
    wait_for etcd 30 curl -sf "http://127.0.0.1:$etcd_port/health" || die "etcd did not start (see $dir/etcd.log)"

    mkdir -p "$dir/pki"
    openssl genrsa -out "$dir/pki/sa.key" 2048 2>/dev/null
    openssl rsa -in "$dir/pki/sa.key" -pubout -out "$dir/pki/sa.pub" 2>/dev/null
    echo "$token,admin,admin-uid,system:masters" >"$dir/pki/tokens.csv"
    # Audit every request made with a ServiceAccount token (method, resource, namespace, name,
    # status; no bodies): the e2e suite compares the controller's calls with its RBAC.
    cat >"$dir/audit-policy.yaml" <<'POLICY'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: Metadata
    userGroups: ["system:serviceaccounts"]
  - level: None
POLICY

    log "starting kube-apiserver on https://127.0.0.1:$api_port"
    setsid "$bin/kube-apiserver" \
        --etcd-servers "http://127.0.0.1:$etcd_port" \
        --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
        --endpoint-reconciler-type none \
        --cert-dir "$dir/pki" --token-auth-file "$dir/pki/tokens.csv" \
        --authorization-mode RBAC \
        --service-account-issuer https://kubernetes.default.svc \
        --service-account-key-file "$dir/pki/sa.pub" \
        --service-account-signing-key-file "$dir/pki/sa.key" \
        --audit-policy-file "$dir/audit-policy.yaml" --audit-log-path "$dir/audit.log" \
        --audit-log-format json --audit-log-maxsize 0 \
        --service-cluster-ip-range 10.96.0.0/16 >"$dir/kube-apiserver.log" 2>&1 </dev/null &
    echo $! >"$dir/kube-apiserver.pid"
    wait_for apiserver 60 curl -skf "https://127.0.0.1:$api_port/readyz" ||
        die "kube-apiserver did not become ready (see $dir/kube-apiserver.log)"

    cat >"$dir/kubeconfig" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: tunnox-local
  cluster:
    server: https://127.0.0.1:$api_port
    certificate-authority: $dir/pki/apiserver.crt
users:
- name: admin
  user:
    token: $token
contexts:
- name: tunnox-local
  context: {cluster: tunnox-local, user: admin, namespace: default}
current-context: tunnox-local
KUBECONFIG
    chmod 600 "$dir/kubeconfig"
    cat >"$dir/env" <<ENV
KUBECONFIG=$dir/kubeconfig
KUBECTL=$bin/kubectl
HELM=$("$here/install-deps.sh" --print-helm)
API_SERVER=https://127.0.0.1:$api_port
AUDIT_LOG=$dir/audit.log
ENV
    # Wait until the default namespace and RBAC bootstrap roles exist.
    wait_for namespace 60 "$bin/kubectl" --kubeconfig "$dir/kubeconfig" get namespace default ||
        die "default namespace did not appear"
    wait_for rbac 60 "$bin/kubectl" --kubeconfig "$dir/kubeconfig" get clusterrole admin ||
        die "RBAC bootstrap roles did not appear"
    trap - ERR
    log "ready: export KUBECONFIG=$dir/kubeconfig"
}

case "${1:-}" in
    up) up "${2:?usage: $0 up DIR}" ;;
    down) down "${2:?usage: $0 down DIR}" ;;
    *) die "usage: $0 up|down DIR" ;;
esac
