import copy
import json

import pytest

from bench import policies, report
from bench.metrics import counter_deltas, parse
from bench.stats import RequestRecord, summarize
from qllm.up import StackConfig


def _records(cls, n, ttft, tpot, tokens=5):
    out = []
    for i in range(n):
        sent = 0.1 * i
        times = [sent + ttft + k * tpot for k in range(tokens)]
        out.append(RequestRecord(i, cls, sent, 10, tokens, sent_s=sent, first_token_s=times[0],
                                 token_times_s=times, finished_s=times[-1], finish_reason="length"))
    return out


def _doc():
    floor = _records("LS", 5, 0.02, 0.005)
    fcfs = _records("LS", 10, 0.2, 0.01) + _records("BE", 5, 0.5, 0.03, tokens=20)
    qllm = _records("LS", 10, 0.03, 0.01) + _records("BE", 5, 0.6, 0.03, tokens=20)
    slos = {"LS": {"ttft_ms": 100.0}}
    floor_doc = {"policy": "fcfs", **summarize(floor, slos, classes=("LS",))}
    runs = [{"policy": "fcfs", **summarize(fcfs, slos)}, {"policy": "qllm", **summarize(qllm, slos)}]
    doc = {"scenario": "mixed", "params": {"duration_s": 1, "slo": slos, "floor": floor_doc}, "runs": runs,
           "comparisons": report.comparisons(runs, floor_doc)}
    return doc, {"fcfs": fcfs, "qllm": qllm}, floor


def test_schema_accepts_a_real_document():
    doc, _, _ = _doc()
    report.validate(doc)
    run = doc["runs"][0]
    assert set(run["classes"]) == {"LS", "BE"}
    ls = run["classes"]["LS"]
    for key in ("count", "errors", "ttft_ms", "tpot_ms", "e2e_ms", "slo_attainment", "output_tok_s"):
        assert key in ls
    assert set(ls["ttft_ms"]) >= {"p50", "p90", "p99", "mean"}
    assert isinstance(run["total_output_tok_s"], float)
    json.loads(json.dumps(doc, allow_nan=False))


@pytest.mark.parametrize("mutate, where", [
    (lambda d: d.pop("scenario"), "$.scenario"),
    (lambda d: d.update(runs=[]), "$.runs"),
    (lambda d: d["runs"][0].pop("policy"), "policy"),
    (lambda d: d["runs"][0]["classes"]["LS"].pop("errors"), "LS.errors"),
    (lambda d: d["runs"][0]["classes"]["LS"]["ttft_ms"].pop("p99"), "ttft_ms.p99"),
    (lambda d: d["runs"][0]["classes"]["LS"].update(count="3"), "LS.count"),
    (lambda d: d["runs"][0]["classes"]["LS"].update(slo_attainment=1.5), "slo_attainment"),
    (lambda d: d["runs"][0]["classes"]["LS"]["e2e_ms"].update(p50=float("nan")), "e2e_ms.p50"),
    (lambda d: d["runs"][0]["classes"].update(XX={}), "unknown class"),
    (lambda d: d["runs"][1].update(total_output_tok_s=None), "total_output_tok_s"),
    (lambda d: d["params"]["floor"]["classes"]["LS"].pop("tpot_ms"), "floor.classes.LS.tpot_ms"),
])
def test_schema_names_the_broken_field(mutate, where):
    doc, _, _ = _doc()
    bad = copy.deepcopy(doc)
    mutate(bad)
    with pytest.raises(report.SchemaError, match=where.replace("$", r"\$").replace("[", r"\[")):
        report.validate(bad)


def test_comparisons_markdown_and_plots(tmp_path):
    doc, records, floor = _doc()
    rows = {r["policy"]: r for r in doc["comparisons"]["rows"]}
    assert doc["comparisons"]["baseline"] == "fcfs"
    assert rows["fcfs"]["ls_ttft_p50_vs_baseline"] == pytest.approx(1.0)
    assert rows["qllm"]["ls_ttft_p50_vs_baseline"] == pytest.approx(0.15)
    assert rows["fcfs"]["ls_ttft_p50_vs_floor"] == pytest.approx(10.0)
    md = report.markdown(doc)
    assert "| idle floor (fcfs) | LS | 5 |" in md and "| qllm | BE | 5 |" in md and "SLO" in md
    written = report.write(tmp_path, "mixed", doc, records, floor)
    names = sorted(p.name for p in written)
    assert names == ["mixed-ttft-cdf.png", "mixed.json", "mixed.md", "mixed.requests.jsonl"]
    assert (tmp_path / "mixed-ttft-cdf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "mixed.json").read_text())["runs"][1]["policy"] == "qllm"
    lines = (tmp_path / "mixed.requests.jsonl").read_text().splitlines()
    assert len(lines) == 5 + 15 + 15 and json.loads(lines[0])["run"] == "idle floor"


def test_sweep_plot(tmp_path):
    doc, records, _ = _doc()
    runs = []
    for rate in (0.5, 1.0):
        for r in doc["runs"]:
            runs.append({**copy.deepcopy(r), "sweep": {"be-rate": rate}})
    doc["runs"] = runs
    doc["comparisons"] = report.comparisons(runs, doc["params"]["floor"])
    assert len(doc["comparisons"]["rows"]) == 4
    written = report.write(tmp_path, "mixed", doc, records, sweep_key="be-rate", save_requests=False)
    assert (tmp_path / "mixed-sweep.png").is_file() and len(written) == 4
    assert "be-rate=0.5" in report.markdown(doc)


def test_policy_mapping():
    assert StackConfig().policy == "qllm"  # the default of `qllm up`
    base = StackConfig(port_offset=7, worker_args=["--x", "1"], policy="priority-evict")
    for name in ("fcfs", "priority", "qllm"):
        cfg = policies.apply(name, base)
        assert cfg.policy == name and cfg.port_offset == 7 and cfg.worker_args == ["--x", "1"]
    assert base.policy == "priority-evict"  # not mutated
    assert policies.apply("qllm-no-pacing", base).worker_args == ["--x", "1", "--ls-tpot-target-ms", "0"]
    assert policies.parse_list("fcfs, qllm") == ["fcfs", "qllm"]
    with pytest.raises(policies.UnknownPolicy) as err:
        policies.parse_list("fcfs,lifo")
    assert "'lifo'" in str(err.value) and "known: fcfs, priority, qllm" in str(err.value)
    with pytest.raises(policies.UnknownPolicy, match="twice"):
        policies.parse_list("fcfs,fcfs")
    with pytest.raises(policies.UnknownPolicy, match="worker policy twice"):
        policies.apply("fcfs+qllm", base)


def test_policy_parts_compose(monkeypatch):
    monkeypatch.setitem(policies.POLICIES, "ltr", policies.Part("router order", router_args=("--be-order", "ltr")))
    cfg = policies.apply("qllm+ltr", StackConfig(router_args=["--y"]))
    assert cfg.policy == "qllm" and cfg.router_args == ["--y", "--be-order", "ltr"]
    assert policies.describe("qllm+ltr")["router_args"] == ["--be-order", "ltr"]


def test_prometheus_deltas():
    before = parse('# HELP x\nqllm_worker_preemptions_total{kind="layer"} 2.0\nqllm_worker_running_requests 3\n')
    after = parse('qllm_worker_preemptions_total{kind="layer"} 7.0\nqllm_worker_running_requests 1\n'
                  'qllm_worker_ttft_seconds_sum{priority="LS"} 1.5\nqllm_worker_ttft_seconds_count{priority="LS"} 3\n'
                  'qllm_worker_ttft_seconds_bucket{priority="LS",le="0.1"} 2\npython_gc_objects_collected_total 9\n'
                  'qllm_worker_preemptions_created{kind="layer"} 1.7e9\n')
    assert counter_deltas(before, after) == {
        'qllm_worker_preemptions_total{kind="layer"}': 5.0,
        'qllm_worker_ttft_seconds_count{priority="LS"}': 3.0,
        'qllm_worker_ttft_seconds_sum{priority="LS"}': 1.5,
    }


def test_ratios_over_rounds_are_median_min_max_of_each_rounds_ratio():
    def round_comp(qllm_ttft, qllm_be):
        rows = [{"policy": "fcfs", **{k: 1.0 for k in report.RATIO_KEYS}},
                {"policy": "qllm", **{k: None for k in report.RATIO_KEYS},
                 "ls_ttft_p50_vs_baseline": qllm_ttft, "be_output_tok_s_vs_baseline": qllm_be}]
        return {"baseline": "fcfs", "rows": rows}

    comp = report.comparisons_over_rounds([round_comp(0.1, 0.8), round_comp(0.3, None), round_comp(0.2, 0.6)])
    assert comp["baseline"] == "fcfs" and comp["rounds"] == 3
    qllm = comp["rows"][1]
    assert qllm["policy"] == "qllm"
    assert qllm["ls_ttft_p50_vs_baseline"] == {"median": 0.2, "min": 0.1, "max": 0.3, "n": 3}
    # a round without the figure does not count: median of the two that have it
    assert qllm["be_output_tok_s_vs_baseline"] == {"median": pytest.approx(0.7), "min": 0.6, "max": 0.8, "n": 2}
    assert qllm["ls_ttft_p99_vs_floor"] is None
    assert report._ratio_cell(qllm["ls_ttft_p50_vs_baseline"]) == "0.20 (0.10-0.30)"
    assert report._ratio_cell(None) == "–" and report._ratio_cell(1.234) == "1.23"


def test_sweep_plot_shows_the_spread_over_rounds(tmp_path):
    """With --repeat and --sweep, each point is the median over rounds with min-max bars, not round 1 alone."""
    def run(policy, rnd, rate, be_tok_s, slo):
        return {"policy": policy, "round": rnd, "sweep": {"be-rate": rate},
                "classes": {"LS": {"slo_attainment": slo}, "BE": {"output_tok_s": be_tok_s}}}
    doc = {"scenario": "mixed", "runs": [run("qllm", 1, 1.0, 10.0, 0.9), run("qllm", 2, 1.0, 14.0, 1.0),
                                         run("qllm", 3, 1.0, 11.0, 0.8), run("qllm", 1, 2.0, 20.0, 0.5),
                                         run("qllm", 2, 2.0, 22.0, None), run("fcfs", 1, 1.0, 9.0, 0.1)]}
    xs, med, lo, hi = report.sweep_series(doc, "be-rate", "qllm", lambda r: report._get(r, "BE", "output_tok_s"))
    assert (xs, med, lo, hi) == ([1.0, 2.0], [11.0, 21.0], [10.0, 20.0], [14.0, 22.0])
    xs, med, lo, hi = report.sweep_series(doc, "be-rate", "qllm", lambda r: report._get(r, "LS", "slo_attainment"))
    assert (xs, med) == ([1.0, 2.0], [0.9, 0.5])  # a round without the figure is left out, not counted as 0
    report.plot_sweep(tmp_path / "sweep.png", doc, "be-rate")
    assert (tmp_path / "sweep.png").stat().st_size > 0
