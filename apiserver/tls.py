"""Serving gRPC with TLS, and refusing plaintext anywhere but loopback."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import grpc

LOOPBACK_NAMES = ("localhost", "ip6-localhost")


def host_of(listen: str) -> str:
    host = listen.rsplit(":", 1)[0] if ":" in listen else listen
    return host.strip("[]")


def is_loopback(listen: str) -> bool:
    host = host_of(listen)
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname or "0.0.0.0"/"" that may be reached from elsewhere


def server_credentials(cert_file: str, key_file: str) -> grpc.ServerCredentials:
    try:
        cert = Path(cert_file).read_bytes()
        key = Path(key_file).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read TLS certificate or key: {exc}") from None
    return grpc.ssl_server_credentials([(key, cert)])


def check_plaintext_allowed(listen: str, insecure: bool) -> None:
    if not is_loopback(listen) and not insecure:
        raise ValueError(f"refusing to serve plaintext gRPC on {listen}, which is not a "
                         "loopback address: give --tls-cert and --tls-key, or --insecure")
