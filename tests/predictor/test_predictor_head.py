import numpy as np
import pytest
import torch

from predictor import data
from predictor.features import NAMES, LexicalScorer, features, hashed_ngrams, ngram_rows
from predictor.head import PoolHead, listmle_loss


def test_listmle_prefers_the_true_order():
    lengths = torch.tensor([[10.0, 50.0, 20.0, 400.0]])
    right = listmle_loss(torch.log(lengths), lengths)
    wrong = listmle_loss(-torch.log(lengths), lengths)
    assert right < wrong
    # only the order of scores matters for the target, not the lengths' scale
    assert listmle_loss(torch.log(lengths), lengths * 7).item() == pytest.approx(right.item(), rel=1e-3)


def test_pool_head_shapes_and_padding_invariance():
    torch.manual_seed(0)
    head = PoolHead(dim=16, n_features=len(NAMES), heads=2, att_hidden=8, hidden=8).eval()
    states = torch.randn(3, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    feats = torch.from_numpy(features(["a", "b c?", "def f(x): return x\n"]))
    out = head(states, mask, feats)
    assert out.shape == (3,)
    noisy = states.clone()
    noisy[~mask] = 1e3  # whatever sits in the padding does not change the score
    assert torch.allclose(head(noisy, mask, feats), out, atol=1e-5)
    assert PoolHead(dim=16, n_features=len(NAMES), heads=2, out_dim=10)(states, mask, feats).shape == (3, 10)


def test_features():
    f = features(["Hello?", "x = {1: 2}\n" * 50, ""])
    assert f.shape == (3, len(NAMES)) and np.isfinite(f).all()
    assert f[0, NAMES.index("ends_question")] == 1.0
    assert f[1, NAMES.index("code_frac")] > f[0, NAMES.index("code_frac")]


def test_hashed_ngrams_and_lexical_scorer_agree():
    bodies = [[5, 6, 7, 5, 6], [], [9]]
    grams = hashed_ngrams(bodies[0], 8)
    # unigrams 5, 6, 7 and bigrams (5,6), (6,7), (7,5); the repeated (5,6) counts once
    assert len(grams) == 6 and np.all(np.diff(grams) > 0) and grams.max() < 256
    assert len(hashed_ngrams([], 8)) == 0
    rng = np.random.default_rng(0)
    weight = rng.normal(size=256)
    scorer = LexicalScorer(weight, 0.5, 8)
    rows, cols, vals = ngram_rows(bodies, 8)
    dense = np.zeros((3, 256))
    np.add.at(dense, (rows, cols), vals)
    assert np.allclose(np.linalg.norm(dense[[0, 2]], axis=1), 1.0)  # L2-normalised rows, the empty one is zero
    assert np.allclose(scorer.score(bodies), dense @ weight + 0.5)
    assert scorer.score([[]])[0] == 0.5
    with pytest.raises(ValueError):
        LexicalScorer(np.zeros(10), 0.0, 8)


def test_dedupe_and_split_keep_prompts_apart():
    ex = [data.Example("sharegpt", f"prompt {i}", float(i)) for i in range(100)]
    ex += [data.Example("sharegpt", "Prompt  1 ", 9.0)]  # a duplicate after normalising
    ex += [data.Example("alpaca", "prompt 3", 5.0), data.Example("alpaca", "another", 5.0)]
    s = data.split(ex, seed=0, test_frac=0.2, val_frac=0.1)
    keys = lambda xs: {e.key for e in xs}  # noqa: E731
    assert not keys(s.train) & keys(s.test) and not keys(s.train) & keys(s.val) and not keys(s.val) & keys(s.test)
    assert len(s.test) == 20 and len(s.val) == 10 and all(e.source == "sharegpt" for e in s.test)
    assert sum(e.key == "prompt 1" for e in s.train + s.val + s.test) == 1
    assert "another" in keys(s.train)
    assert data.split(ex, seed=0, test_frac=0.2, val_frac=0.1).test == s.test  # fixed seed, same split


def test_real_split_has_no_prompt_on_both_sides():
    try:
        root = data.data_dir()
    except FileNotFoundError:
        pytest.skip("shared/data not found")
    s = data.load_split(root)
    train = {e.key for e in s.train}
    assert not train & {e.key for e in s.test} and not train & {e.key for e in s.val}
    assert len(s.test) > 1000 and {e.source for e in s.train} == {"sharegpt", "alpaca", "arena", "hh"}
