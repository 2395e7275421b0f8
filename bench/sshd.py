"""A throwaway OpenSSH server on a loopback port, with its own host and user keys."""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
from pathlib import Path

from rune.cli.devstack import free_port, port_open, stop_pid, wait_until

SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")  # sshd refuses to start as root without it


class SshdUnavailable(RuntimeError):
    pass


class Sshd:
    """Started by the bench, stopped by the bench; never touches the system's sshd config."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / "sshd"
        self.port = free_port()
        self.user = getpass.getuser()
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        if not os.access(SSHD, os.X_OK) or not shutil.which("ssh") or \
                not shutil.which("ssh-keygen"):
            raise SshdUnavailable("openssh-server/openssh-client not installed "
                                  "(bash bench/install-deps.sh)")
        self.dir.mkdir(parents=True, exist_ok=True)
        for name in ("host_key", "user_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                            str(self.dir / name)], check=True, stdin=subprocess.DEVNULL)
        (self.dir / "authorized_keys").write_text((self.dir / "user_key.pub").read_text())
        if os.geteuid() == 0:
            PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        config = self.dir / "sshd_config"
        config.write_text("\n".join([
            "ListenAddress 127.0.0.1", f"Port {self.port}",
            f"HostKey {self.dir / 'host_key'}",
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}",
            "PidFile none", "UsePAM no", "StrictModes no",
            "PermitRootLogin prohibit-password", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "PrintMotd no", "PrintLastLog no",
            # Many sessions at once would otherwise be throttled as a connection flood.
            "MaxStartups 1000", "MaxSessions 1000", "LogLevel ERROR", ""]))
        log = open(self.dir / "sshd.log", "ab")
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        log.close()
        try:
            wait_until(lambda: port_open(self.port), "sshd", proc=self.proc,
                       log=self.dir / "sshd.log")
            check = subprocess.run(self.argv("true"), stdin=subprocess.DEVNULL,
                                   capture_output=True, timeout=30)
        except Exception as exc:
            self.stop()
            raise SshdUnavailable(f"sshd did not come up: {exc}") from None
        if check.returncode != 0:
            self.stop()
            raise SshdUnavailable(f"ssh login failed: {check.stderr.decode()[-300:]}")

    def argv(self, *command: str, tty: bool = False) -> list[str]:
        """An ssh client command line for this server (a full handshake every time)."""
        return ["ssh", *(["-tt"] if tty else []), "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR", "-i", str(self.dir / "user_key"), "-p", str(self.port),
                f"{self.user}@127.0.0.1", *command]

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc.pid, 5.0, self.proc)
            self.proc = None
