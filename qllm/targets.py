"""Worker addresses from configuration: `HOST:PORT` entries and `dns:///NAME:PORT` names that resolve to
many (a Kubernetes headless Service), as `--workers` takes them on the router and the kvmanager."""

from __future__ import annotations

import asyncio
import socket
from typing import Iterable, Sequence

from qllm.logs import get_logger

log = get_logger(__name__)

DNS_PREFIX = "dns:///"


def split_target(target: str, flag: str = "--workers") -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{flag}: {target!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


class Targets:
    """A parsed `--workers` list; `resolve()` turns it into the set of worker addresses right now."""

    def __init__(self, targets: Sequence[str], flag: str = "--workers"):
        targets = [t.strip() for t in targets if t.strip()]
        self.static = [t for t in targets if not t.startswith(DNS_PREFIX)]
        self.dns = [split_target(t[len(DNS_PREFIX):], flag) for t in targets if t.startswith(DNS_PREFIX)]
        for t in self.static:
            split_target(t, flag)

    @classmethod
    def parse(cls, value: str, flag: str = "--workers") -> "Targets":
        return cls(value.split(","), flag)

    async def resolve(self, previous: Iterable[str] = ()) -> set[str]:
        """The static addresses and every address the DNS names resolve to now; when a name does not
        resolve, the addresses in `previous` that are not static are kept."""
        addresses = set(self.static)
        loop = asyncio.get_running_loop()
        for host, port in self.dns:
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                log.warning("worker name did not resolve; keeping the workers known", name=host, error=str(exc))
                addresses |= {a for a in previous if a not in self.static}
                continue
            for family, _, _, _, sockaddr in infos:
                ip = sockaddr[0]
                addresses.add(f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}")
        return addresses
