"""The compose stack's one-shot init, and `login`, which hands the CLI its credentials.

`init` writes, once, into one named volume per component (each mounted only where it is
needed, files mode 0600): the broker's nkeys config (public keys only), the apiserver's
config with its seed, the admin token's hash and a TLS certificate from a throwaway CA
(whose key is never written), the agent's own seed, the dashboard's TLS certificate from
the same CA, and for `login` the admin token and the CA certificate. A second run finds
everything in place and changes nothing, so the credentials of a running stack survive
`docker compose up` again; `down -v` starts over.

`login` prints a POSIX shell script for the host (`… run --rm -T init login | sh`): it
writes the token and the CA into the user's config directory and points the CLI config
at the published port, so `rune exec demo sh` needs no flags.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(os.environ.get("RUNE_COMPOSE_ROOT", "/etc/rune"))
AGENT_ID = "compose"
ADMIN = "admin"
NATS_URL = "nats://nats:4222"
API_LISTEN = "0.0.0.0:8443"
# Each TLS server of the stack, and the names it is reached by: from the host through its
# loopback-only published port, and from the other services by its compose service name.
SERVER_NAMES = {"apiserver": ("localhost", "127.0.0.1", "apiserver"),
                "dashboard": ("localhost", "127.0.0.1", "dashboard")}
CERT_DAYS = 3650
DONE_MARK = ".complete"

NATS_CONF = """\
# nats-server of docker-compose.yml, written by its init service. Reachable only on the
# compose network (no host port); every client needs one of the nkeys in auth.conf.
listen: 0.0.0.0:4222
# Monitoring for the healthcheck, inside the container only.
http: 127.0.0.1:8222
jetstream { store_dir: /data }
include "auth.conf"
"""


def volumes(root: Path = ROOT) -> dict[str, Path]:
    return {name: root / name for name in ("broker", "apiserver", "agent", "dashboard", "admin")}


def write_private(path: Path, data: str | bytes) -> None:
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(raw)
    os.chmod(path, 0o600)  # O_CREAT keeps the mode of a file that was already there


def throwaway_tls(servers: dict[str, tuple[str, ...]] = SERVER_NAMES, days: int = CERT_DAYS,
                  ) -> tuple[bytes, dict[str, tuple[bytes, bytes]]]:
    """The CA certificate and, per server, (certificate, key) as PEM; the CA key is dropped,
    so nothing can issue another certificate this stack's clients would trust."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rune compose CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False,
                                       decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    issued: dict[str, tuple[bytes, bytes]] = {}
    for server, names in servers.items():
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = []
        for name in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server)]))
                .issuer_name(ca_name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                               critical=True)
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        issued[server] = (cert.public_bytes(pem),
                          key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    return ca.public_bytes(pem), issued


def apiserver_config(api: Path, token_sha256: str) -> dict:
    return {
        "listen": API_LISTEN,
        "nats_url": NATS_URL,
        "nats_nkey_seed_file": str(api / "apiserver.nk"),
        "tls_cert": str(api / "tls.crt"),
        "tls_key": str(api / "tls.key"),
        "auth": {
            "enabled": True,
            "tokens": [{"user": ADMIN, "groups": [], "sha256": token_sha256}],
            "roles": {"admin": {"verbs": ["*"], "namespaces": ["*"]}},
            "bindings": [{"role": "admin", "users": [ADMIN]}],
        },
    }


EXPECTED = {
    "broker": ("auth.conf", "nats.conf"),
    "apiserver": ("apiserver.nk", "apiserver.yaml", "tls.crt", "tls.key", "ca.crt"),
    "agent": ("agent.nk",),
    "dashboard": ("tls.crt", "tls.key", "ca.crt"),
    "admin": ("admin.token", "ca.crt", "audit-reader.nk", DONE_MARK),
}


def is_complete(root: Path = ROOT) -> bool:
    """Every volume holds its files (one volume removed by hand means starting over)."""
    dirs = volumes(root)
    return all((dirs[volume] / name).is_file()
               for volume, names in EXPECTED.items() for name in names)


def init(root: Path = ROOT) -> bool:
    """Writes every component's secrets unless they are all there; True when it wrote."""
    from rune.apiserver.tokens import digest, new_token
    from rune.broker_config.generate import generate

    if is_complete(root):
        return False
    dirs = volumes(root)
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o700)
    with tempfile.TemporaryDirectory() as scratch:
        generate(scratch, [AGENT_ID])
        seeds = Path(scratch)
        # nats-server gets only public keys; each seed goes to its one owner.
        write_private(dirs["broker"] / "auth.conf", (seeds / "auth.conf").read_text())
        write_private(dirs["broker"] / "nats.conf", NATS_CONF)
        shutil.copyfile(seeds / "apiserver.nk", dirs["apiserver"] / "apiserver.nk")
        shutil.copyfile(seeds / f"agent-{AGENT_ID}.nk", dirs["agent"] / "agent.nk")
        shutil.copyfile(seeds / "audit-reader.nk", dirs["admin"] / "audit-reader.nk")
    for path in (dirs["apiserver"] / "apiserver.nk", dirs["agent"] / "agent.nk",
                 dirs["admin"] / "audit-reader.nk"):
        os.chmod(path, 0o600)
    ca, issued = throwaway_tls()
    for server, (cert, key) in issued.items():
        write_private(dirs[server] / "tls.crt", cert)
        write_private(dirs[server] / "tls.key", key)
        write_private(dirs[server] / "ca.crt", ca)
    write_private(dirs["admin"] / "ca.crt", ca)
    token = new_token()
    write_private(dirs["admin"] / "admin.token", token + "\n")
    config = apiserver_config(dirs["apiserver"], digest(token))
    write_private(dirs["apiserver"] / "apiserver.yaml", yaml.safe_dump(config, sort_keys=False))
    write_private(dirs["admin"] / DONE_MARK, "")
    return True


def login_script(token: str, ca_pem: str, api_server: str, dashboard: str | None = None) -> str:
    """Shell for the host: token and CA into the user's config dir, the CLI config at them."""
    return f"""#!/bin/sh
# Written by the rune compose init service: points the rune CLI at this compose stack.
set -eu
umask 077
dir="${{XDG_CONFIG_HOME:-$HOME/.config}}/rune"
config="${{RUNE_CONFIG:-$dir/config.yaml}}"
mkdir -p "$dir/compose" "$(dirname "$config")"
printf '%s\\n' {shlex.quote(token)} > "$dir/compose/admin.token"
printf '%s' {shlex.quote(ca_pem)} > "$dir/compose/ca.crt"
if [ -f "$config" ] && ! grep -q '^# rune compose login' "$config"; then
    cp "$config" "$config.before-compose"
    echo "rune: kept your previous CLI config as $config.before-compose" >&2
fi
cat > "$config" <<EOF
# rune compose login: the CLI talks to the compose stack's apiserver
api_server: {api_server}
token_file: $dir/compose/admin.token
ca_file: $dir/compose/ca.crt
EOF
echo "rune: $config now points at {api_server} (TLS, admin token); try: rune exec demo sh" >&2
{dashboard_line(dashboard)}"""


def dashboard_line(dashboard: str | None) -> str:
    if not dashboard:
        return ""
    return (f'echo "rune: the dashboard is https://{dashboard}/ (sign in with the token in '
            f'$dir/compose/admin.token; its certificate is from the CA in '
            f'$dir/compose/ca.crt)" >&2\n')


def login(root: Path = ROOT) -> str:
    if not is_complete(root):
        raise FileNotFoundError("the compose stack has no credentials yet: run "
                                "`docker compose up -d` first")
    admin = volumes(root)["admin"]
    port = os.environ.get("RUNE_API_PORT", "8443")
    dashboard_port = os.environ.get("RUNE_DASHBOARD_PORT", "8480")
    return login_script((admin / "admin.token").read_text().strip(),
                        (admin / "ca.crt").read_text(), f"127.0.0.1:{port}",
                        f"127.0.0.1:{dashboard_port}")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    command = args[0] if args else "init"
    try:
        if command == "init":
            wrote = init()
            print("rune init: wrote the broker nkeys, the admin token and the apiserver's TLS "
                  "certificate" if wrote else
                  "rune init: credentials already present, nothing changed", flush=True)
        elif command == "login":
            sys.stdout.write(login())
        else:
            sys.stderr.write(f"Error: unknown command {command!r}: use init or login\n")
            return 2
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"Error: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
