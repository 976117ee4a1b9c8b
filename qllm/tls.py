"""TLS and mutual TLS for qllm's gRPC servers and channels, from PEM files.

    creds = server_credentials(cert, key, client_ca)        # None when cert and key are unset: plaintext
    port = add_port(server, "0.0.0.0:50051", creds)         # add_secure_port or add_insecure_port
    creds = channel_credentials(ca, cert, key)               # None when nothing is set: plaintext
    channel = open_channel("worker-0:50061", creds)          # grpc.aio secure or insecure channel

`client_ca` set = mutual TLS: the server requires a client certificate signed by that CA. `ca="system"` on
the client side uses the system's trust store instead of a file. Missing halves (a cert without its key)
and unreadable or non-PEM files raise TLSConfigError naming the flag, at start-up rather than at the first
handshake.

With `reload=True` the server re-reads its files when one of them changes (cert-manager or a kubelet
Secret update rotating them): gRPC asks before every new connection's handshake, the check is a few
`stat` calls, and a half-written set that fails to load keeps the previous certificates in use.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import grpc

SYSTEM_ROOTS = "system"


class TLSConfigError(ValueError):
    """TLS is configured inconsistently or a file is unusable; the message starts with the flag's name."""


def _read_pem(path: str | os.PathLike, flag: str, marker: bytes) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"{flag}: cannot read {path}: {exc.strerror or exc}") from exc
    if b"-----BEGIN " not in data or marker not in data:
        raise TLSConfigError(f"{flag}: {path} is not a PEM file with a {marker.decode().strip('- ')}")
    return data


def _read_cert(path, flag: str) -> bytes:
    return _read_pem(path, flag, b"CERTIFICATE-----")


def _read_key(path, flag: str) -> bytes:
    return _read_pem(path, flag, b"PRIVATE KEY-----")


def _signature(paths: Sequence[str | os.PathLike | None]) -> tuple:
    sig = []
    for p in paths:
        if p is None:
            continue
        try:
            st = os.stat(p)
            sig.append((str(p), st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            sig.append((str(p), None))
    return tuple(sig)


class _Reloader:
    """The certificate_configuration_fetcher of grpc.dynamic_ssl_server_credentials."""

    def __init__(self, cert, key, client_ca):
        self.paths = (cert, key, client_ca)
        self.signature = _signature(self.paths)
        self.reloads = 0
        self.failures = 0

    def config(self) -> grpc.ServerCertificateConfiguration:
        cert, key, client_ca = self.paths
        return grpc.ssl_server_certificate_configuration(
            [(_read_key(key, "--tls-key"), _read_cert(cert, "--tls-cert"))],
            root_certificates=_read_cert(client_ca, "--tls-client-ca") if client_ca else None)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        signature = _signature(self.paths)
        if signature == self.signature:
            return None
        try:
            config = self.config()
        except Exception:  # noqa: BLE001 - mid-rotation or broken files: keep serving the previous set
            self.failures += 1
            return None
        self.signature = signature
        self.reloads += 1
        return config


def server_credentials(cert: str | os.PathLike | None, key: str | os.PathLike | None,
                       client_ca: str | os.PathLike | None = None, *,
                       reload: bool = False) -> grpc.ServerCredentials | None:
    """TLS server credentials from a certificate chain and its private key (PEM files); None when neither
    is set. `client_ca` set = mutual TLS: clients must present a certificate that CA signed."""
    if not cert and not key:
        if client_ca:
            raise TLSConfigError("--tls-client-ca: mutual TLS needs --tls-cert and --tls-key as well")
        return None
    if not cert:
        raise TLSConfigError("--tls-cert: --tls-key is set but its certificate is not")
    if not key:
        raise TLSConfigError("--tls-key: --tls-cert is set but its private key is not")
    if reload:
        reloader = _Reloader(cert, key, client_ca or None)
        creds = grpc.dynamic_ssl_server_credentials(reloader.config(), reloader,
                                                    require_client_authentication=bool(client_ca))
        creds.reloader = reloader  # for tests and diagnostics
        return creds
    return grpc.ssl_server_credentials(
        [(_read_key(key, "--tls-key"), _read_cert(cert, "--tls-cert"))],
        root_certificates=_read_cert(client_ca, "--tls-client-ca") if client_ca else None,
        require_client_auth=bool(client_ca))


def channel_credentials(ca: str | os.PathLike | None = None, cert: str | os.PathLike | None = None,
                        key: str | os.PathLike | None = None) -> grpc.ChannelCredentials | None:
    """TLS channel credentials: trust `ca` (a PEM file, or "system" for the system trust store) and, with
    `cert` and `key`, present a client certificate (mutual TLS). None when nothing is set: plaintext."""
    if not ca and not cert and not key:
        return None
    if bool(cert) != bool(key):
        raise TLSConfigError("--tls-cert: a client certificate needs its key (--tls-key), and the reverse")
    if not ca:
        raise TLSConfigError("--tls-ca: set the CA that signed the server's certificate, or 'system'")
    roots = None if str(ca) == SYSTEM_ROOTS else _read_cert(ca, "--tls-ca")
    return grpc.ssl_channel_credentials(
        root_certificates=roots,
        private_key=_read_key(key, "--tls-key") if key else None,
        certificate_chain=_read_cert(cert, "--tls-cert") if cert else None)


def add_port(server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """Binds `address` on a grpc or grpc.aio server, with TLS when credentials are given; the bound port."""
    if credentials is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credentials)


def channel_options(server_name: str | None = None) -> list[tuple[str, object]]:
    """Channel options for TLS: `server_name` checks the server's certificate against that name instead of
    the target's host (dialling by IP, or a cert issued for a Service name)."""
    return [("grpc.ssl_target_name_override", server_name)] if server_name else []


def open_channel(target: str, credentials: grpc.ChannelCredentials | None,
                 options: Sequence[tuple[str, object]] = (), server_name: str | None = None,
                 interceptors: Sequence[object] = ()) -> grpc.aio.Channel:
    """A grpc.aio channel to `target`, TLS when credentials are given; `interceptors` add e.g. the internal
    token (qllm/internal_auth.py) to every call."""
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=list(options), interceptors=list(interceptors) or None)
    return grpc.aio.secure_channel(target, credentials, options=[*options, *channel_options(server_name)],
                                   interceptors=list(interceptors) or None)


__all__ = ["SYSTEM_ROOTS", "TLSConfigError", "add_port", "channel_credentials", "channel_options",
           "open_channel", "server_credentials"]
