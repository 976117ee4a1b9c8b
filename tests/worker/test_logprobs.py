"""Logprobs against transformers: in fp32 each generated token's logprob and top alternatives equal
log_softmax of the Hugging Face model's own logits for the same sequence, within 1e-4."""

import torch

from worker.engine_core import EngineConfig, EngineCore
from worker.request import Request, SamplingParams

TOLERANCE = 1e-4


def run_collecting_logprobs(runner, reqs, budget=48):
    """Through EngineCore.step(), keeping each streamed token's logprobs per request."""
    core = EngineCore(runner, EngineConfig(max_num_batched_tokens=budget, block_size=runner.block_size,
                                           kv_budget_tokens=runner.cache.num_blocks * runner.block_size))
    got = {r.request_id: [] for r in reqs}
    for out in core.run_to_completion(reqs):
        got[out.request_id].extend(out.logprobs or [])
    return got


def test_logprobs_equal_log_softmax_of_transformers_logits(loaded, make_runner, reference_model):
    tok = loaded.tokenizer
    prompts = [tok.encode(p) for p in ("The router sends each token to two experts",
                                       "Mixture of experts " * 12, "Hello")]
    reqs = [Request("greedy", prompts[0], SamplingParams(max_tokens=10, ignore_eos=True, logprobs=True,
                                                         top_logprobs=5)),
            Request("sampled", prompts[1], SamplingParams(max_tokens=10, ignore_eos=True, temperature=1.3, seed=5,
                                                          top_p=0.9, logprobs=True, top_logprobs=20)),
            Request("plain", prompts[2], SamplingParams(max_tokens=10, ignore_eos=True))]
    got = run_collecting_logprobs(make_runner(), reqs)   # chunked prefills batched with decodes
    assert got["plain"] == []
    worst = 0.0
    for r in reqs[:2]:
        entries = got[r.request_id]
        assert [e.token_id for e in entries] == r.output_token_ids
        full = torch.tensor([r.prompt_token_ids + r.output_token_ids])
        with torch.inference_mode():
            logits = reference_model(full.to(reference_model.device)).logits[0].float().cpu()
        ref = torch.log_softmax(logits, dim=-1)
        for i, e in enumerate(entries):
            row = ref[r.num_prompt_tokens - 1 + i]
            worst = max(worst, abs(e.logprob - row[e.token_id].item()))
            top_lp, top_ids = row.topk(r.sampling.top_logprobs)
            assert [t for t, _ in e.top] == top_ids.tolist()
            worst = max(worst, max(abs(lp - ref_lp) for (_, lp), ref_lp in zip(e.top, top_lp.tolist())))
            # Its rank among the vocabulary (tokens within the tolerance of it may rank either way).
            x = row[e.token_id]
            assert int((row > x + TOLERANCE).sum()) + 1 <= e.rank <= int((row > x - TOLERANCE).sum()) + 1
    print(f"largest |logprob - transformers log_softmax| = {worst:.2e}")
    assert worst < TOLERANCE


def test_no_request_asks_no_logprobs_work(loaded, make_runner):
    reqs = [Request(f"r{i}", loaded.tokenizer.encode("batch job " * (i + 1)), SamplingParams(max_tokens=4,
                                                                                               ignore_eos=True))
            for i in range(3)]
    runner = make_runner()
    finish, results = runner.finish, []
    runner.finish = lambda state: results.append(finish(state)) or results[-1]
    got = run_collecting_logprobs(runner, reqs)
    assert all(v == [] for v in got.values())
    assert results and all(r.logprobs == {} for r in results)


def test_beam_logprobs_are_the_best_hypothesis_tokens_under_transformers(loaded, make_runner, reference_model):
    """With beam search the logprobs are those of the best hypothesis' tokens, each under the beam it extended
    (i.e. its own prefix): log_softmax of transformers' logits for that sequence; they sum to its score."""
    from worker import beam as beam_mod

    tok = loaded.tokenizer
    ids = tok.encode("The router sends each token to two experts")
    sp = SamplingParams(max_tokens=8, num_beams=3, ignore_eos=True, logprobs=True, top_logprobs=4)
    req = Request("beam", ids, sp)
    req.beam = beam_mod.BeamSearch(3, 1.0, 1.0, 8, len(ids), 16, frozenset(), logprobs=True, top_logprobs=4)
    run_collecting_logprobs(make_runner(), [req])
    best = req.beam.best()
    assert best.tokens == req.output_token_ids and [e.token_id for e in best.logprobs] == best.tokens
    assert abs(sum(e.logprob for e in best.logprobs) - best.sum_logprobs) < TOLERANCE
    with torch.inference_mode():
        logits = reference_model(torch.tensor([ids + best.tokens]).to(reference_model.device)).logits[0]
    ref = torch.log_softmax(logits.float().cpu(), dim=-1)
    worst = 0.0
    for i, e in enumerate(best.logprobs):
        row = ref[len(ids) - 1 + i]
        worst = max(worst, abs(e.logprob - row[e.token_id].item()))
        top_lp, top_ids = row.topk(4)
        assert [t for t, _ in e.top] == top_ids.tolist()
        worst = max(worst, max(abs(lp - r) for (_, lp), r in zip(e.top, top_lp.tolist())))
    print(f"beam: largest |logprob - transformers log_softmax| = {worst:.2e}")
    assert worst < TOLERANCE
