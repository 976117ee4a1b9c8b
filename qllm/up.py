"""`qllm up`: every service as its own process on one host, in the foreground.

The stack is also what benchmarks and end-to-end tests start, through `Stack`, so there is one way of
launching qllm locally.

The services authenticate each other with an internal token (qllm/internal_auth.py): the stack generates
one per start into a file only its user can read (or uses QLLM_INTERNAL_TOKEN_FILE when it is set) and
hands every service its path; `Stack.internal_token` is it, for tools that call internal RPCs.
"""

from __future__ import annotations

import argparse
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qllm import internal_auth, settings

ROUTER_PORT, WORKER_PORT, PREDICTOR_PORT, KVMANAGER_PORT = 50051, 50061, 50071, 50081
METRICS_OFFSET = 9100 - 50000  # router 9151, worker 9161.., predictor 9171, kvmanager 9181


@dataclass
class StackConfig:
    host: str = "127.0.0.1"
    workers: int = 1
    model: str | None = None
    policy: str = "qllm"
    port_offset: int = 0
    metrics: bool = True
    worker_args: list[str] = field(default_factory=list)
    router_args: list[str] = field(default_factory=list)
    kvmanager_args: list[str] = field(default_factory=list)
    predictor_args: list[str] = field(default_factory=list)
    log_dir: str | None = None  # None = inherit stderr

    def port(self, base: int) -> int:
        return base + self.port_offset

    def metrics_port(self, grpc_port: int) -> int:
        return grpc_port + METRICS_OFFSET if self.metrics else 0

    @property
    def router_address(self) -> str:
        return f"{self.host}:{self.port(ROUTER_PORT)}"


class Stack:
    """Starts predictor, kvmanager, workers and router as subprocesses; waits until each says SERVING."""

    def __init__(self, config: StackConfig):
        self.config = config
        self.procs: list[tuple[str, str, subprocess.Popen]] = []
        self.internal_token: internal_auth.InternalToken | None = None
        self._token_dir: str | None = None
        self._env: dict[str, str] = dict(os.environ)

    def _make_token(self) -> None:
        path = os.environ.get(settings.env_name("--internal-token-file"))
        if not path:
            self._token_dir = tempfile.mkdtemp(prefix="qllm-up-")  # 0700
            path = os.path.join(self._token_dir, "internal-token")
            internal_auth.write_token_file(path)
        self._env[settings.env_name("--internal-token-file")] = path
        self.internal_token = internal_auth.InternalToken.from_file(path)

    def _spawn(self, name: str, address: str, args: list[str]) -> None:
        cmd = [sys.executable, "-m", "qllm.cli", *args]
        stderr = None
        if self.config.log_dir:
            os.makedirs(self.config.log_dir, exist_ok=True)
            stderr = open(os.path.join(self.config.log_dir, f"{name}.log"), "ab")
        proc = subprocess.Popen(cmd, stdout=stderr, stderr=stderr, start_new_session=True, env=self._env)
        self.procs.append((name, address, proc))

    def start(self, timeout_s: float = 180.0) -> "Stack":
        c = self.config
        self._make_token()
        common = ["--host", c.host]
        pred_port, kv_port = c.port(PREDICTOR_PORT), c.port(KVMANAGER_PORT)
        worker_addrs = [f"{c.host}:{c.port(WORKER_PORT) + i}" for i in range(c.workers)]
        self._spawn("predictor", f"{c.host}:{pred_port}", ["predictor", *common, "--port", str(pred_port),
                                                            "--metrics-port", str(c.metrics_port(pred_port)),
                                                            *c.predictor_args])
        self._spawn("kvmanager", f"{c.host}:{kv_port}", ["kvmanager", *common, "--port", str(kv_port),
                                                          "--metrics-port", str(c.metrics_port(kv_port)),
                                                          "--predictor", f"{c.host}:{pred_port}",
                                                          "--workers", ",".join(worker_addrs), *c.kvmanager_args])
        for i in range(c.workers):
            port = c.port(WORKER_PORT) + i
            args = ["worker", *common, "--port", str(port), "--metrics-port", str(c.metrics_port(port)),
                    "--policy", c.policy, "--predictor", f"{c.host}:{pred_port}", *c.worker_args]
            if c.model:
                args += ["--model", c.model]
            self._spawn(f"worker{i}", f"{c.host}:{port}", args)
        router_port = c.port(ROUTER_PORT)
        self._spawn("router", c.router_address, [
            "router", *common, "--port", str(router_port), "--metrics-port", str(c.metrics_port(router_port)),
            "--workers", ",".join(worker_addrs), "--predictor", f"{c.host}:{pred_port}",
            "--kvmanager", f"{c.host}:{kv_port}", *c.router_args])
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for name, address, proc in self.procs:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} before it was ready")
                if _is_serving(address):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} at {address} not SERVING after {timeout_s:.0f}s")
                time.sleep(0.2)

    def stop(self, grace_s: float = 10.0) -> None:
        # Router first so no new work reaches the workers, then the rest.
        for name, _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for _, _, proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        if self._token_dir is not None:
            shutil.rmtree(self._token_dir, ignore_errors=True)
            self._token_dir = None

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _is_serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def configure_parser(parser: argparse.ArgumentParser) -> None:
    settings.add(parser, "--workers", type=int, default=1, help="number of workers")
    settings.add(parser, "--model", default=None, help="local HF MoE checkpoint directory (default: embedded)")
    settings.add(parser, "--policy", default="qllm", help="worker scheduling policy (qllm, priority, priority-evict, fcfs)")
    settings.add(parser, "--host", default="127.0.0.1", help="address every service listens on")


def run(args: argparse.Namespace) -> int:
    stack = Stack(StackConfig(host=args.host, workers=args.workers, model=args.model, policy=args.policy))
    stack.start()
    for name, address, _ in stack.procs:
        print(f"{name:10s} listening on {address}", flush=True)
    print("try: grpcurl -plaintext -d '{\"prompt\": \"Hello\", \"max_tokens\": 16, "
          "\"priority\": \"PRIORITY_LATENCY_SENSITIVE\"}' "
          f"{stack.config.router_address} qllm.v1.Router/Generate", flush=True)
    print(f"internal RPCs need the token in {stack._env[settings.env_name('--internal-token-file')]} "
          "(grpcurl -H \"x-qllm-internal-token: $(head -1 FILE)\" ...)", flush=True)
    stopping = False

    def _stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        while not stopping:
            for name, _, proc in stack.procs:
                if proc.poll() is not None:
                    print(f"{name} exited with {proc.returncode}; stopping the stack", file=sys.stderr)
                    stopping = True
            time.sleep(0.5)
    finally:
        stack.stop()
    return 0
