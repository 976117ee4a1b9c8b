"""`qllm` command line: one subcommand per service, plus `up`, `export-model` and `bench`.

Service modules are imported lazily so `qllm router` never pays for importing torch.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys

# subcommand -> (module, help). Each module has configure_parser(parser) and run(args) -> int | None.
COMMANDS = {
    "up": ("qllm.up", "start all four services on 127.0.0.1 (foreground; Ctrl-C stops all)"),
    "router": ("router.server", "run the public router (qllm.v1.Router)"),
    "worker": ("worker.server", "run one model worker (qllm.v1.Worker)"),
    "predictor": ("predictor.server", "run the length predictor (qllm.v1.Predictor)"),
    "kvmanager": ("kvmanager.server", "run the KV pin manager (qllm.v1.KVManager)"),
    "export-model": ("worker.export", "write the embedded default model as a Hugging Face checkpoint directory"),
    "bench": ("bench.cli", "replay real traces against the stack and compare policies"),
}


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, object]:
    parser = argparse.ArgumentParser(prog="qllm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text)
    # Only the chosen subcommand's module is imported and configured.
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    module = None
    if chosen is not None:
        module = importlib.import_module(COMMANDS[chosen][0])
        module.configure_parser(sub.choices[chosen])
    return parser, module


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, module = build_parser(argv)
    args = parser.parse_args(argv)
    if module is None:
        parser.print_help()
        return 2
    result = module.run(args)
    if asyncio.iscoroutine(result):
        try:
            result = asyncio.run(result)
        except KeyboardInterrupt:
            result = 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
