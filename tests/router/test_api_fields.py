"""The router's pure parts of the serving API: GetModelInfo's answer, and the text the predictor sees."""

from types import SimpleNamespace

from qllm.security import ANONYMOUS, RateLimit, Tenant
from qllm.v1 import common_pb2, router_pb2, worker_pb2
from router.model_info import model_info
from router.validation import Limits, text_for_prediction


def worker(address, healthy=True, info=None, in_flight=0):
    return SimpleNamespace(address=address, healthy=healthy, info=info, in_flight=in_flight)


def test_model_info_from_the_workers_and_the_tenant():
    up = worker_pb2.WorkerInfo(model_name="m", max_context=4096, vocab_size=8192, num_layers=8, policy="qllm",
                               device="cpu", max_num_seqs=32, kv_capacity_tokens=32768, has_chat_template=True,
                               eos_token_ids=[0, 7])
    workers = [worker("w0:1", healthy=False, info=worker_pb2.WorkerInfo(model_name="old", policy="fcfs")),
               worker("w1:1", info=up, in_flight=3), worker("w2:1", healthy=False)]
    tenant = Tenant("batch", frozenset({"BE"}), RateLimit(requests_per_s=5.0, burst=10.0))
    info = model_info(workers, Limits(max_prompt_bytes=1000, max_beams=4), tenant, max_be_queue=64)
    # Model facts come from a healthy worker's Describe.
    assert (info.model_name, info.max_context, info.vocab_size, info.has_chat_template) == ("m", 4096, 8192, True)
    assert list(info.eos_token_ids) == [0, 7]
    assert [(w.address, w.healthy, w.policy) for w in info.workers] == [
        ("w0:1", False, "fcfs"), ("w1:1", True, "qllm"), ("w2:1", False, "")]
    assert info.workers[1].in_flight == 3 and info.workers[1].kv_capacity_tokens == 32768
    limits = info.limits
    assert (limits.max_prompt_bytes, limits.max_beams, limits.max_be_queue) == (1000, 4, 64)
    assert list(limits.tenant_priorities) == [common_pb2.PRIORITY_BEST_EFFORT]
    assert (limits.tenant_requests_per_s, limits.tenant_burst) == (5.0, 10.0)


def test_model_info_before_any_worker_answered():
    info = model_info([worker("w:1", healthy=False)], Limits(), ANONYMOUS, max_be_queue=0)
    assert info.model_name == "" and info.limits.tenant_requests_per_s == 0 and len(info.limits.tenant_priorities) == 2


def test_predictor_text_of_each_input_kind():
    assert text_for_prediction(router_pb2.GenerateRequest(prompt="hi")) == "hi"
    chat = router_pb2.GenerateRequest(messages=[common_pb2.ChatMessage(role="system", content="Be brief."),
                                                common_pb2.ChatMessage(role="user", content="Hi")])
    assert text_for_prediction(chat) == "Be brief.\nHi"
    assert text_for_prediction(router_pb2.GenerateRequest(prompt_token_ids=[1, 2])) is None
