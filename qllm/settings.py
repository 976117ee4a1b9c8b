"""Command-line flags that also read `QLLM_*` environment variables.

A flag `--kv-budget-tokens` takes its default from `QLLM_KV_BUDGET_TOKENS`; an explicit flag wins.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable


def env_name(flag: str) -> str:
    return "QLLM_" + flag.lstrip("-").replace("-", "_").upper()


def add(parser: argparse.ArgumentParser, flag: str, *, type: Callable[[str], Any] = str, default: Any = None,
        help: str = "", choices: list[str] | None = None) -> None:
    """Adds `flag` to parser with its default overridden by the matching QLLM_* variable."""
    name = env_name(flag)
    raw = os.environ.get(name)
    if raw is not None:
        default = _parse_bool(raw) if type is bool else type(raw)
    if type is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=bool(default),
                            help=f"{help} [env {name}]")
    else:
        parser.add_argument(flag, type=type, default=default, choices=choices,
                            help=f"{help} [env {name}, default {default}]")


def _parse_bool(raw: str) -> bool:
    return raw.strip().lower() in {"1", "true", "yes", "on"}


def add_service_flags(parser: argparse.ArgumentParser, *, port: int, metrics_port: int) -> None:
    add(parser, "--host", default="127.0.0.1", help="address to listen on")
    add(parser, "--port", type=int, default=port, help="gRPC port")
    add(parser, "--metrics-port", type=int, default=metrics_port, help="Prometheus HTTP port (0 = off)")
    add(parser, "--log-level", default="info", help="log level")
    add(parser, "--tls-cert", default=None, help="server certificate chain (PEM); with --tls-key turns on TLS")
    add(parser, "--tls-key", default=None, help="server private key (PEM)")
    add(parser, "--tls-client-ca", default=None,
        help="CA of client certificates (PEM): set = mutual TLS, clients must present a certificate")
    add(parser, "--internal-token-file", default=None,
        help="shared secret of qllm's services (one token a line: all accepted, the first presented; re-read "
             "on change): internal RPCs need it and this service's calls to the others carry it; unset = "
             "internal RPCs open (qllm up and deploy/ set it)")


def add_client_tls_flag(parser: argparse.ArgumentParser, peers: str) -> None:
    """--tls-ca for a service that also calls others (`peers` names them in the help)."""
    add(parser, "--tls-ca", default=None,
        help=f"CA (PEM, or 'system') to verify {peers}: set = TLS to them; --tls-cert/--tls-key are then also "
             "presented as the client certificate")
