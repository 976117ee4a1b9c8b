"""Per-request records and the figures computed from them (pure; no I/O).

Definitions (the ones vLLM's benchmark_serving uses):
- TTFT: first output token received - request sent.
- TPOT: (last token - first token) / (output tokens - 1), for requests with at least two tokens.
- E2E: last message received - request sent.
- Percentiles interpolate linearly between closest ranks (numpy's default method).

Which requests count where: `count` is every request the workload sent. TTFT is over requests that got a
first token (also those cancelled later) and over those the bench cancelled before their first token, which
count at their cancel time (arrival to when the bench gave up: a lower bound of their TTFT). Leaving them out
would flatter the policy that starves them. `without_first_token` counts the requests that never got a token
(cancelled or failed); a failed request without a token is not in TTFT (it says nothing about waiting).
TPOT and E2E are over completed requests. A request that failed or was
cancelled at the drain cap is in `errors` / `cancelled` and never meets an SLO, so SLO attainment is over
`count`, not over the requests that happened to finish.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    index: int
    cls: str
    arrival_s: float  # scheduled offset
    prompt_tokens: int  # as the workload measured it
    max_tokens: int
    sent_s: float | None = None
    first_token_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)  # one entry per output token
    finished_s: float | None = None
    finish_reason: str = ""
    error: str = ""  # empty = no error
    cancelled: bool = False  # cancelled by the harness at the drain cap
    server_prompt_tokens: int | None = None

    @property
    def output_tokens(self) -> int:
        return len(self.token_times_s)

    @property
    def completed(self) -> bool:
        return self.finished_s is not None and not self.error and not self.cancelled

    @property
    def ttft_s(self) -> float | None:
        if self.sent_s is None or self.first_token_s is None:
            return None
        return self.first_token_s - self.sent_s

    @property
    def ttft_or_cancel_s(self) -> float | None:
        """TTFT; for a request the bench cancelled before its first token, the time from its arrival (its send,
        where it was sent) to the cancel: what the TTFT percentiles count."""
        if self.first_token_s is not None:
            return self.ttft_s
        if not self.cancelled or self.error or self.finished_s is None:
            return None
        start = self.sent_s if self.sent_s is not None else self.arrival_s
        return max(0.0, self.finished_s - start)

    @property
    def tpot_s(self) -> float | None:
        if not self.completed or self.output_tokens < 2:
            return None
        return (self.token_times_s[-1] - self.token_times_s[0]) / (self.output_tokens - 1)

    @property
    def e2e_s(self) -> float | None:
        if not self.completed or self.sent_s is None:
            return None
        return self.finished_s - self.sent_s

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ttft_s"], d["tpot_s"], d["e2e_s"] = self.ttft_s, self.tpot_s, self.e2e_s
        return d


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation between closest ranks; NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside 0..100")
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def distribution_ms(values_s: Iterable[float]) -> dict:
    """{"p50","p90","p99","mean"} in ms; None where there are no values (JSON has no NaN)."""
    ms = [v * 1000.0 for v in values_s]
    out: dict = {f"p{q}": (percentile(ms, q) if ms else None) for q in PERCENTILES}
    out["mean"] = sum(ms) / len(ms) if ms else None
    return out


def measured_window_s(records: Sequence[RequestRecord]) -> float:
    """From the first send to the last event of the run (finish, or cancel)."""
    sent = [r.sent_s for r in records if r.sent_s is not None]
    ends = [r.finished_s for r in records if r.finished_s is not None]
    ends += [r.token_times_s[-1] for r in records if r.token_times_s]
    if not sent or not ends:
        return 0.0
    return max(ends) - min(sent)


def class_summary(records: Sequence[RequestRecord], window_s: float, ttft_slo_ms: float | None = None,
                  tpot_slo_ms: float | None = None) -> dict:
    """Figures for one class. A request meets the SLO when it completed and its TTFT (and TPOT, where an
    SLO is given and the request has one) are within it. None where there is no SLO."""
    ttft = [r.ttft_or_cancel_s for r in records if r.ttft_or_cancel_s is not None]
    tpot = [r.tpot_s for r in records if r.tpot_s is not None]
    e2e = [r.e2e_s for r in records if r.e2e_s is not None]
    out_tokens = sum(r.output_tokens for r in records)
    attainment = None
    if (ttft_slo_ms is not None or tpot_slo_ms is not None) and records:
        met = 0
        for r in records:
            ok = r.completed
            if ok and ttft_slo_ms is not None:
                ok = r.ttft_s is not None and r.ttft_s * 1000.0 <= ttft_slo_ms
            if ok and tpot_slo_ms is not None and r.tpot_s is not None:
                ok = r.tpot_s * 1000.0 <= tpot_slo_ms
            met += ok
        attainment = met / len(records)
    return {
        "count": len(records),
        "completed": sum(r.completed for r in records),
        "errors": sum(bool(r.error) for r in records),
        "cancelled": sum(r.cancelled for r in records),
        "without_first_token": sum(r.ttft_s is None for r in records),
        "ttft_ms": distribution_ms(ttft),
        "tpot_ms": distribution_ms(tpot),
        "e2e_ms": distribution_ms(e2e),
        "slo_attainment": attainment,
        "output_tokens": out_tokens,
        "output_tok_s": out_tokens / window_s if window_s > 0 else 0.0,
    }


def summarize(records: Sequence[RequestRecord], slos: dict[str, dict] | None = None,
              classes: Sequence[str] = ("LS", "BE")) -> dict:
    """{"classes": {cls: class_summary}, "total_output_tok_s", "window_s"} over one run.
    `slos`: {cls: {"ttft_ms": .., "tpot_ms": ..}}."""
    window = measured_window_s(records)
    slos = slos or {}
    out = {}
    for cls in classes:
        recs = [r for r in records if r.cls == cls]
        if not recs:
            continue
        s = slos.get(cls, {})
        out[cls] = class_summary(recs, window, s.get("ttft_ms"), s.get("tpot_ms"))
    total_tokens = sum(r.output_tokens for r in records)
    return {"classes": out, "total_output_tok_s": total_tokens / window if window > 0 else 0.0,
            "window_s": window}
