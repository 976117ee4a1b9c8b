"""Shared by the deploy tests: the real flags of each `qllm <service>` and their QLLM_* variables."""

from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path

import pytest

from qllm import settings
from qllm.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SERVICES = ("router", "worker", "predictor", "kvmanager")


def _service_parser(service: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"qllm {service}")
    importlib.import_module(COMMANDS[service][0]).configure_parser(parser)
    return parser


def _env_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {settings.env_name(a.option_strings[0]): a for a in parser._actions
            if a.option_strings and a.option_strings[0].startswith("--") and a.dest != "help"}


@pytest.fixture
def parse_service_env(monkeypatch):
    """parse_service_env(service, {QLLM_X: value}) -> argparse.Namespace, as the service would see that
    environment; fails on a variable that is no flag of the service, a value of the wrong type, or one
    outside the flag's choices."""

    def parse(service: str, env: dict[str, str]) -> argparse.Namespace:
        for name in list(os.environ):
            if name.startswith("QLLM_"):
                monkeypatch.delenv(name)
        known = _env_actions(_service_parser(service))
        unknown = sorted(k for k in env if k.startswith("QLLM_") and k not in known)
        assert not unknown, f"{service}: {unknown} are not flags of `qllm {service}` (known: {sorted(known)})"
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        parser = _service_parser(service)  # reads the environment now; a bad value raises here
        args = parser.parse_args([])
        for name, action in _env_actions(parser).items():
            if name in env and action.choices is not None:
                assert getattr(args, action.dest) in action.choices, f"{name}={env[name]!r}: not in {action.choices}"
        for name in env:
            monkeypatch.delenv(name, raising=False)
        return args

    return parse


@pytest.fixture(scope="session")
def drain_grace_s() -> float:
    from qllm import serving
    return float(serving.Service.__dataclass_fields__["grace_s"].default)
