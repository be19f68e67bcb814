#!/usr/bin/env bash
# Scans what users install with checkov: manifests/install.yaml (the chart with its defaults)
# and the chart rendered as a production install would set it (digests, an admin token Secret,
# the tunnel listener with its certificate Secret, the management API over TLS, an external
# Redis, a Prometheus peer). Fails
# when any check fails. Checks the project skips on purpose are suppressed in the chart itself
# (checkov.io/skipN annotations) and listed with their reasons in charts/tunnox/README.md.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
checkov=$(.ci/checkov.sh)
helm=$(e2e/install-deps.sh --print-helm)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

digest="sha256:$(printf '%064d' 0 | tr 0 a)"
"$helm" template tunnox charts/tunnox --namespace tunnox-system \
    --set image.digest="$digest" --set redis.image.digest="$digest" \
    --set proxy.admin.tokenSecret.name=tunnox-admin-token \
    --set tunnel.enabled=true --set tunnel.tls.secretName=tunnox-tunnel-tls \
    --set-json 'networkPolicy.adminFrom=[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"monitoring"}}}]' \
    --set-json 'egress.deny=["10.96.0.0/12"]' \
    --set api.enabled=true --set api.tokensSecret.name=tunnox-api-tokens \
    --set api.tlsSecretName=tunnox-api-tls \
    --set-json 'api.from=[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"portal"}}}]' \
    >"$work/production.yaml"
"$helm" template tunnox charts/tunnox --namespace tunnox-system \
    --set redis.bundled=false --set redis.external.addr=redis.example:6379 \
    --set redis.external.passwordSecret.name=redis-auth \
    >"$work/external-redis.yaml"

status=0
for manifest in manifests/install.yaml "$work/production.yaml" "$work/external-redis.yaml"; do
    printf '== checkov: %s\n' "${manifest#"$work"/}"
    # --skip-download: no network besides the package registries (and no need for it).
    if ! "$checkov" --framework kubernetes --file "$manifest" --skip-download --compact --quiet \
        >"$work/out" 2>&1; then
        status=1
    fi
    grep -v -i 'urllib3\|prismacloud' "$work/out" || true
done
if ((status)); then
    echo "scan: FAILED (fix the chart, or skip a check with a reason: charts/tunnox/README.md)" >&2
else
    echo "scan: every rendering passed" >&2
fi
exit "$status"
