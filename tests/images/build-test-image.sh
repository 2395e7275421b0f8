#!/usr/bin/env bash
# Build rune-test-busybox:latest from Debian's busybox-static only: no registry needed.
# Usage: build-test-image.sh [--force]
set -euo pipefail

IMAGE=rune-test-busybox:latest
BUSYBOX=${BUSYBOX:-/bin/busybox}
# Applets the test-suite relies on; fail early rather than with a confusing exec error later.
REQUIRED_APPLETS=(cat head sh sleep wc stty tty vi less)

force=0
[[ "${1:-}" == "--force" ]] && force=1

if [[ $force -eq 0 ]] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "build-test-image: $IMAGE already present (use --force to rebuild)"
    exit 0
fi

# The dynamically linked busybox would need libc inside the image, so insist on the static one.
# (ldd exits non-zero for static binaries, so capture its output instead of piping it.)
ldd_out=$(ldd "$BUSYBOX" 2>&1 || true)
if ! grep -Eq 'not a dynamic executable|statically linked' <<<"$ldd_out"; then
    echo "build-test-image: $BUSYBOX is not static; apt-get install -y busybox-static" >&2
    exit 1
fi

applets=$("$BUSYBOX" --list)
for a in "${REQUIRED_APPLETS[@]}"; do
    grep -qx "$a" <<<"$applets" || { echo "build-test-image: busybox lacks applet '$a'" >&2; exit 1; }
done

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT

mkdir -p "$root"/{bin,etc,root,proc,sys,dev,tmp}
chmod 1777 "$root/tmp"
chmod 700 "$root/root"
cp "$BUSYBOX" "$root/bin/busybox"
for a in $applets; do
    [[ "$a" == busybox ]] || ln -sf busybox "$root/bin/$a"
done
echo 'root:x:0:0:root:/root:/bin/sh' > "$root/etc/passwd"
echo 'root:x:0:' > "$root/etc/group"

# --numeric-owner/--owner keep the image independent of the build host's users.
tar -C "$root" --numeric-owner --owner=0 --group=0 -c . |
    docker import --change 'CMD ["/bin/sh"]' --change 'ENV PATH=/bin' - "$IMAGE" >/dev/null
echo "build-test-image: built $IMAGE"
