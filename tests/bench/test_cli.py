"""`qllm bench` end to end against the fake Router (no model): files written, schema valid, floor and SLO
from the same invocation, policies mapped to stack configurations."""

import json

import pytest

import bench.cli as bench_cli
from bench import report_command, runner
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


async def test_repeat_rotates_the_policies_and_reports_each_ratio_over_the_rounds(fake_router, data_env, tmp_path,
                                                                                   monkeypatch):
    address, script = fake_router
    port = int(address.rsplit(":", 1)[1])
    started = []

    class FakeStack:
        def __init__(self, cfg):
            self.config = cfg

        def start(self, timeout_s):
            started.append(self.config.policy)
            return self

        def stop(self):
            pass

    monkeypatch.setattr(runner, "Stack", FakeStack)
    monkeypatch.setattr(runner, "_port_free", lambda host, port: True)
    out = tmp_path / "out"
    rc = await bench_cli.run(_args(["--policies", "fcfs,qllm", "--repeat", "3", "--port-offset",
                                    str(port - ROUTER_PORT), "--tokenizer", data_env, "--out", str(out),
                                    "--summary-only", *FAST]))
    assert rc == 0
    assert started == ["fcfs", "qllm", "qllm", "fcfs", "fcfs", "qllm"]  # round r starts at policy r mod 2
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["mixed.json", "mixed.md"]
    doc = json.loads((out / "mixed.json").read_text())
    assert doc["params"]["repeat"] == 3
    assert [(r["policy"], r["round"]) for r in doc["runs"]] == [
        ("fcfs", 1), ("qllm", 1), ("qllm", 2), ("fcfs", 2), ("fcfs", 3), ("qllm", 3)]
    rounds = doc["rounds"]
    assert [r["order"] for r in rounds] == [["fcfs", "qllm"], ["qllm", "fcfs"], ["fcfs", "qllm"]]
    # each round measured its own floor on its first stack, and its SLO comes from it
    assert [r["floor"]["policy"] for r in rounds] == ["fcfs", "qllm", "fcfs"]
    for r in rounds:
        floor_p50 = r["floor"]["classes"]["LS"]["ttft_ms"]["p50"]
        assert r["slo"]["LS"]["ttft_ms"] == pytest.approx(5 * floor_p50)
        assert r["comparisons"]["baseline"] == "fcfs"  # the first named policy, whichever ran first
    assert doc["params"]["floor"] == rounds[0]["floor"]
    comp = doc["comparisons"]
    assert comp["baseline"] == "fcfs" and comp["rounds"] == 3
    rows = {r["policy"]: r for r in comp["rows"]}
    per_round = [{row["policy"]: row for row in r["comparisons"]["rows"]}["qllm"]["ls_ttft_p50_vs_floor"]
                 for r in rounds]
    spread = rows["qllm"]["ls_ttft_p50_vs_floor"]
    assert spread == {"median": pytest.approx(sorted(per_round)[1]), "min": min(per_round), "max": max(per_round),
                      "n": 3}
    assert rows["fcfs"]["ls_ttft_p50_vs_baseline"] == {"median": 1.0, "min": 1.0, "max": 1.0, "n": 3}
    assert rows["qllm"]["ls_tpot_p50_vs_baseline"]["n"] == 3  # every ratio of a row, also those not in the table
    md = (out / "mixed.md").read_text()
    assert "median (min-max) over 3 rounds" in md
    assert f"| qllm | {spread['median']:.2f} ({spread['min']:.2f}-{spread['max']:.2f}) |" in md
    assert "| idle floor (qllm) | 2 | LS |" in md and "| qllm | 3 | BE |" in md
    assert "TTFT counts requests without a first token at their cancel time" in md
    # `qllm bench report` gives the same tables from the JSON alone
    assert md == "# Benchmark `mixed`\n\n" + report_command.render_file(out / "mixed.json")
