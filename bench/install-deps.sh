#!/usr/bin/env bash
# The bench's ssh baseline needs Debian's OpenSSH server and client; idempotent.
set -euo pipefail
have() { [[ -x /usr/sbin/sshd ]] && command -v ssh >/dev/null && command -v ssh-keygen >/dev/null; }
have && exit 0
export DEBIAN_FRONTEND=noninteractive
echo "bench: installing openssh-server openssh-client"
# Only refresh the package lists when the cached ones cannot satisfy the install.
apt-get install -y -q openssh-server openssh-client >/tmp/bench-apt.log 2>&1 || {
    apt-get update -q >>/tmp/bench-apt.log 2>&1
    apt-get install -y -q openssh-server openssh-client >>/tmp/bench-apt.log 2>&1
} || { echo "bench: apt-get install failed, see /tmp/bench-apt.log" >&2; exit 1; }
have
