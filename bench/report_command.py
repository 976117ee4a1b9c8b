"""`qllm bench report`: the Markdown tables of committed result JSONs, so that the tables in docs/ are
generated from the data, never typed by hand.

    qllm bench report docs/results/mixed.json [more.json ...] [--out FILE.md]   # tables to stdout or FILE.md
    qllm bench report --headline docs/results/a.json [b.json ...]               # the headline table of several
    qllm bench report --update docs/benchmarks.md [--check]                    # rewrite the marked blocks

A marked block in a Markdown file is

    <!-- bench-report: results/mixed.json -->
    (generated; rewritten by --update)
    <!-- /bench-report -->

with the JSON's path relative to that Markdown file, and a headline block

    <!-- bench-headline: results/a.json results/b.json -->
    (generated: a few ratios of each, median and range over its rounds; bench/headline.py)
    <!-- /bench-headline -->

takes several. It reads a `qllm bench` result (bench/report.py) or a
`scripts/peer_vllm.py` one (bench/peer_vllm.py); a summary-only JSON (`qllm bench --summary-only`) is enough.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

BLOCK = re.compile(r"(<!-- bench-report: (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- /bench-report -->)", re.DOTALL)
HEADLINE = re.compile(r"(<!-- bench-headline: (?P<paths>[^>]+?) -->\n)(?P<body>.*?)(<!-- /bench-headline -->)",
                      re.DOTALL)


def tables(doc: dict) -> str:
    """The report of one result document without its title line (the block sits under a docs heading)."""
    if "runs" in doc:
        from bench import report

        report.validate(doc)
        text = report.markdown(doc)
    elif "rounds" in doc and "summary" in doc:  # scripts/peer_vllm.py's side-by-side result
        from bench import peer_vllm

        text = peer_vllm.markdown(doc)
    else:
        raise ValueError("neither a `qllm bench` result (runs) nor a scripts/peer_vllm.py one (rounds, summary)")
    lines = text.splitlines()
    while lines and (lines[0].startswith("# ") or not lines[0].strip()):
        lines.pop(0)
    return "\n".join(lines).rstrip("\n") + "\n"


def _load(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: {exc}") from None


def render_file(path: str | Path) -> str:
    doc = _load(path)
    try:
        return tables(doc)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def block_body(json_path: str | Path) -> str:
    """What goes between a block's markers."""
    return "\n" + render_file(json_path) + "\n"


def headline_body(paths: list[str], base_dir: str | Path) -> str:
    """What goes between a headline block's markers (paths as written in the marker)."""
    from bench import headline

    return "\n" + headline.markdown([(p, _load(Path(base_dir) / p)) for p in paths]) + "\n"


def update_text(text: str, base_dir: str | Path) -> tuple[str, list[str]]:
    """The Markdown with every marked block regenerated (JSON paths relative to base_dir), and the paths of
    the blocks whose content changed."""
    changed: list[str] = []

    def regenerate(m: re.Match) -> str:
        body = block_body(Path(base_dir) / m.group("path"))
        if body != m.group("body"):
            changed.append(m.group("path"))
        return m.group(1) + body + m.group(4)

    def regenerate_headline(m: re.Match) -> str:
        body = headline_body(m.group("paths").split(), base_dir)
        if body != m.group("body"):
            changed.append("headline: " + m.group("paths"))
        return m.group(1) + body + m.group(4)

    return HEADLINE.sub(regenerate_headline, BLOCK.sub(regenerate, text)), changed


def blocks(text: str) -> dict[str, str]:
    """{JSON path as written in the marker: the block's current content}."""
    return {m.group("path"): m.group("body") for m in BLOCK.finditer(text)}


def headline_blocks(text: str) -> dict[tuple[str, ...], str]:
    """{the JSON paths of a headline marker: the block's current content}."""
    return {tuple(m.group("paths").split()): m.group("body") for m in HEADLINE.finditer(text)}


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.description = __doc__.split("\n\n")[0]
    p.add_argument("files", nargs="*", metavar="FILE.json", help="result JSONs to render, in this order")
    p.add_argument("--headline", action="store_true",
                   help="print the headline table of the FILE.json(s) (a few ratios each, median and range over "
                        "rounds) instead of their full tables")
    p.add_argument("--out", dest="report_out", default=None, help="write the tables here instead of stdout")
    p.add_argument("--update", default=None, metavar="DOC.md",
                   help="regenerate the marked blocks (<!-- bench-report: PATH.json --> ... <!-- /bench-report -->) "
                        "in DOC.md, PATH relative to DOC.md")
    p.add_argument("--check", action="store_true",
                   help="with --update: change nothing, exit 1 when a block is not what its JSON gives")


def run(args: argparse.Namespace) -> int:
    if not args.files and not args.update:
        print("qllm bench report: give FILE.json(s) or --update DOC.md", file=sys.stderr)
        return 2
    if args.check and not args.update:
        print("qllm bench report: --check goes with --update", file=sys.stderr)
        return 2
    try:
        if args.files:
            if args.headline:
                out = headline_body(args.files, ".").lstrip("\n")
            else:
                out = "\n".join(f"## `{path}`\n\n{render_file(path)}" for path in args.files)
            if args.report_out:
                Path(args.report_out).write_text(out)
            else:
                sys.stdout.write(out)
        if args.update:
            doc_path = Path(args.update)
            text = doc_path.read_text()
            if not blocks(text) and not headline_blocks(text):
                print(f"qllm bench report: {doc_path} has no <!-- bench-report: PATH.json --> block", file=sys.stderr)
                return 2
            new_text, changed = update_text(text, doc_path.parent)
            if args.check:
                if changed:
                    print(f"qllm bench report: {doc_path}: stale block(s) for {', '.join(changed)}; run "
                          f"`qllm bench report --update {doc_path}`", file=sys.stderr)
                    return 1
                return 0
            if changed:
                doc_path.write_text(new_text)
            print(f"qllm bench report: {doc_path}: {len(changed)} block(s) rewritten", file=sys.stderr)
    except (OSError, ValueError) as exc:
        print(f"qllm bench report: {exc}", file=sys.stderr)
        return 2
    return 0
