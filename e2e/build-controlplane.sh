#!/usr/bin/env bash
# Build a real kube-apiserver, kubectl and etcd (pinned below and in go.mod) from the
# k8s.io/kubernetes Go module in e2e/controlplane, for e2e tests that run a
# real API server without Docker and without release downloads: only the Go
# module proxy is needed.
#
# Binaries go to a cache directory outside the repository:
#   ${TUNNOX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tunnox}/controlplane/<version>/bin/
# The build is skipped when the three binaries exist and the stamp file there
# records the same pinned version and the same sha256 of go.sum.
#
# Progress goes to stderr; stdout gets exactly one line, the bin directory,
# so callers can do:  BIN="$(e2e/build-controlplane.sh)"
#
# To bump the version: change K8S_VERSION here, and in controlplane/go.mod the
# k8s.io/kubernetes require plus every staging replace (v0.<minor>.<patch>,
# the list is the "=> ./staging" replace block of k8s.io/kubernetes' own
# go.mod), then run once `GOFLAGS=-mod=mod go mod tidy` in controlplane/ and
# commit go.mod and go.sum.
set -euo pipefail

K8S_VERSION="v1.34.4"

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
module_dir="${script_dir}/controlplane"

cache_root="${TUNNOX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tunnox}"
version_dir="${cache_root}/controlplane/${K8S_VERSION}"
bin_dir="${version_dir}/bin"
stamp="${version_dir}/stamp"

log() { printf 'build-controlplane: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

command -v go >/dev/null 2>&1 || die "go is not installed (need Go >= 1.24)"
command -v sha256sum >/dev/null 2>&1 || die "sha256sum is not installed"
[[ -f "${module_dir}/go.mod" && -f "${module_dir}/go.sum" ]] ||
    die "missing ${module_dir}/go.mod or go.sum"
grep -q "^require k8s.io/kubernetes ${K8S_VERSION}\$\|^[[:space:]]*k8s.io/kubernetes ${K8S_VERSION}\$" \
    "${module_dir}/go.mod" ||
    die "controlplane/go.mod does not require k8s.io/kubernetes ${K8S_VERSION}"

# Go environment for the build:
# - -mod=readonly: go.mod/go.sum are committed and never rewritten here; a
#   missing go.sum entry is an error, not a silent download. Every module is
#   checked against go.sum, so the checksum database is not consulted for the
#   build and GOSUMDB is left as the user has it (go.sum was produced with
#   the default sum.golang.org, which verified every module).
# - -buildvcs=false: the module lives inside the tunnox git work tree; do
#   not stamp tunnox's VCS state into Kubernetes binaries.
# - GOTOOLCHAIN=local: never try to fetch another Go toolchain.
export GOFLAGS="-mod=readonly -buildvcs=false"
export GOTOOLCHAIN=local
export CGO_ENABLED="${CGO_ENABLED:-0}"

go_minor="$(go env GOVERSION | sed -n 's/^go1\.\([0-9][0-9]*\).*/\1/p')"
[[ -n "${go_minor}" && "${go_minor}" -ge 24 ]] ||
    die "need Go >= 1.24, have $(go env GOVERSION)"

gosum_sha="$(sha256sum "${module_dir}/go.sum" | cut -d' ' -f1)"
want_stamp="version=${K8S_VERSION} go.sum.sha256=${gosum_sha}"

up_to_date() {
    [[ -x "${bin_dir}/kube-apiserver" && -x "${bin_dir}/kubectl" && -x "${bin_dir}/etcd" && -f "${stamp}" ]] &&
        [[ "$(cat "${stamp}")" == "${want_stamp}" ]]
}

mkdir -p "${bin_dir}"

# Serialise concurrent callers (e.g. parallel test binaries) on the cache.
if command -v flock >/dev/null 2>&1; then
    exec 9>"${version_dir}/.lock"
    flock 9
fi

if up_to_date; then
    log "kube-apiserver and kubectl ${K8S_VERSION} up to date in ${bin_dir}"
    printf '%s\n' "${bin_dir}"
    exit 0
fi

rm -f "${stamp}"

minor="${K8S_VERSION#v}"
major="${minor%%.*}"
minor="${minor#*.}"
minor="${minor%%.*}"
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X ${pkg}.gitVersion=${K8S_VERSION}"
    ldflags+=" -X ${pkg}.gitMajor=${major}"
    ldflags+=" -X ${pkg}.gitMinor=${minor}"
    ldflags+=" -X ${pkg}.gitTreeState=clean"
done

build() {
    local name="$1" hint="$2" start
    start="${SECONDS}"
    log "building ${name} ${K8S_VERSION} (${hint})"
    # Build to a temporary name, then rename, so an interrupted build never
    # leaves a half-written binary under the final name.
    (cd "${module_dir}" &&
        go build -trimpath -ldflags "${ldflags}" \
            -o "${bin_dir}/.${name}.tmp" "./cmd/${name}") >&2
    mv -f "${bin_dir}/.${name}.tmp" "${bin_dir}/${name}"
    log "built ${name} in $((SECONDS - start))s"
}

build kube-apiserver "first time: ~5-8 minutes"
build kubectl "first time: ~1 minute"
# etcd at the version go.mod pins (the one Kubernetes ${K8S_VERSION} is built and tested with).
# A distribution's etcd can be older than the API server's cache needs (RequestWatchProgress:
# etcd >= 3.4.31 / 3.5.13); every list then goes to etcd page by page, which no current
# cluster does (docs/e2e.md).
build etcd "first time: ~1 minute"

# Sanity check: every binary must report the pinned version, or clients
# would see an unparsable server version (etcd: the one go.mod requires).
"${bin_dir}/kube-apiserver" --version 2>&1 | grep -qx "Kubernetes ${K8S_VERSION}" ||
    die "kube-apiserver --version does not print ${K8S_VERSION}"
"${bin_dir}/kubectl" version --client 2>&1 | grep -q "Client Version: ${K8S_VERSION}\$" ||
    die "kubectl version --client does not print ${K8S_VERSION}"
etcd_version="$(sed -n 's/^[[:space:]]*go\.etcd\.io\/etcd\/server\/v3 v\([0-9.]*\)$/\1/p' "${module_dir}/go.mod")"
"${bin_dir}/etcd" --version 2>&1 | grep -qx "etcd Version: ${etcd_version:-unknown}" ||
    die "etcd --version does not print ${etcd_version:-the version go.mod requires}"

printf '%s\n' "${want_stamp}" >"${stamp}.tmp"
mv -f "${stamp}.tmp" "${stamp}"
log "done: ${bin_dir}"
printf '%s\n' "${bin_dir}"
