#!/usr/bin/env bash
# Make the local base image localhost/pdp-base (Debian bookworm, python3 + venv + CA
# certificates) with debootstrap, for machines that cannot pull an image from a registry.
# Does nothing when the image exists already (podman storage persists); --force rebuilds.
#   deploy/image/build-base.sh [--force]
# Needs: debootstrap, podman (Debian packages), root, and Debian's package mirror; a few
# minutes. The image is 176 MB here (`podman images`).
set -euo pipefail
image=localhost/pdp-base
if [ "${1:-}" != "--force" ] && podman image exists "$image"; then
  echo "$image exists"; exit 0
fi
root=$(mktemp -d /tmp/pdp-base-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | podman import --change 'CMD ["/bin/bash"]' - "$image"
echo "built $image"
