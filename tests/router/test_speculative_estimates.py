"""The router's speculative order: the predictor's estimate orders the BE queue and its predicted length
goes to the worker, which re-estimates from it as tokens are generated; no predictor = arrival order."""

from qllm.v1 import predictor_pb2, router_pb2, worker_pb2
from router.core import Job, RouterCore
from router.deps import KVManagerClient
from router.server import RouterServicer
from router.validation import Limits


class FakePredictor:
    def __init__(self, estimate):
        self.estimate_reply = estimate
        self.asked = []

    async def estimate(self, prompt, max_tokens):
        self.asked.append((prompt, max_tokens))
        return self.estimate_reply


def servicer(predictor):
    return RouterServicer(RouterCore([], be_order="speculative"), Limits(), predictor, KVManagerClient(None))


async def test_speculative_sets_the_queue_key_and_the_workers_predicted_length():
    predictor = FakePredictor(predictor_pb2.Estimate(predicted_output_tokens=180, remaining_tokens=180,
                                                     remaining_s=2.5))
    job = Job("r1", False, worker_pb2.SubmitRequest(request_id="r1"))
    await servicer(predictor)._set_order_key(job, router_pb2.GenerateRequest(prompt="write a poem", max_tokens=300))
    assert predictor.asked == [("write a poem", 300)]
    assert job.est_remaining_s == 2.5 and job.submit.predicted_output_tokens == 180


async def test_no_estimate_leaves_arrival_order():
    job = Job("r2", False, worker_pb2.SubmitRequest(request_id="r2"))
    await servicer(FakePredictor(None))._set_order_key(job, router_pb2.GenerateRequest(prompt="x", max_tokens=9))
    assert job.est_remaining_s is None and job.submit.predicted_output_tokens == 0
