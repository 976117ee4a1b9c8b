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

    async def rank(self, prompts):  # the arrival order's background score
        return []


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


def servicer_with(predictor, be_order, be_length_estimates):
    return RouterServicer(RouterCore([], be_order=be_order), Limits(), predictor, KVManagerClient(None),
                          be_length_estimates=be_length_estimates)


async def test_be_length_estimates_predictor_sends_the_estimate_without_changing_the_order():
    predictor = FakePredictor(predictor_pb2.Estimate(predicted_output_tokens=120, remaining_tokens=120,
                                                     remaining_s=1.0))
    job = Job("r3", False, worker_pb2.SubmitRequest(request_id="r3"))
    s = servicer_with(predictor, "arrival", "predictor")
    await s._set_order_key(job, router_pb2.GenerateRequest(prompt="sum it up", max_tokens=400))
    assert predictor.asked == [("sum it up", 400)]
    assert job.submit.predicted_output_tokens == 120  # the estimate, not the 400-token budget
    assert job.est_remaining_s is None and job.length_score is None  # the BE order is still arrival
    # no estimate: nothing is sent, the worker falls back to the budget
    job = Job("r4", False, worker_pb2.SubmitRequest(request_id="r4"))
    await servicer_with(FakePredictor(None), "arrival", "predictor")._set_order_key(
        job, router_pb2.GenerateRequest(prompt="x", max_tokens=9))
    assert job.submit.predicted_output_tokens == 0


async def test_be_length_estimates_order_and_oracle():
    predictor = FakePredictor(predictor_pb2.Estimate(predicted_output_tokens=50, remaining_tokens=50,
                                                     remaining_s=1.0))
    job = Job("r5", False, worker_pb2.SubmitRequest(request_id="r5"))
    await servicer_with(predictor, "arrival", "order")._set_order_key(
        job, router_pb2.GenerateRequest(prompt="x", max_tokens=300))
    assert job.submit.predicted_output_tokens == 0  # the default: only the speculative order sends one
    for order in ("arrival", "speculative"):
        job = Job("r6", False, worker_pb2.SubmitRequest(request_id="r6"))
        await servicer_with(predictor, order, "oracle")._set_order_key(
            job, router_pb2.GenerateRequest(prompt="x", max_tokens=300))
        assert job.submit.predicted_output_tokens == 300  # max_tokens: the true length under ignore_eos
