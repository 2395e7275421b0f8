#!/usr/bin/env bash
# Make `docker compose` (v2) work next to Debian bookworm's `docker-compose` (v1.29), so the
# compose stack is tested with both (tests/test_compose.py).
#
# Bookworm packages only compose v1. Trixie's docker-compose package is compose v2 built as a
# Docker CLI plugin (it needs nothing of trixie but glibc >= 2.34). It is fetched with apt's
# own client and a private package list (the system's sources stay as they are), unpacked
# into a private directory ($COMPOSE_V2_HOME, not /usr: v1's /usr/bin/docker-compose stays),
# and linked into the user's plugin directory, ${DOCKER_CONFIG:-~/.docker}/cli-plugins.
# Idempotent: nothing is fetched when `docker compose version` already answers with v2.
#
# Usage: .ci/compose-v2.sh            (COMPOSE_V2_DEB=/path/to.deb skips the download,
#                                      COMPOSE_V2_VERSION=2.26.1-4 pins the package version)
set -euo pipefail

COMPOSE_V2_HOME=${COMPOSE_V2_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/rune/compose-v2}
SUITE=${COMPOSE_V2_SUITE:-trixie}
MIRROR=${COMPOSE_V2_MIRROR:-http://deb.debian.org/debian}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
PLUGINS="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins"
PLUGIN="$COMPOSE_V2_HOME/root/usr/libexec/docker/cli-plugins/docker-compose"

log() { echo "compose-v2: $*"; }
die() { echo "compose-v2: ERROR: $*" >&2; exit 1; }

is_v2() { "$@" version --short 2>/dev/null | grep -q '^v\?2\.'; }

if is_v2 docker compose; then
    log "docker compose is already v2: $(docker compose version --short)"
    exit 0
fi

deb=${COMPOSE_V2_DEB:-}
if [[ -z $deb ]]; then
    apt=$COMPOSE_V2_HOME/apt
    mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial"
    echo "deb [signed-by=$KEYRING] $MIRROR $SUITE main" >"$apt/sources.list"
    opts=(-o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache"
          -o "Dir::State::Status=/dev/null" -o APT::Get::List-Cleanup=0)
    log "fetching the package list of Debian $SUITE (private to $apt)"
    apt-get "${opts[@]}" -q update >"$apt/update.log" 2>&1 ||
        die "apt-get update failed, see $apt/update.log"
    package=docker-compose${COMPOSE_V2_VERSION:+=$COMPOSE_V2_VERSION}
    rm -f "$apt"/docker-compose_*.deb
    (cd "$apt" && apt-get "${opts[@]}" -q download "$package" >"$apt/download.log" 2>&1) ||
        die "apt-get download $package failed, see $apt/download.log"
    deb=$(echo "$apt"/docker-compose_*.deb)
fi
[[ -f $deb ]] || die "no package file at $deb"

rm -rf "$COMPOSE_V2_HOME/root"
mkdir -p "$COMPOSE_V2_HOME"
dpkg-deb -x "$deb" "$COMPOSE_V2_HOME/root"
[[ -x $PLUGIN ]] || die "$deb holds no Docker CLI plugin (usr/libexec/docker/cli-plugins)"
is_v2 "$PLUGIN" || die "$deb is not compose v2: $("$PLUGIN" version 2>&1 | head -n 1)"

mkdir -p "$PLUGINS"
ln -sfn "$PLUGIN" "$PLUGINS/docker-compose"
is_v2 docker compose || die "docker does not find the plugin in $PLUGINS"
log "docker compose $(docker compose version --short) (plugin $PLUGINS/docker-compose);" \
    "docker-compose stays $(docker-compose version --short 2>/dev/null || echo absent)"
