#!/usr/bin/env bash
# Bring up a local Docker Engine (Debian's docker.io), the registry-free test image and the
# images of the compose stack (scripts/build-compose-images.sh).
# Idempotent: if an engine already answers, only the images are ensured.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BUILD_IMAGE="$HERE/../tests/images/build-test-image.sh"
LOG=/tmp/dockerd.log
WAIT_SECS=${DOCKER_UP_WAIT:-60}

log() { echo "docker-up: $*"; }
die() { echo "docker-up: ERROR: $*" >&2; exit 1; }

engine_ok() { docker info >/dev/null 2>&1; }

# A newer client (e.g. /usr/local/bin/docker) negotiates the API down to the 20.10 daemon;
# still prove that client and server really see each other.
check_client() {
    docker version --format 'client {{.Client.Version}} (API {{.Client.APIVersion}}) -> server {{.Server.Version}} (API {{.Server.APIVersion}})' ||
        die "'$(command -v docker)' cannot talk to the engine"
}

install_packages() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
    [[ ${#missing[@]} -eq 0 ]] && return
    export DEBIAN_FRONTEND=noninteractive
    log "installing ${missing[*]}"
    # Only refresh the package lists when the cached ones cannot satisfy the install.
    apt-get install -y -q "${missing[@]}" >/tmp/docker-up-apt.log 2>&1 || {
        apt-get update -q >>/tmp/docker-up-apt.log 2>&1
        apt-get install -y -q "${missing[@]}" >>/tmp/docker-up-apt.log 2>&1
    } || die "apt-get install failed, see /tmp/docker-up-apt.log"
}

# Start dockerd with the given storage driver; return 0 once `docker info` answers.
start_dockerd() {
    local driver=$1
    # A pidfile left by a dead daemon makes dockerd refuse to start.
    if [[ -f /var/run/docker.pid ]] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
        rm -f /var/run/docker.pid
    fi
    log "starting dockerd (storage driver $driver), log: $LOG"
    echo "=== $(date -Is) dockerd --storage-driver=$driver" >>"$LOG"
    # cgroupfs: there is no systemd in this container to act as cgroup manager.
    setsid nohup dockerd --storage-driver="$driver" \
        --exec-opt native.cgroupdriver=cgroupfs "${DOCKERD_EXTRA_ARGS[@]}" \
        >>"$LOG" 2>&1 </dev/null &
    local pid=$! i
    for ((i = 0; i < WAIT_SECS; i++)); do
        engine_ok && return 0
        kill -0 "$pid" 2>/dev/null || { log "dockerd exited early (driver $driver)"; return 1; }
        sleep 1
    done
    log "dockerd did not answer within ${WAIT_SECS}s; stopping it"
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    return 1
}

# Extra daemon flags can be injected, e.g. DOCKERD_EXTRA_ARGS="--iptables=false --bridge=none".
read -r -a DOCKERD_EXTRA_ARGS <<<"${DOCKERD_EXTRA_ARGS:-}"

if engine_ok; then
    log "engine already running"
else
    install_packages
    start_dockerd overlay2 || start_dockerd vfs ||
        die "could not start dockerd with overlay2 or vfs; errors from $LOG:
$(grep -E 'level=(error|fatal)|failed to start' "$LOG" | tail -n 5)"
fi

check_client
log "storage driver: $(docker info --format '{{.Driver}}'), socket: ${DOCKER_HOST:-unix:///var/run/docker.sock}"
# busybox-static is needed for the image even when someone else started the engine.
dpkg -s busybox-static >/dev/null 2>&1 || install_packages
"$BUILD_IMAGE"

# The suite validates docker-compose.yml with `docker compose` or, failing that, Debian's
# docker-compose (v1); install the latter when neither is there.
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null; then
    log "installing docker-compose"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker-compose \
        >>/tmp/docker-up-apt.log 2>&1 || {
        apt-get update -q >>/tmp/docker-up-apt.log 2>&1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker-compose \
            >>/tmp/docker-up-apt.log 2>&1
    } || die "apt-get install docker-compose failed, see /tmp/docker-up-apt.log"
fi

# The compose stack's images (tests/test_compose.py): a Debian base and a busybox demo made
# here, and wheels for an image build that reaches no registry. Kept when already present.
if [[ "${RUNE_COMPOSE_IMAGES:-1}" == "1" ]]; then
    bash "$HERE/../scripts/build-compose-images.sh" --no-env
fi
