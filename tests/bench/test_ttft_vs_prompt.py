"""scripts/ttft_vs_prompt.py: the floor's TTFT fitted against prompt length, and what it says of a loaded run."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("ttft_vs_prompt", REPO / "scripts" / "ttft_vs_prompt.py")
ttft_vs_prompt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ttft_vs_prompt)


def _row(run, prompt, arrival, ttft_ms, cls="LS"):
    return {"run": run, "cls": cls, "arrival_s": arrival, "sent_s": arrival, "prompt_tokens": prompt,
            "first_token_s": arrival + ttft_ms / 1e3, "token_times_s": [0.0]}


def test_the_fit_for_the_loaded_prompts_and_the_excess_over_it(tmp_path, capsys):
    # the floor: 20 ms + 0.5 ms a prompt token, exactly; the loaded run: the same law, one request 40 ms late
    rows = [_row("idle floor r1", n, i, 20 + 0.5 * n) for i, n in enumerate((32, 48, 64, 80, 96))]
    rows += [_row("qllm r1", n, 10 + i, 20 + 0.5 * n) for i, n in enumerate((40, 60, 128))]
    rows.append(_row("qllm r1", 64, 10.05, 20 + 0.5 * 64 + 40))
    rows.append(_row("qllm r1", 1024, 10.0, 5000, cls="BE"))  # BE rows are not LS TTFTs
    log = tmp_path / "mixed.requests.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    extract = tmp_path / "ls.jsonl"
    argv, sys.argv = sys.argv, ["ttft_vs_prompt.py", str(log), "--extract", str(extract)]
    try:
        ttft_vs_prompt.main()
    finally:
        sys.argv = argv
    out = capsys.readouterr().out
    assert "r1: floor 5 requests, TTFT p50 52.0 ms" in out
    assert "fit 20.0 ms + 0.500 ms per prompt token" in out
    # percentiles as the bench's (interpolated between ranks): the late request and the 128-token prompt
    assert "TTFT p50 67.0 ms, p99 91.8 ms = 1.76x the floor's p50" in out
    assert "the fit for the same prompts: p99 83.0 ms = 1.60x the floor's p50" in out
    assert "excess over the fit: p50 +0.0, p90 +28.0, p99 +38.8 ms" in out
    assert "slow: TTFT 92 ms, prompt 64, fit 52 ms" in out and "[(50, 40)]" in out
    extracted = [json.loads(line) for line in extract.read_text().splitlines()]
    assert len(extracted) == 9 and set(extracted[0]) == set(ttft_vs_prompt.FIELDS)


def test_a_late_send_is_not_time_to_first_token():
    # the bench's TTFT runs from the send, as bench/stats.py's RequestRecord.ttft_s
    row = _row("qllm", 64, 10.0, 50)
    row["sent_s"] = 10.02
    assert ttft_vs_prompt.ttft_ms(row) == pytest.approx(30.0)
    assert ttft_vs_prompt.ttft_ms({**row, "sent_s": None}) is None


def test_rounds_are_read_from_run_names():
    assert ttft_vs_prompt.round_of("idle floor r2") == "r2"
    assert ttft_vs_prompt.round_of("qllm r10") == "r10"
    assert ttft_vs_prompt.round_of("qllm") == "" and ttft_vs_prompt.round_of("idle floor") == ""
