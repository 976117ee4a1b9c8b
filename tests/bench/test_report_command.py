"""`qllm bench report`: the tables in docs/ are what the committed result JSONs give, and --update / --check
keep them so."""

import json
import shutil
from pathlib import Path

import pytest

import bench.cli as bench_cli
from bench import report_command
from qllm.cli import build_parser

DOCS = Path(__file__).resolve().parents[2] / "docs"
RESULTS = sorted((DOCS / "results").glob("*.json"))


def _args(argv):
    parser, _ = build_parser(["bench", *argv])
    return parser.parse_args(["bench", *argv])


def test_there_are_committed_results():
    assert RESULTS


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.name)
def test_docs_hold_the_generated_tables_of_every_committed_result(path):
    """Each docs/results/*.json has a marked block in a docs Markdown file, and the block is exactly what
    `qllm bench report` makes of the JSON (so a hand edit or a changed JSON fails here)."""
    found = []
    for md in DOCS.rglob("*.md"):
        for rel, body in report_command.blocks(md.read_text()).items():
            if (md.parent / rel).resolve() == path.resolve():
                found.append(md)
                assert body == report_command.block_body(path), (
                    f"{md}: the block of {rel} is stale; run `qllm bench report --update {md}`")
    assert found, f"no <!-- bench-report: .../{path.name} --> block in docs/"


def test_update_rewrites_a_stale_block_and_check_says_so(tmp_path, capsys):
    src = RESULTS[0]
    shutil.copy(src, tmp_path / src.name)
    md = tmp_path / "doc.md"
    md.write_text(f"# Doc\n\nhand text\n\n<!-- bench-report: {src.name} -->\n| typed | by hand |\n"
                  "<!-- /bench-report -->\n\nafter\n")
    assert bench_cli.report_command.run(_args(["report", "--update", str(md), "--check"])) == 1
    assert "stale block(s) for " + src.name in capsys.readouterr().err
    assert "| typed | by hand |" in md.read_text()  # --check wrote nothing
    assert report_command.run(_args(["report", "--update", str(md)])) == 0
    text = md.read_text()
    assert text.startswith("# Doc\n\nhand text\n\n") and text.endswith("<!-- /bench-report -->\n\nafter\n")
    assert "| typed | by hand |" not in text
    assert report_command.blocks(text)[src.name] == report_command.block_body(tmp_path / src.name)
    assert report_command.run(_args(["report", "--update", str(md), "--check"])) == 0
    (tmp_path / src.name).unlink()
    assert report_command.run(_args(["report", "--update", str(md)])) == 2  # a block whose JSON is gone
    assert src.name in capsys.readouterr().err


async def test_report_renders_files_to_out(tmp_path):
    out = tmp_path / "tables.md"
    bench_docs = [p for p in RESULTS if "runs" in json.loads(p.read_text())]
    assert await bench_cli.run(_args(["report", *map(str, bench_docs), "--out", str(out)])) == 0
    text = out.read_text()
    for p in bench_docs:
        assert f"## `{p}`\n\n" + report_command.render_file(p) in text
    assert "| policy | class | n |" in text and "# Benchmark" not in text  # the title goes, the tables stay


async def test_report_refuses_what_it_cannot_render(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"scenario": "mixed"}))
    assert await bench_cli.run(_args(["report", str(bad)])) == 2
    assert "bad.json" in capsys.readouterr().err
    assert await bench_cli.run(_args(["report"])) == 2
    assert await bench_cli.run(_args(["report", str(bad), "--check"])) == 2


def _round_doc(values_by_round):
    """A two-policy `qllm bench` document whose LS TTFT p50 of `b` is values_by_round[i] x `a`'s."""
    def cls(ttft):
        return {"ttft_ms": {"p50": ttft, "p99": 2 * ttft}, "tpot_ms": {"p50": 10.0}, "e2e_ms": {"mean": 100.0 * ttft},
                "slo_attainment": 0.5}
    runs, rounds = [], []
    for i, v in enumerate(values_by_round, 1):
        runs += [{"policy": "a", "round": i, "classes": {"LS": cls(100.0)}},
                 {"policy": "b", "round": i, "classes": {"LS": cls(100.0 * v)}}]
        rows = [{"policy": "a", "ls_ttft_p50_vs_baseline": 1.0, "be_output_tok_s_vs_baseline": 1.0},
                {"policy": "b", "ls_ttft_p50_vs_baseline": v, "be_output_tok_s_vs_baseline": None}]
        rounds.append({"round": i, "floor": {"classes": {"LS": cls(50.0)}},
                       "comparisons": {"baseline": "a", "rows": rows}})
    return {"scenario": "mixed", "params": {"seed": 3, "git_commit": "abc1234", "repeat": len(rounds)},
            "runs": runs, "rounds": rounds, "comparisons": {"baseline": "a", "rows": [{"policy": "a"}, {"policy": "b"}]}}


def test_headline_inverts_each_round_before_summarising():
    from bench import headline

    text = headline.markdown([("results/x.json", _round_doc([2.0, 4.0]))])
    lines = text.splitlines()
    assert lines[0] == "| result | figure | median | range over rounds | each round |"
    # a / b per round is 0.5 and 0.25: the median of those (0.375), not 1 / the median of the ratios (1/3)
    assert lines[2].startswith("| `x.json` (2 rounds, seed 3, commit abc1234) | ")  # named once, on its first row
    assert "|  | LS TTFT p50, a / b | 0.38 | 0.25-0.50 (n=2) | 0.50 / 0.25 |" in lines
    assert "|  | LS TPOT p50, b / idle floor | 1.00 | 1.00-1.00 (n=2) | 1.00 / 1.00 |" in lines
    assert "|  | LS E2E mean, b / idle floor | 6.00 | 4.00-8.00 (n=2) | 4.00 / 8.00 |" in lines
    assert "|  | LS TTFT p99, b / idle floor p50 | 12.00 | 8.00-16.00 (n=2) | 8.00 / 16.00 |" in lines  # the targets'
    assert "|  | LS SLO attainment (TTFT and TPOT), b | 0.50 | 0.50-0.50 (n=2) | 0.50 / 0.50 |" in lines
    assert "|  | LS E2E mean, a / b | 0.38 | 0.25-0.50 (n=2) | 0.50 / 0.25 |" in lines
    assert not any("BE output" in line for line in lines)  # a ratio no round has is left out, not shown as 0
    assert "|  | LS E2E mean, a / idle floor | 2.00 | 2.00-2.00 (n=2) | 2.00 / 2.00 |" in lines  # baseline vs floor
    assert not any("a / a" in line for line in lines)  # but not against itself


def test_docs_have_a_current_headline_of_committed_results():
    found = 0
    for md in DOCS.rglob("*.md"):
        for paths, body in report_command.headline_blocks(md.read_text()).items():
            found += 1
            for rel in paths:
                assert (md.parent / rel).is_file(), f"{md}: headline names {rel}, which is not there"
            assert body == report_command.headline_body(list(paths), md.parent), (
                f"{md}: the headline block is stale; run `qllm bench report --update {md}`")
    assert found


def test_update_rewrites_a_stale_headline(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps(_round_doc([2.0, 2.0, 3.0])))
    md = tmp_path / "doc.md"
    md.write_text("# Doc\n\n<!-- bench-headline: x.json -->\n| typed |\n<!-- /bench-headline -->\n")
    assert report_command.run(_args(["report", "--update", str(md), "--check"])) == 1
    assert report_command.run(_args(["report", "--update", str(md)])) == 0
    text = md.read_text()
    assert "| typed |" not in text and "LS TTFT p50, a / b | 0.50 | 0.33-0.50 (n=3) | 0.50 / 0.50 / 0.33 |" in text
    assert report_command.run(_args(["report", "--update", str(md), "--check"])) == 0
