#!/usr/bin/env bash
# Builds the tunnox image with buildah from the local release binary (make image).
#   .ci/build-image.sh BINARY TAG
set -euo pipefail
binary=${1:?binary}
tag=${2:?tag}
command -v buildah >/dev/null 2>&1 || {
    sudo=""; [[ $(id -u) -eq 0 ]] || sudo=sudo
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq buildah >/dev/null
}
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/rootfs"
install -m 0555 "$binary" "$stage/rootfs/tunnox"
# The loader and every library the binary needs, at the paths it looks for them.
for lib in $(ldd "$binary" | awk '/=>/ {print $3} /^[[:space:]]*\// {print $1}' | sort -u); do
    mkdir -p "$stage/rootfs$(dirname "$lib")"
    cp -L "$lib" "$stage/rootfs$lib"
done
cp "$(dirname "$0")/../Dockerfile" "$stage/Dockerfile"
buildah --storage-driver vfs bud --quiet --layers=false -t "$tag" "$stage" >/dev/null
# Smoke test: the image's root file system runs the binary as the image's non-root user.
ctr=$(buildah --storage-driver vfs from "$tag")
root=$(buildah --storage-driver vfs mount "$ctr")
user=$(buildah --storage-driver vfs inspect --format '{{.OCIv1.Config.User}}' "$ctr")
version=$(chroot --userspec="$user" "$root" /tunnox --version)
buildah --storage-driver vfs umount "$ctr" >/dev/null
buildah --storage-driver vfs rm "$ctr" >/dev/null
echo "built $tag ($version, user $user)"
