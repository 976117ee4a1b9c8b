"""`qllm bench report`: the Markdown tables of committed result JSONs, so that the tables in docs/ are
generated from the data, never typed by hand.

    qllm bench report docs/results/mixed.json [more.json ...] [--out FILE.md]   # tables to stdout or FILE.md
    qllm bench report --update docs/benchmarks.md [--check]                    # rewrite the marked blocks

A marked block in a Markdown file is

    <!-- bench-report: results/mixed.json -->
    (generated; rewritten by --update)
    <!-- /bench-report -->

with the JSON's path relative to that Markdown file. It reads a `qllm bench` result (bench/report.py) or a
`scripts/peer_vllm.py` one (bench/peer_vllm.py); a summary-only JSON (`qllm bench --summary-only`) is enough.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

BLOCK = re.compile(r"(<!-- bench-report: (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- /bench-report -->)", re.DOTALL)


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


def render_file(path: str | Path) -> str:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    try:
        return tables(doc)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def block_body(json_path: str | Path) -> str:
    """What goes between a block's markers."""
    return "\n" + render_file(json_path) + "\n"


def update_text(text: str, base_dir: str | Path) -> tuple[str, list[str]]:
    """The Markdown with every marked block regenerated (JSON paths relative to base_dir), and the paths of
    the blocks whose content changed."""
    changed: list[str] = []

    def regenerate(m: re.Match) -> str:
        body = block_body(Path(base_dir) / m.group("path"))
        if body != m.group("body"):
            changed.append(m.group("path"))
        return m.group(1) + body + m.group(4)

    return BLOCK.sub(regenerate, text), changed


def blocks(text: str) -> dict[str, str]:
    """{JSON path as written in the marker: the block's current content}."""
    return {m.group("path"): m.group("body") for m in BLOCK.finditer(text)}


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.description = __doc__.split("\n\n")[0]
    p.add_argument("files", nargs="*", metavar="FILE.json", help="result JSONs to render, in this order")
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
            out = "\n".join(f"## `{path}`\n\n{render_file(path)}" for path in args.files)
            if args.report_out:
                Path(args.report_out).write_text(out)
            else:
                sys.stdout.write(out)
        if args.update:
            doc_path = Path(args.update)
            text = doc_path.read_text()
            if not blocks(text):
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
