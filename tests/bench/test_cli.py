"""`qllm bench` end to end against the fake Router (no model): files written, schema valid, floor and SLO
from the same invocation, policies mapped to stack configurations."""

import json

import pytest

import bench.cli as bench_cli
from bench import runner
from qllm.cli import build_parser
from qllm.up import ROUTER_PORT


def _args(argv):
    parser, module = build_parser(["bench", *argv])
    assert module is bench_cli
    return parser.parse_args(["bench", *argv])


FAST = ["--duration", "1.5", "--drain-cap", "3", "--ls-rate", "4", "--be-rate", "2", "--be-prompt-tokens",
        "40:80", "--be-output-tokens", "4:8", "--ls-output-tokens", "3:6", "--ls-prompt-tokens", "8:16",
        "--floor-requests", "3", "--warmup", "1", "--no-progress"]


@pytest.fixture
def data_env(tiny_data, tiny_tokenizer, monkeypatch, tmp_path):
    monkeypatch.setenv("QLLM_SHARED_DATA", str(tiny_data))
    tok = tmp_path / "tok.json"
    tok.write_text(open(tiny_tokenizer.name).read())
    return str(tok)


async def test_target_mode_writes_everything(fake_router, data_env, tmp_path):
    address, script = fake_router
    out = tmp_path / "out"
    rc = await bench_cli.run(_args(["--target", address, "--tokenizer", data_env, "--out", str(out), *FAST]))
    assert rc == 0
    doc = json.loads((out / "mixed.json").read_text())
    assert doc["scenario"] == "mixed" and doc["params"]["mode"] == "target"
    assert [r["policy"] for r in doc["runs"]] == ["target"]
    floor = doc["params"]["floor"]["classes"]["LS"]
    assert floor["count"] == 3
    # the scripted LS TTFT is 80 ms; SLO = 5 x floor p50
    assert floor["ttft_ms"]["p50"] == pytest.approx(80, abs=30)
    assert doc["params"]["slo"]["LS"]["ttft_ms"] == pytest.approx(5 * floor["ttft_ms"]["p50"])
    run = doc["runs"][0]
    assert run["classes"]["LS"]["errors"] == 0 and run["classes"]["LS"]["slo_attainment"] == 1.0
    assert run["classes"]["BE"]["count"] == doc["params"]["workload"]["classes"]["BE"]["count"] > 0
    assert run["classes"]["BE"]["ttft_ms"]["p50"] == pytest.approx(150, abs=40)
    for name in ("mixed.md", "mixed-ttft-cdf.png", "mixed.requests.jsonl"):
        assert (out / name).is_file()
    # warmup (1 LS + 1 BE) + floor (3 LS) + the measured requests
    assert len(script.seen) == 2 + 3 + run["classes"]["LS"]["count"] + run["classes"]["BE"]["count"]


async def test_stack_mode_one_fresh_stack_per_policy(fake_router, data_env, tmp_path, monkeypatch):
    """Stack mode with Stack replaced: the fake router plays the stack at the address the config names."""
    address, _ = fake_router
    port = int(address.rsplit(":", 1)[1])
    started = []

    class FakeStack:
        def __init__(self, cfg):
            self.config = cfg

        def start(self, timeout_s):
            started.append(self.config)
            return self

        def stop(self):
            started.append("stop")

    monkeypatch.setattr(runner, "Stack", FakeStack)
    monkeypatch.setattr(runner, "_port_free", lambda host, port: True)
    out = tmp_path / "out"
    rc = await bench_cli.run(_args(["--policies", "fcfs,qllm", "--port-offset", str(port - ROUTER_PORT),
                                    "--tokenizer", data_env, "--out", str(out), "--sweep", "be-rate=0,2",
                                    *FAST]))
    assert rc == 0
    configs = [c for c in started if c != "stop"]
    assert [c.policy for c in configs] == ["fcfs", "fcfs", "qllm", "qllm"]
    assert started.count("stop") == 4
    doc = json.loads((out / "mixed.json").read_text())
    assert [(r["policy"], r["sweep"]["be-rate"]) for r in doc["runs"]] == [
        ("fcfs", 0.0), ("fcfs", 2.0), ("qllm", 0.0), ("qllm", 2.0)]
    assert "BE" not in doc["runs"][0]["classes"] and "BE" in doc["runs"][1]["classes"]
    assert doc["runs"][2]["stack"]["worker_policy"] == "qllm"
    assert (out / "mixed-sweep.png").is_file()


async def test_idle_ls_scenario(fake_router, data_env, tmp_path):
    address, _ = fake_router
    out = tmp_path / "out"
    rc = await bench_cli.run(_args(["--scenario", "idle-ls", "--target", address, "--tokenizer", data_env,
                                    "--out", str(out), *FAST]))
    assert rc == 0
    doc = json.loads((out / "idle-ls.json").read_text())
    assert doc["params"]["floor"] is None and list(doc["runs"][0]["classes"]) == ["LS"]
    assert doc["params"]["slo"]["LS"]["ttft_ms"] == pytest.approx(5 * doc["runs"][0]["classes"]["LS"]["ttft_ms"]["p50"])


async def test_bad_arguments_are_clear(capsys, data_env):
    assert await bench_cli.run(_args(["--policies", "fcfs,nope", "--tokenizer", data_env])) == 2
    assert "known: fcfs, priority, qllm" in capsys.readouterr().err
    assert await bench_cli.run(_args(["--sweep", "speed=1,2", "--tokenizer", data_env])) == 2
    assert "be-rate" in capsys.readouterr().err
    assert await bench_cli.run(_args(["--openai-url", "http://x:1", "--tokenizer", data_env])) == 2
    assert "--model" in capsys.readouterr().err


async def test_dry_run(data_env, capsys):
    assert await bench_cli.run(_args(["--dry-run", "--tokenizer", data_env, "--duration", "5"])) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["classes"]["LS"]["count"] > 0 and info["classes"]["BE"]["count"] > 0


async def test_stack_that_fails_to_start_keeps_earlier_results(fake_router, data_env, tmp_path, monkeypatch):
    address, _ = fake_router
    port = int(address.rsplit(":", 1)[1])
    stopped = []

    class FlakyStack:
        def __init__(self, cfg):
            self.config = cfg

        def start(self, timeout_s):
            if self.config.policy == "qllm":
                raise RuntimeError("worker0 exited with 1 before it was ready")
            return self

        def stop(self):
            stopped.append(self.config.policy)

    monkeypatch.setattr(runner, "Stack", FlakyStack)
    monkeypatch.setattr(runner, "_port_free", lambda host, port: True)
    out = tmp_path / "out"
    rc = await bench_cli.run(_args(["--policies", "fcfs,qllm,priority", "--port-offset", str(port - ROUTER_PORT),
                                    "--tokenizer", data_env, "--out", str(out), *FAST]))
    assert rc == 1
    assert stopped == ["fcfs", "qllm"]  # priority never started
    doc = json.loads((out / "mixed.json").read_text())
    assert [r["policy"] for r in doc["runs"]] == ["fcfs"]
    assert "worker0 exited" in doc["params"]["incomplete"]
