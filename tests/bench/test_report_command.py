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
