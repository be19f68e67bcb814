#!/usr/bin/env bash
# A throwaway CA and a TLS certificate for a tunnel listener on this machine (127.0.0.1 and
# localhost), for `make run` and `make bench`: DIR/ca.crt (what agents trust, --ca-file),
# DIR/tls.crt and DIR/tls.key (proxy.tunnel.cert_file / key_file). Valid for 2 days; never use
# them beyond loopback.
set -euo pipefail
dir="${1:?usage: e2e/tunnel-cert.sh DIR}"
mkdir -p "$dir"
cd "$dir"
umask 077
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj "/CN=tunnox throwaway CA" -keyout ca.key -out ca.crt 2>/dev/null
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=localhost" -keyout tls.key -out tls.csr 2>/dev/null
printf '%s\n' "subjectAltName=IP:127.0.0.1,DNS:localhost" "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" >tls.ext
openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
    -extfile tls.ext -out tls.crt 2>/dev/null
rm -f tls.csr tls.ext ca.srl ca.key
chmod 644 ca.crt tls.crt
echo "$dir/ca.crt $dir/tls.crt $dir/tls.key"
