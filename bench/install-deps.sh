#!/usr/bin/env bash
# The bench's ssh baseline needs Debian's OpenSSH server and client, its static producer
# a C compiler and libc's static archive (gcc, libc6-dev); idempotent.
set -euo pipefail
have() {
    [[ -x /usr/sbin/sshd ]] && command -v ssh >/dev/null && command -v ssh-keygen >/dev/null &&
        command -v cc >/dev/null && [[ -n "$(find /usr/lib -name libc.a -print -quit)" ]]
}
have && exit 0
export DEBIAN_FRONTEND=noninteractive
packages=(openssh-server openssh-client gcc libc6-dev)
echo "bench: installing ${packages[*]}"
# Only refresh the package lists when the cached ones cannot satisfy the install.
apt-get install -y -q "${packages[@]}" >/tmp/bench-apt.log 2>&1 || {
    apt-get update -q >>/tmp/bench-apt.log 2>&1
    apt-get install -y -q "${packages[@]}" >>/tmp/bench-apt.log 2>&1
} || { echo "bench: apt-get install failed, see /tmp/bench-apt.log" >&2; exit 1; }
have
