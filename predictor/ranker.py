"""Length rankers: score prompts so that the order of scores follows the order of output lengths.

Only the order matters (vllm-ltr: learning to rank). A larger score means a longer predicted output.

- `HeuristicRanker`: prompt features only (asks for an essay/code/list -> long; asks for a word, a yes/no,
  a translation -> short; longer prompts a little longer). No torch; used when no trained head is present.
- `TrainedRanker` (predictor/trained.py): a frozen sentence encoder with a small MLP head trained with
  ListMLE; loaded by `load_ranker()` when its artefact and encoder package are installed.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod

from predictor.calibration import DEFAULT as DEFAULT_CALIBRATION, Calibration


class LengthRanker(ABC):
    name: str = ""
    #: True when score() runs torch (the server then calls it off the event loop).
    uses_torch: bool = False
    #: maps this ranker's scores to predicted output tokens (EstimateTime)
    calibration: Calibration = DEFAULT_CALIBRATION

    @abstractmethod
    def score(self, prompts: list[str]) -> list[float]:
        """One score per prompt, in order; larger = longer predicted output."""


# (pattern, weight): cues in the prompt that move the predicted output length up or down.
_CUES: list[tuple[re.Pattern[str], float]] = [(re.compile(p), w) for p, w in [
    (r"\b(essay|article|blog post|story|report|guide|tutorial|outline|cover letter|proposal|script|"
     r"lesson plan|curriculum|chapter)\b", 1.2),
    (r"\b(write|generate|create|draft|compose|design|develop|implement|build)\b", 0.6),
    (r"\b(code|function|class|program|app|api|sql|python|javascript|java|react|html|css)\b", 0.5),
    (r"\b(explain|describe|compare|discuss|elaborate|analy[sz]e|step[- ]by[- ]step|in detail|detailed|"
     r"comprehensive)\b", 0.5),
    (r"\b(list|ideas|examples|ways|tips|steps|plan|strategies)\b", 0.4),
    (r"\b\d+\s*(words|paragraphs|pages|points|items|ideas|examples|questions)\b", 0.4),
    (r"\b(yes or no|true or false|one word|single word|one sentence|briefly|in short|short answer|tl;?dr)\b",
     -1.2),
    (r"\b(translate|rephrase|paraphrase|correct|fix the grammar|proofread|rewrite this sentence)\b", -0.6),
    (r"\b(what is|who is|when did|when was|where is|how many|how much|which)\b", -0.3),
    (r"\b(hi|hello|hey|thanks|thank you)\b[.!?]*$", -1.0),
    (r"\b(summari[sz]e|summary|tl;dr)\b", -0.3),
]]


_HEAD, _TAIL = 1500, 500  # the instruction is usually at the start or the end of a long prompt


def heuristic_score(prompt: str) -> float:
    words = len(prompt.split())
    if len(prompt) > _HEAD + _TAIL:
        prompt = prompt[:_HEAD] + "\n" + prompt[-_TAIL:]
    prompt = prompt.lower()
    # Output length grows weakly with prompt length (Spearman ~0.18 on ShareGPT), saturating.
    score = 0.35 * math.log1p(words)
    for pattern, weight in _CUES:
        if pattern.search(prompt):
            score += weight
    if prompt.rstrip().endswith("?") and words < 15:
        score -= 0.3
    return score


class HeuristicRanker(LengthRanker):
    name = "heuristic"
    uses_torch = False

    def __init__(self, calibration: Calibration | None = None):
        if calibration is not None:
            self.calibration = calibration

    @classmethod
    def with_shipped_calibration(cls) -> "HeuristicRanker":
        """The heuristic with the calibration fitted for it in training, when the artefact has one."""
        try:
            from predictor.trained import read_config

            return cls(Calibration.from_dict(read_config()["heuristic_calibration"]))
        except (OSError, KeyError, ValueError):
            return cls()

    def score(self, prompts: list[str]) -> list[float]:
        return [heuristic_score(p) for p in prompts]


def load_ranker(artefact: str | None = None, *, required: bool = False) -> LengthRanker:
    """The trained ranker when its artefact and encoder are available, else the heuristic (with a warning).

    `artefact` None = the shipped one; "heuristic" forces the heuristic. With required=True a missing
    artefact or encoder raises instead of falling back.
    """
    from qllm.logs import get_logger

    log = get_logger(__name__)
    if artefact == "heuristic":
        return HeuristicRanker.with_shipped_calibration()
    try:
        from predictor.trained import TrainedRanker

        return TrainedRanker.load(artefact)
    except (ImportError, FileNotFoundError, OSError) as exc:
        if required:
            raise
        log.warning("trained ranker unavailable; using the heuristic ranker", error=str(exc))
        return HeuristicRanker.with_shipped_calibration()
