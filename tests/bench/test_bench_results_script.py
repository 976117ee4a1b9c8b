"""scripts/bench_results.py (`make bench-results`): it reruns exactly the results the docs hold, with flags
`qllm bench` takes."""

import importlib.util
from pathlib import Path

import pytest

from qllm.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("bench_results", REPO / "scripts" / "bench_results.py")
bench_results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_results)


def test_every_result_it_regenerates_is_one_the_docs_hold_and_its_flags_parse(tmp_path):
    todo = bench_results.commands(None, None, tmp_path)
    assert [name for name, _, _ in todo] == [b[0] for b in bench_results.BENCH]
    for name, written, argv in todo:
        assert (REPO / "docs" / "results" / f"{name}.json").is_file(), name
        assert written.parent == tmp_path / name
        assert argv[1] == "bench" and "--summary-only" in argv and "--repeat" in argv
        bench_argv = argv[1:]
        parser, _ = build_parser(bench_argv)
        args = parser.parse_args(bench_argv)
        assert args.repeat == 3 and args.out == str(tmp_path / name)
        assert written.name == f"{args.scenario}.json"


def test_the_peer_run_only_with_a_venv_and_unknown_names_are_refused(tmp_path, capsys):
    assert [n for n, _, _ in bench_results.commands({"chatbot", "peer-vllm-fp32"}, None, tmp_path)] == ["chatbot"]
    todo = bench_results.commands({"peer-vllm-fp32"}, "/venv", tmp_path)
    assert len(todo) == 1 and "--peer-venv" in todo[0][2] and "/venv" in todo[0][2]
    peers = bench_results.commands(None, "/venv", tmp_path)[len(bench_results.BENCH):]
    assert [(n, argv[argv.index("--dtypes") + 1]) for n, _, argv in peers] == [
        ("peer-vllm-fp32", "float32"), ("peer-vllm-bf16", "bfloat16")]
    for name, _, _ in peers:
        assert (REPO / "docs" / "results" / f"{name}.json").is_file(), name
    with pytest.raises(SystemExit):
        bench_results.main(["--only", "nonsense", "--dry-run"])
    assert "unknown result(s) nonsense" in capsys.readouterr().err
    assert bench_results.main(["--only", "make-bench", "--dry-run", "--out", str(tmp_path)]) == 0
    assert "--be-rate 1.5 --repeat 3 --summary-only" in capsys.readouterr().out
