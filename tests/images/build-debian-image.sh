#!/usr/bin/env bash
# Build rune-test-debian:bookworm (Debian minbase: coreutils, python3, procps) with mmdebstrap
# and `docker import`: packages from the Debian mirror, no image registry.
# Usage: build-debian-image.sh [--force]   (idempotent: an existing image is kept)
set -euo pipefail

IMAGE=rune-test-debian:bookworm
SUITE=${DEBIAN_SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-}  # empty: the mirrors of the host's apt sources
CACHE=${RUNE_IMAGE_CACHE:-/var/cache/rune-test-images}

force=0
[[ "${1:-}" == "--force" ]] && force=1

if [[ $force -eq 0 ]] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "build-debian-image: $IMAGE already present (use --force to rebuild)"
    exit 0
fi

if ! command -v mmdebstrap >/dev/null; then
    echo "build-debian-image: installing mmdebstrap"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q mmdebstrap >/tmp/build-debian-image-apt.log 2>&1 || {
        apt-get update -q >>/tmp/build-debian-image-apt.log 2>&1
        apt-get install -y -q mmdebstrap >>/tmp/build-debian-image-apt.log 2>&1
    } || { echo "build-debian-image: apt-get install mmdebstrap failed," \
                "see /tmp/build-debian-image-apt.log" >&2; exit 1; }
fi

# The root filesystem tarball is cached: a rebuilt engine (or --force) imports it again
# without fetching a single package.
mkdir -p "$CACHE"
tarball="$CACHE/rune-test-debian-$SUITE.tar"
if [[ $force -eq 1 || ! -s "$tarball" ]]; then
    echo "build-debian-image: mmdebstrap --variant=minbase --include=python3,procps $SUITE"
    mmdebstrap --quiet --format=tar --variant=minbase --include=python3,procps "$SUITE" \
        "$tarball.partial" ${MIRROR:+"$MIRROR"}
    mv "$tarball.partial" "$tarball"
fi

docker import --change 'CMD ["/bin/bash"]' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    "$tarball" "$IMAGE" >/dev/null
echo "build-debian-image: built $IMAGE"
