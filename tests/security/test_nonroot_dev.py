"""`rune dev up` as an ordinary user: the demo instances run as that user, yet neither they
nor any exec into them (not even the restricted `dev`) can read the stack's tokens, nkeys
seeds, the CLI config or the user's home; exec itself works as before. A throwaway user
runs the real stack; the tests need root only to make that user."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import uuid
from pathlib import Path

import pytest
from rune.cli.devstack import free_port, port_open

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="making a throwaway user to run "
                                "the stack as needs root")

# Run as root, before the developer's command: a user namespace of its own (all uids
# mapped), whose limit on nested user namespaces is 0, as on a host with the sysctl
# user.max_user_namespaces=0, without changing the host.
NO_USERNS = r"""
import ctypes, os, sys
uid, gid, argv = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
libc = ctypes.CDLL(None, use_errno=True)
mapped_r, mapped_w = os.pipe()
unshared_r, unshared_w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(mapped_w)
    if libc.unshare(0x10000000) != 0:
        os._exit(90)
    os.write(unshared_w, b"x")
    if os.read(mapped_r, 1) != b"x":
        os._exit(91)
    with open("/proc/sys/user/max_user_namespaces", "w") as f:
        f.write("0")
    os.setgroups([]); os.setgid(gid); os.setuid(uid)
    os.execvp(argv[0], argv)
os.close(mapped_r)
os.close(unshared_w)
if os.read(unshared_r, 1) == b"x":
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write("0 0 4294967294")
    os.write(mapped_w, b"x")
os.close(mapped_w)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


class Developer:
    """A throwaway login with a home of its own and a Python that can import Rune."""

    def __init__(self, top: Path) -> None:
        self.name = f"rnr{uuid.uuid4().hex[:8]}"
        self.top = top
        self.home = top / "home"
        subprocess.run(["useradd", "--create-home", "--home-dir", str(self.home),
                        "--shell", "/bin/sh", "--user-group", self.name], check=True,
                       capture_output=True)
        entry = pwd.getpwnam(self.name)
        self.uid, self.gid = entry.pw_uid, entry.pw_gid
        self.python = self._runtime()
        self.state = self.home / ".local" / "state" / "rune" / "dev"

    def _runtime(self) -> str:
        """A venv of a system Python of this version, seeing this tree's packages (the
        test's own interpreter may sit where the developer cannot reach)."""
        runtime = self.top / "py"
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        for base in (sys._base_executable, shutil.which(version, path="/usr/bin:/bin")):
            if not base:
                continue
            shutil.rmtree(runtime, ignore_errors=True)
            made = subprocess.run([base, "-m", "venv", "--without-pip", str(runtime)],
                                  capture_output=True)
            if made.returncode != 0:
                continue
            site = runtime / "lib" / version / "site-packages"
            (site / "rune-tree.pth").write_text(
                f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
            scripts = Path(sysconfig.get_path("scripts"))
            (runtime / "bin" / "nats-server").symlink_to(scripts / "nats-server")
            subprocess.run(["chmod", "-R", "a+rX", str(runtime)], check=True)
            python = str(runtime / "bin" / "python")
            if self.run([python, "-c", "import rune.cli.main, rune.agent.main"]).returncode == 0:
                return python
        pytest.skip(f"no {version} that {self.name} can run and that imports this tree")

    def env(self) -> dict[str, str]:
        return {"HOME": str(self.home), "USER": self.name, "LOGNAME": self.name,
                "PATH": "/usr/local/bin:/usr/bin:/bin", "RUNE_MUX": "off",
                "LANG": "C.UTF-8"}

    def run(self, argv: list[str], timeout: float = 120, wrap: list[str] | None = None
            ) -> subprocess.CompletedProcess:
        command = [*(wrap or ["runuser", "-u", self.name, "--"]), "env", "-i",
                   *(f"{k}={v}" for k, v in self.env().items()), *argv]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              cwd="/", stdin=subprocess.DEVNULL)

    def rune(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return self.run([self.python, "-m", "rune.cli.main", *args], **kwargs)

    def remove(self) -> None:
        for pid in _pids_of(self.uid):  # whatever `dev down` left: this user's alone
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        subprocess.run(["userdel", self.name], capture_output=True)


@pytest.fixture(scope="module")
def developer():
    top = Path(tempfile.mkdtemp(prefix="rune-nonroot-", dir="/tmp"))
    os.chmod(top, 0o755)
    dev = Developer(top)
    yield dev
    dev.remove()
    shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(scope="module")
def dev_stack(developer):
    ports = {"nats": free_port(), "api": free_port(), "dashboard": free_port()}
    up = developer.rune("dev", "up", "--detach", "--nats-port", str(ports["nats"]),
                        "--api-port", str(ports["api"]), "--dashboard-port",
                        str(ports["dashboard"]), timeout=180)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "as you, with the stack's state" in up.stdout, up.stdout
        yield developer, ports
    finally:
        developer.rune("dev", "down", timeout=120)


def _dev(developer: Developer, ports: dict, *args: str) -> subprocess.CompletedProcess:
    """`rune exec` as the restricted user `dev`, run by the developer."""
    token = developer.state / "tokens" / "dev.token"
    return developer.rune("exec", "--api-server", f"127.0.0.1:{ports['api']}",
                          "--token-file", str(token), *args)


def _secrets(developer: Developer) -> list[Path]:
    state = developer.state
    return [*(state / "tokens").glob("*.token"), *(state / "broker").glob("*.nk"),
            state / "apiserver.yaml", developer.home / ".config" / "rune" / "config.yaml"]


def test_dev_cannot_read_tokens_seeds_or_the_cli_config(dev_stack):
    """The admin token, every seed and the CLI config are out of dev's reach, by path,
    relative path and through /proc, while the instance's own directory is there."""
    developer, ports = dev_stack
    secrets = _secrets(developer)
    assert len([p for p in secrets if p.suffix == ".nk"]) >= 2
    assert (developer.state / "tokens" / f"{developer.name}.token").exists()
    agent_pid = _agent_pid(developer)
    reads = " ".join(f"{p} ../../../../tokens/{p.name} /proc/{agent_pid}/root{p} "
                     f"/proc/{agent_pid}/cwd/{p.name}" for p in secrets)
    script = f"id -un; cat README; ls -A {developer.state}; echo end-of-listing; cat {reads}"
    result = _dev(developer, ports, "api", "sh", "-c", script + "; true")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == developer.name  # as the developer: there is no one else
    assert lines[1].startswith("demo api instance api-instance-local-")
    leaked = result.stdout + result.stderr
    for path in secrets:
        text = path.read_text()
        for line in filter(None, (s.strip() for s in text.splitlines())):
            assert line not in leaked, f"{path} leaked"
    listing = lines[2:lines.index("end-of-listing")]
    assert listing == ["agents"], listing  # only the way to the instance's own directory


def test_the_covers_cannot_be_lifted(dev_stack):
    """No unmount, remount or nested namespace gives the hidden files back."""
    developer, ports = dev_stack
    token = developer.state / "tokens" / f"{developer.name}.token"
    tries = (f"umount {developer.home}; mount -o remount,rw {developer.home}; "
             f"cat {token}; unshare -Urm sh -c 'umount -l {developer.home}; cat {token}'; true")
    result = _dev(developer, ports, "api", "sh", "-c", tries)
    assert result.returncode == 0, result.stderr
    assert token.read_text().strip() not in result.stdout + result.stderr


def test_the_instance_itself_runs_with_the_covers(dev_stack):
    """The supervised process (not only execs) sees the home as an empty read-only tmpfs."""
    developer, _ = dev_stack
    pid = _instance_pid("api-instance-local-0", developer.uid)
    mounts = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
    home = [m.split() for m in mounts if m.split()[4] == str(developer.home)]
    assert home and "tmpfs" in home[-1] and home[-1][5].startswith("ro"), home
    assert os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")
    assert os.stat(f"/proc/{pid}").st_uid == developer.uid


def test_exec_works_and_its_errors_are_unchanged(dev_stack):
    """echo, stdin, a TTY; 127 for a missing command, 126 for a missing or hidden workdir
    and for a file that is not executable."""
    developer, ports = dev_stack
    echo = _dev(developer, ports, "api", "echo", "hello")
    assert (echo.returncode, echo.stdout) == (0, "hello\n"), echo.stderr
    tty = _dev(developer, ports, "-t", "api", "sh", "-c", "test -t 1 && echo tty")
    assert tty.returncode == 0 and "tty" in tty.stdout, tty.stderr
    missing = _dev(developer, ports, "api", "/no/such/cmd")
    assert missing.returncode == 127, missing.stderr
    for tty_flag in ([], ["-t"]):
        nodir = _dev(developer, ports, *tty_flag, "--workdir", "/no/such/dir", "api", "true")
        assert nodir.returncode == 126 and "no such directory" in nodir.stderr + nodir.stdout
    hidden = _dev(developer, ports, "--workdir", str(developer.state / "tokens"), "api", "ls")
    assert hidden.returncode == 126, hidden.stdout + hidden.stderr
    notexec = _dev(developer, ports, "api", "/etc/hostname")
    assert notexec.returncode == 126, notexec.stderr
    assert _dev(developer, ports, "api", "true").returncode == 0  # and the stack is fine


def test_no_user_namespaces_means_no_demo_instances(developer):
    """Where unprivileged user namespaces are off, `rune dev up` refuses, naming the sysctl,
    and leaves nothing running."""
    state = developer.home / "refused-state"
    ports = [free_port(), free_port(), free_port()]
    wrap = [sys.executable, "-c", NO_USERNS, str(developer.uid), str(developer.gid)]
    result = developer.run([developer.python, "-m", "rune.cli.main", "dev", "up", "--detach",
                            "--state-dir", str(state), "--nats-port", str(ports[0]),
                            "--api-port", str(ports[1]), "--dashboard-port", str(ports[2])],
                           wrap=wrap)
    assert result.returncode == 255, result.stdout + result.stderr
    assert result.stderr.startswith("Error: not starting the demo instances"), result.stderr
    assert "kernel.unprivileged_userns_clone" in result.stderr
    assert "user.max_user_namespaces" in result.stderr
    assert not any(port_open(p) for p in ports)
    assert not (state / "pids.json").exists()


def _agent_pid(developer: Developer) -> int:
    import json

    return json.loads((developer.state / "pids.json").read_text())["agent-local"]


def _pids_of(uid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and entry.stat().st_uid == uid:
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _instance_pid(instance: str, uid: int) -> int:
    for pid in _pids_of(uid):
        entry = Path(f"/proc/{pid}")
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if f"RUNE_INSTANCE={instance}".encode() in environ and comm == "sleep":
            return pid
    raise AssertionError(f"no process of {instance}")


def test_agent_refuses_a_service_whose_paths_it_cannot_hide(developer):
    """An agent that is not root, on a host without user namespaces, refuses to start a
    service with hide_paths (before joining NATS), naming the sysctl."""
    import yaml

    config = developer.home / "agent-refused.yaml"
    config.write_text(yaml.safe_dump({
        "agent_id": "nr", "nats": {"url": f"nats://127.0.0.1:{free_port()}"},
        "state_dir": str(developer.home / "agent-refused-state"),
        "services": [{"name": "api", "command": ["sleep", "60"],
                      "isolation": {"hide_paths": [str(developer.home / ".config")]}}]}))
    shutil.chown(config, developer.name)
    wrap = [sys.executable, "-c", NO_USERNS, str(developer.uid), str(developer.gid)]
    result = developer.run([developer.python, "-m", "rune.agent.main", "--config",
                            str(config)], wrap=wrap, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Error: service api: cannot hide its hide_paths" in result.stderr, result.stderr
    assert "user.max_user_namespaces" in result.stderr
    assert "ready" not in result.stdout


def test_cp_does_not_go_around_the_covers(dev_stack):
    """`rune cp` acts in the agent, outside the namespace: refused for such an instance."""
    developer, ports = dev_stack
    token = developer.state / "tokens" / f"{developer.name}.token"
    result = developer.rune("cp", "--api-server", f"127.0.0.1:{ports['api']}",
                            f"api:{token}", "-")
    assert result.returncode == 255, result.stdout + result.stderr
    assert "hides paths of the host" in result.stderr, result.stderr
    assert token.read_text().strip() not in result.stdout
