import pytest

from predictor.limits import InvalidInput, Limits
from predictor.ranker import HeuristicRanker, load_ranker


def test_heuristic_orders_obvious_cases():
    r = HeuristicRanker()
    short, mid, long = r.score([
        "Answer yes or no: is Paris in France?",
        "What is the capital of France?",
        "Write a detailed 2000 words essay explaining the causes of World War I, step by step.",
    ])
    assert short < mid < long


def test_heuristic_one_score_per_prompt():
    r = HeuristicRanker()
    prompts = ["", "hi", "x " * 10_000]
    scores = r.score(prompts)
    assert len(scores) == 3 and all(isinstance(s, float) for s in scores)
    assert r.score([]) == []


def test_load_ranker_heuristic_forced():
    assert load_ranker("heuristic").name == "heuristic"


def test_load_ranker_missing_artefact():
    assert load_ranker("/nonexistent/head.pt").name == "heuristic"
    with pytest.raises((FileNotFoundError, ImportError, OSError)):
        load_ranker("/nonexistent/head.pt", required=True)


def test_limits_name_the_field():
    limits = Limits(max_prompts=2, max_prompt_chars=5)
    limits.check_prompts(["abc", "abcde"])
    with pytest.raises(InvalidInput, match="prompts: 3 prompts"):
        limits.check_prompts(["a", "b", "c"])
    with pytest.raises(InvalidInput) as err:
        limits.check_prompts(["a", "abcdef"])
    assert err.value.field == "prompts[1]"
