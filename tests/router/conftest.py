from dataclasses import dataclass, field

import pytest

from qllm.v1 import worker_pb2


@dataclass(eq=False)
class FakeWorker:
    """A WorkerClient stand-in: records what it is sent and lets a test answer, fail or restore it."""

    address: str
    max_num_seqs: int = 4
    healthy: bool = True
    sent: list = field(default_factory=list)
    handlers: dict = field(default_factory=dict)
    started: bool = False
    closed: bool = False
    on_lost: object = None
    on_ready: object = None

    @property
    def info(self):
        return worker_pb2.WorkerInfo(max_num_seqs=self.max_num_seqs)

    @property
    def in_flight(self):
        return len(self.handlers)

    def submit(self, submit, handler):
        self.sent.append(submit.request_id)
        self.handlers[submit.request_id] = handler

    def done(self, rid):
        self.handlers.pop(rid, None)

    def cancel(self, rid):
        self.handlers.pop(rid, None)

    def token(self, rid, finished=False):
        self.handlers[rid](worker_pb2.WorkerEvent(request_id=rid, tokens=worker_pb2.TokenDelta(
            token_ids=[7], finished=finished)))

    def finish(self, rid):
        self.token(rid, finished=True)

    def die(self):
        self.healthy = False
        handlers, self.handlers = self.handlers, {}
        self.on_lost(self, list(handlers))

    def come_back(self):
        self.healthy = True
        self.on_ready()

    def start(self):
        self.started = True

    async def close(self):
        self.closed = True


@pytest.fixture
def fake_worker():
    return FakeWorker
