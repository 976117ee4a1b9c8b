"""deploy/systemd: the units parse and say what they must; the example env files hold real flags."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

SYSTEMD = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
ENV_DIR = SYSTEMD / "env"
UNITS = {"router": "qllm-router.service", "worker": "qllm-worker@.service",
         "predictor": "qllm-predictor.service", "kvmanager": "qllm-kvmanager.service"}
ENV_FILES = {"router": ["router.env"], "worker": ["worker.env", "worker-%i.env"],
             "predictor": ["predictor.env"], "kvmanager": ["kvmanager.env"]}


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as (key, value) lists: systemd keys may repeat, which configparser refuses."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"{path.name}:{lineno}: keep directives on one line"
        if line.startswith("["):
            assert line.endswith("]"), f"{path.name}:{lineno}: bad section header"
            current = line[1:-1]
            assert current not in sections, f"{path.name}: section [{current}] twice"
            sections[current] = []
            continue
        assert current is not None, f"{path.name}:{lineno}: directive outside a section"
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", key.strip()), f"{path.name}:{lineno}: {line!r}"
        sections[current].append((key.strip(), value.strip()))
    return sections


def values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in section if k == key]


def one(section: list[tuple[str, str]], key: str) -> str:
    found = values(section, key)
    assert len(found) == 1, f"{key}: {found}"
    return found[0]


def seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit or "s"]
    return total


def parse_env_file(path: Path) -> dict[str, str]:
    env = {}
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"{path.name}:{lineno}: {line!r}"
        # systemd takes everything after '=' literally: an inline comment would become part of the value.
        assert "#" not in value and not value.startswith(("'", '"')), f"{path.name}:{lineno}: {line!r}"
        assert key not in env, f"{path.name}: {key} twice"
        env[key] = value
    return env


@pytest.mark.parametrize("service", UNITS)
def test_unit_runs_the_service_from_its_env_files(service, drain_grace_s):
    unit = parse_unit(SYSTEMD / UNITS[service])
    assert set(unit) == {"Unit", "Service", "Install"}
    assert one(unit["Unit"], "Description")
    assert "network-online.target" in one(unit["Unit"], "After")
    assert one(unit["Unit"], "PartOf") == "qllm.target"
    svc = unit["Service"]
    argv = shlex.split(one(svc, "ExecStart"))
    assert Path(argv[0]).name == "qllm" and argv[1:] == [service], argv  # settings come from the env only
    env_files = [v.lstrip("-") for v in values(svc, "EnvironmentFile")]
    assert env_files == ["/etc/qllm/common.env", *(f"/etc/qllm/{name}" for name in ENV_FILES[service])]
    assert values(svc, "EnvironmentFile")[0].startswith("-")  # common.env is optional, the service's is not
    assert one(svc, "Restart") == "on-failure"
    assert one(svc, "KillSignal") == "SIGTERM"
    assert seconds(one(svc, "TimeoutStopSec")) > drain_grace_s + 5
    assert one(unit["Install"], "WantedBy") == "qllm.target"


@pytest.mark.parametrize("service", UNITS)
def test_unit_hardening(service):
    text = (SYSTEMD / UNITS[service]).read_text()
    svc = parse_unit(SYSTEMD / UNITS[service])["Service"]
    assert one(svc, "DynamicUser") == "yes" or one(svc, "User") == "qllm"
    for key, expected in [("ProtectSystem", "strict"), ("ProtectHome", "yes"), ("PrivateTmp", "yes"),
                          ("NoNewPrivileges", "yes"), ("CapabilityBoundingSet", ""),
                          ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX")]:
        assert one(svc, key) == expected, key
    assert not values(svc, "MemoryDenyWriteExecute")  # breaks torch's JIT; the unit says why
    assert re.search(r"^# MemoryDenyWriteExecute=yes is .*NOT set", text, re.M)
    if service == "worker":
        assert not values(svc, "PrivateDevices")  # /dev/nvidia*
        assert "CUDA_VISIBLE_DEVICES=%i" in values(svc, "Environment")
    else:
        assert one(svc, "PrivateDevices") == "yes"


@pytest.mark.parametrize("service", UNITS)
def test_unit_loads_the_internal_token(service):
    """Issue 16: every service authenticates internal calls with the shared token, handed over as a credential
    (the unit does not start without it) and named by QLLM_INTERNAL_TOKEN_FILE."""
    svc = parse_unit(SYSTEMD / UNITS[service])["Service"]
    assert "internal-token:/etc/qllm/internal-token" in values(svc, "LoadCredential")
    assert "QLLM_INTERNAL_TOKEN_FILE=%d/internal-token" in values(svc, "Environment")


def test_kvmanager_calls_only_the_routers_workers(parse_service_env):
    common = parse_env_file(ENV_DIR / "common.env")
    router = parse_service_env("router", {**common, **parse_env_file(ENV_DIR / "router.env")})
    kvmanager = parse_service_env("kvmanager", {**common, **parse_env_file(ENV_DIR / "kvmanager.env")})
    assert kvmanager.workers == router.workers


def test_target_pulls_in_the_services():
    target = parse_unit(SYSTEMD / "qllm.target")
    wants = one(target["Unit"], "Wants").split()
    assert sorted(wants) == sorted(u for u in UNITS.values() if "@" not in u)
    assert one(target["Install"], "WantedBy") == "multi-user.target"


def test_env_files_hold_real_flags_with_valid_values(parse_service_env):
    common = parse_env_file(ENV_DIR / "common.env")
    assert common["QLLM_HOST"] == "127.0.0.1"
    for service in UNITS:
        args = parse_service_env(service, common)  # every service accepts the common settings
        assert args.host == "127.0.0.1"
    seen_ports = {}
    for service, files in ENV_FILES.items():
        instances = sorted(ENV_DIR.glob("worker-*.env")) if service == "worker" else [None]
        assert instances, "no example worker-N.env"
        for instance in instances:
            env = dict(common)
            for name in files:
                env.update(parse_env_file(instance if "%i" in name else ENV_DIR / name))
            args = parse_service_env(service, env)
            label = instance.name if instance else service
            for port in (args.port, args.metrics_port):
                assert port not in seen_ports, f"{label}: port {port} also used by {seen_ports[port]}"
                seen_ports[port] = label
    router = parse_service_env("router", {**common, **parse_env_file(ENV_DIR / "router.env")})
    worker_ports = sorted(int(parse_env_file(p)["QLLM_PORT"]) for p in ENV_DIR.glob("worker-*.env"))
    assert sorted(int(a.rsplit(":", 1)[1]) for a in router.workers.split(",")) == worker_ports
    assert router.predictor.endswith(":" + parse_env_file(ENV_DIR / "predictor.env")["QLLM_PORT"])
    assert router.kvmanager.endswith(":" + parse_env_file(ENV_DIR / "kvmanager.env")["QLLM_PORT"])
    assert router.host == "0.0.0.0"  # the one public service


@pytest.fixture
def verifiable_units(tmp_path) -> list[Path]:
    """Copies of the units whose ExecStart points at a binary that exists here, with worker@0 instantiated."""
    units = []
    for path in [*SYSTEMD.glob("*.service"), SYSTEMD / "qllm.target"]:
        text = path.read_text().replace("/opt/qllm/venv/bin/qllm", shutil.which("true") or "/bin/true")
        name = path.name.replace("@.service", "@0.service")
        (tmp_path / name).write_text(text)
        units.append(tmp_path / name)
    return units


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(verifiable_units):
    proc = subprocess.run(["systemd-analyze", "verify", *map(str, verifiable_units)], capture_output=True,
                          text=True, timeout=120)
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if "qllm" in line]
    assert proc.returncode == 0 and not ours, proc.stdout + proc.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_security_exposure(verifiable_units):
    for unit in verifiable_units:
        if unit.suffix != ".service":
            continue
        proc = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0 and "offline" in proc.stderr:
            pytest.skip("systemd-analyze security --offline needs systemd >= 250")
        match = re.search(r"Overall exposure level for \S+: ([\d.]+)", proc.stdout)
        assert match, proc.stdout + proc.stderr
        assert float(match.group(1)) <= 2.0, f"{unit.name}: exposure {match.group(1)}"
