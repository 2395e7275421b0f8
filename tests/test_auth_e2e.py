"""End to end with auth on: real nats-server with nkeys, apiserver with tokens and RBAC, agent."""

from __future__ import annotations

import asyncio
import os
import sys

import grpc
import pytest
import yaml
from rune.apiserver.tokens import digest, new_token
from rune.cli.client import ApiClient, ExecOptions
from rune.cli.devstack import DEV_USER, Stack, dev_auth, free_port, port_open, wait_until

from rune.errors import ResourceExhausted
from rune.proto import exec_pb2 as pb
from rune.proto import exec_pb2_grpc as pb_grpc

SLEEP = ["sh", "-c", "exec sleep 2147483647"]
SERVICES = [
    {"name": "api", "namespace": "default", "replicas": 1, "command": SLEEP},
    {"name": "db", "namespace": "prod", "replicas": 1, "command": SLEEP},
]
MAX_PER_USER = 3


def _write_token(path, token: str) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return str(path)


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secure")
    stack = Stack(tmp, nats_port=free_port(), api_port=free_port())
    extra = {"viewer": new_token(), "alice": new_token()}
    auth = dev_auth("admin", {})
    auth["roles"]["viewer"] = {"verbs": ["list"], "namespaces": ["default"]}
    auth["roles"]["lsonly"] = {"verbs": ["exec", "list"], "namespaces": ["default"],
                               "allowed_commands": ["ls", "cat"]}
    auth["bindings"] += [{"role": "viewer", "users": ["viewer"]},
                         {"role": "lsonly", "users": ["alice"]}]
    auth["tokens"] = [{"user": u, "sha256": digest(t)} for u, t in extra.items()]
    stack.secure(["a1"], admin="admin", auth=auth)
    for user, token in extra.items():
        stack.token_files[user] = tmp / "tokens" / f"{user}.token"
        _write_token(stack.token_files[user], token)
    try:
        stack.start_nats()
        stack.start_apiserver({"limits": {"max_sessions_per_user": MAX_PER_USER}})
        stack.start_agent("a1", SERVICES)
    except BaseException:
        stack.stop()
        raise
    yield stack
    stack.stop()


class Cli:
    """The real `rune` CLI as a given user (its token file given through RUNE_TOKEN_FILE)."""

    def __init__(self, stack: Stack, tmp) -> None:
        self.stack = stack
        self.config = tmp / "cli-config.yaml"

    def __call__(self, user: str | None, *args: str, env: dict | None = None,
                 api: str | None = None):
        import subprocess

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        base = {**os.environ, "RUNE_CONFIG": str(self.config)}
        base.pop("RUNE_TOKEN_FILE", None)
        if user:
            base["RUNE_TOKEN_FILE"] = str(self.stack.token_files[user])
        argv = [sys.executable, "-m", "rune.cli.main", args[0], "--api-server",
                api or self.stack.api_address, *args[1:]]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=root,
                              env={**base, **(env or {})}, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def rune(secure, tmp_path_factory):
    return Cli(secure, tmp_path_factory.mktemp("cli"))


def test_no_token_is_refused_and_nothing_runs(rune, tmp_path):
    """Without a token: authentication failed, exit 255, the command never ran."""
    marker = tmp_path / "ran"
    result = rune(None, "exec", "api", "touch", str(marker))
    assert result.returncode == 255
    assert result.stderr.startswith("Error: authentication failed: no bearer token")
    assert not marker.exists()


def test_wrong_token_is_refused_and_nothing_runs(rune, tmp_path):
    """A token the server does not know: authentication failed, nothing ran."""
    marker = tmp_path / "ran"
    wrong = _write_token(tmp_path / "wrong.token", new_token())
    result = rune(None, "exec", "api", "touch", str(marker), env={"RUNE_TOKEN_FILE": wrong})
    assert result.returncode == 255
    assert result.stderr.strip() == "Error: authentication failed: invalid token"
    assert not marker.exists()


def test_user_without_exec_is_denied_and_nothing_runs(rune, tmp_path):
    """A valid token without the exec verb: permission denied, nothing ran."""
    marker = tmp_path / "ran"
    result = rune("viewer", "exec", "api", "touch", str(marker))
    assert result.returncode == 255
    assert result.stderr.startswith("Error: failed to initialize exec session: permission "
                                    'denied: user "viewer" may not exec in namespace "default"')
    assert not marker.exists()
    assert rune("admin", "exec", "api", "touch", str(marker)).returncode == 0
    assert marker.exists()


def test_dev_user_cannot_list_or_exec_in_prod(rune):
    """`dev` is bound in default only: prod is neither listable nor reachable."""
    result = rune(DEV_USER, "instances", "-n", "prod")
    assert result.returncode == 255
    assert "permission denied" in result.stderr and '"prod"' in result.stderr
    result = rune(DEV_USER, "exec", "-n", "prod", "db", "true")
    assert result.returncode == 255
    assert result.stderr.startswith("Error: failed to initialize exec session: permission "
                                    "denied")
    listed = rune(DEV_USER, "instances", "-A")
    assert listed.returncode == 0
    assert "api-instance-a1-0" in listed.stdout and "prod" not in listed.stdout
    assert rune(DEV_USER, "exec", "api", "echo", "hi").stdout == "hi\n"


def test_admin_can_list_and_exec_in_prod(rune):
    """The admin role reaches every namespace."""
    result = rune("admin", "instances", "-A")
    assert "db-instance-a1-0" in result.stdout and "api-instance-a1-0" in result.stdout
    result = rune("admin", "exec", "-n", "prod", "db", "sh", "-c", "echo $RUNE_INSTANCE")
    assert result.returncode == 0
    assert result.stdout == "db-instance-a1-0\n"


@pytest.mark.parametrize("rm", [["rm", "-rf"], ["/bin/rm", "-rf"], ["rm", "-fr"],
                                ["rm", "-r", "-f"]])
def test_blocked_rm_rf_in_every_spelling(rune, tmp_path, rm):
    """The dev role's blocked `rm -rf` refuses every spelling; the directory survives."""
    victim = tmp_path / "x"
    victim.mkdir()
    (victim / "file").write_text("keep")
    result = rune(DEV_USER, "exec", "api", *rm, str(victim))
    assert result.returncode == 255
    assert 'blocked pattern "rm -rf"' in result.stderr
    assert (victim / "file").read_text() == "keep"


def test_plain_rm_is_allowed(rune, tmp_path):
    """`rm /x/file` is not `rm -rf` and runs."""
    victim = tmp_path / "x"
    victim.mkdir()
    (victim / "file").write_text("gone")
    result = rune(DEV_USER, "exec", "api", "rm", str(victim / "file"))
    assert result.returncode == 0, result.stderr
    assert not (victim / "file").exists()


def test_allowlist_refuses_a_shell(rune, tmp_path):
    """With allowed `ls cat`, `ls` runs and `sh` is refused before it runs."""
    marker = tmp_path / "ran"
    assert rune("alice", "exec", "api", "ls", "/").returncode == 0
    result = rune("alice", "exec", "api", "sh", "-c", f"touch {marker}")
    assert result.returncode == 255
    assert "not in the allowed commands" in result.stderr
    assert not marker.exists()


def test_token_file_from_config_and_exposed_file_warning(rune, tmp_path):
    """The config's token_file is used; a group-readable one draws an ssh-like warning."""
    token_file = tmp_path / "admin.token"
    token_file.write_text(rune.stack.token_files["admin"].read_text())
    os.chmod(token_file, 0o640)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"token_file": str(token_file)}))
    result = rune(None, "exec", "api", "echo", "ok", env={"RUNE_CONFIG": str(config)})
    assert result.stdout == "ok\n"
    assert f"Warning: token file {token_file} is accessible by others" in result.stderr


def test_tokens_never_reach_the_logs(rune, secure):
    """No token, good or bad, appears in any component's log."""
    rune(None, "exec", "api", "true", env={"RUNE_TOKEN_FILE": _write_token(
        secure.state_dir / "bad.token", "rune_not-a-real-token-but-secret")})
    tokens = [p.read_text().strip() for p in secure.token_files.values()]
    tokens.append("rune_not-a-real-token-but-secret")
    for log in secure.logs.iterdir():
        text = log.read_text(errors="replace")
        assert not any(t in text for t in tokens), log.name


async def _started(client: ApiClient, argv: list[str]):
    stream = client.exec_stream()
    await stream.start(ExecOptions(target="api", command=argv))
    return stream


async def test_sessions_per_user_are_limited(secure):
    """Past the per-user maximum a new session is refused with RESOURCE_EXHAUSTED."""
    async with ApiClient(secure.api_address, token=secure.admin_token) as client:
        streams = [await _started(client, ["sleep", "60"]) for _ in range(MAX_PER_USER)]
        try:
            with pytest.raises(ResourceExhausted, match='too many sessions: user "admin"'):
                await _started(client, ["true"])
        finally:
            for stream in streams:
                stream.cancel()
    # Once they end, the user may start sessions again.
    async def again() -> None:
        async with ApiClient(secure.api_address, token=secure.admin_token) as client:
            await _started(client, ["sleep", "1"])

    deadline = asyncio.get_running_loop().time() + 15
    while True:
        try:
            await again()
            break
        except ResourceExhausted:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.1)


async def _raw_call(secure: Stack, requests: list[pb.ExecRequest]) -> grpc.aio.AioRpcError:
    options = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(secure.api_address, options=options) as channel:
        stub = pb_grpc.ExecServiceStub(channel)
        call = stub.StreamExec(metadata=(("authorization", f"Bearer {secure.admin_token}"),))
        for request in requests:
            await call.write(request)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            for _ in range(100):
                if await call.read() is grpc.aio.EOF:
                    break
        return info.value


INIT = pb.ExecRequest(init=pb.ExecInit(target="api", command=["cat"]))


@pytest.mark.parametrize("requests, message", [
    ([pb.ExecRequest(stdin=b"x")], "first message"),
    ([INIT, INIT], "unexpected init"),
    ([INIT, pb.ExecRequest(stdin=b"x" * (4 * 1024 * 1024 + 1))], "maximum message size"),
    ([pb.ExecRequest(init=pb.ExecInit(target="api", command=["echo", "a\0b"]))], "NUL"),
    ([pb.ExecRequest(init=pb.ExecInit(target="api", command=["pwd"], workdir="tmp"))],
     "absolute"),
    ([pb.ExecRequest(init=pb.ExecInit(target="api", command=["true"],
                                      env={"A": "x" * 100_000}))], "env is too large"),
])
async def test_bad_streams_are_invalid_arguments(secure, requests, message):
    """Malformed streams get INVALID_ARGUMENT, and the server keeps serving."""
    error = await _raw_call(secure, requests)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details()
    async with ApiClient(secure.api_address, token=secure.admin_token) as client:
        from rune.cli.client import run_command

        result = await run_command(client, ExecOptions(target="api", command=["echo", "ok"]))
    assert result.stdout == b"ok\n"


def _make_ca(tmp, name: str):
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def cert(subject: str, key, issuer_name, issuer_key, ca: bool) -> x509.Certificate:
        now = datetime.datetime.now(datetime.UTC)
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(issuer_name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    ca_cert = cert(f"{name} CA", ca_key, ca_name, ca_key, True)
    key = ec.generate_private_key(ec.SECP256R1())
    server = cert("localhost", key, ca_name, ca_key, False)
    pem = serialization.Encoding.PEM
    paths = {k: tmp / f"{name}-{k}.pem" for k in ("ca", "cert", "key")}
    paths["ca"].write_bytes(ca_cert.public_bytes(pem))
    paths["cert"].write_bytes(server.public_bytes(pem))
    paths["key"].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return paths


@pytest.fixture(scope="module")
def tls_api(secure, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tls")
    good, other = _make_ca(tmp, "good"), _make_ca(tmp, "other")
    config = yaml.safe_load((secure.state_dir / "apiserver.yaml").read_text())
    port = free_port()
    config.update(listen=f"127.0.0.1:{port}", tls_cert=str(good["cert"]),
                  tls_key=str(good["key"]))
    path = tmp / "apiserver-tls.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = secure._spawn("apiserver-tls", [sys.executable, "-m", "rune.apiserver.main", "--config",
                                           str(path)])
    wait_until(lambda: port_open(port), "rune-apiserver (TLS)", proc=proc,
               log=secure.logs / "apiserver-tls.log")
    return f"127.0.0.1:{port}", good["ca"], other["ca"]


def test_tls_with_the_right_ca(rune, tls_api):
    """With --ca-file naming the issuing CA, exec works over TLS."""
    address, ca, _ = tls_api
    result = rune("admin", "exec", "--ca-file", str(ca), "api", "echo", "secure", api=address)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "secure\n"


def test_tls_with_a_wrong_ca_fails_clearly(rune, tls_api):
    """A CA that did not issue the server's certificate: one clear TLS error, exit 255."""
    address, _, wrong = tls_api
    result = rune("admin", "exec", "--ca-file", str(wrong), "api", "true", api=address)
    assert result.returncode == 255
    assert result.stderr.startswith(f"Error: failed to create API client: TLS handshake with "
                                    f"API server at {address} failed")
    assert len(result.stderr.strip().splitlines()) == 1



def test_denials_are_audited(rune, secure):
    """A refused exec is a session.denied event, read by the audit reader's own credentials."""
    import time

    from rune.subjects import Subjects
    from tests.test_audit_e2e import stream_events

    marker = f"denied-{time.monotonic_ns()}"
    assert rune("alice", "exec", "api", "sh", "-c", marker).returncode == 255

    deadline = time.monotonic() + 20
    while True:
        events = stream_events(secure.nats_url, "rune.audit.default.session.denied",
                               nkeys_seed=secure.nkey("audit-reader"),
                               inbox_prefix=Subjects().inbox("audit"))
        found = [e for e in events if marker in e.get("argv", [])]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(found) == 1
    assert found[0]["user"] == "alice"
    assert "allowed commands" in found[0]["reason"]
