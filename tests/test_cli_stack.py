"""`qllm up`'s launcher: all four services as real subprocesses, one streamed Generate, clean stop."""

import grpc

from qllm.up import Stack, StackConfig
from qllm.v1 import router_pb2, router_pb2_grpc


def test_subprocess_stack_streams_and_stops(tmp_path):
    config = StackConfig(port_offset=700, metrics=False, log_dir=str(tmp_path))
    with Stack(config) as stack:
        names = [name for name, _, _ in stack.procs]
        assert names == ["predictor", "kvmanager", "worker0", "router"]
        with grpc.insecure_channel(config.router_address) as channel:
            msgs = list(router_pb2_grpc.RouterStub(channel).Generate(router_pb2.GenerateRequest(
                prompt="Hello from a subprocess stack", max_tokens=5, ignore_eos=True, priority=1), timeout=60))
        assert msgs[-1].finished and sum(len(m.token_ids) for m in msgs) == 5
        procs = [p for _, _, p in stack.procs]
    assert all(p.returncode is not None for p in procs)
    # SIGTERM is a graceful stop: every service exits 0.
    assert [p.returncode for p in procs] == [0, 0, 0, 0], open(tmp_path / "router.log").read()[-2000:]
