"""Small native CPU kernels (worker/csrc/*.c), built on first use with the machine's C compiler into one library.

The library is built once into a per-user cache keyed by the sources, the flags, the compiler and the CPU
(-march=native), then loaded with ctypes. Where there is no compiler, or `QLLM_NATIVE=0` (or a kernel's own
switch) turns it off, `kernel` returns None and callers take their torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from qllm.logs import get_logger

log = get_logger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC", "-std=gnu11")
LIBRARY = "qllm_kernels"

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_library_tried = False


def _sources() -> list[Path]:
    return sorted(CSRC.glob("*.c"))


def _cache_dir() -> Path:
    root = os.environ.get("QLLM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "qllm")
    return Path(root) / "kernels"


def _build_key(compiler: str) -> str:
    """The library's name changes with the sources, the flags, the compiler and the CPU (-march=native)."""
    h = hashlib.sha256()
    for path in sorted(CSRC.iterdir()):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    h.update(" ".join((compiler,) + CFLAGS).encode())
    h.update(platform.machine().encode())
    try:
        with open("/proc/cpuinfo") as f:
            h.update(next((line for line in f if line.startswith("flags")), "").encode())
    except OSError:
        pass
    return h.hexdigest()[:16]


def _compile() -> ctypes.CDLL | None:
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        log.warning("no C compiler: the torch paths are used instead of the native kernels")
        return None
    target = _cache_dir() / f"{LIBRARY}-{_build_key(compiler)}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build beside the target, then rename: workers starting together never load a half-written file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            subprocess.run([compiler, *CFLAGS, "-o", tmp, *map(str, _sources()), "-lm"], check=True,
                           capture_output=True, timeout=180)
            os.replace(tmp, target)
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            log.warning("native kernels did not compile; the torch paths are used instead", error=str(exc),
                        stderr=detail.decode(errors="replace")[-2000:])
            return None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return ctypes.CDLL(str(target))


def library() -> ctypes.CDLL | None:
    """The built library, or None when it cannot be built here (tried once per process)."""
    global _library, _library_tried
    if not _library_tried:
        with _lock:
            if not _library_tried:
                if os.environ.get("QLLM_NATIVE", "1") != "0":
                    _library = _compile()
                _library_tried = True
    return _library


def kernel(symbol: str, restype, argtypes: list, env_switch: str | None = None):
    """One function of the library with its ctypes signature, or None (no library, or `env_switch`=0)."""
    if env_switch is not None and os.environ.get(env_switch, "1") == "0":
        return None
    lib = library()
    if lib is None:
        return None
    fn = getattr(lib, symbol)
    if fn.argtypes is None:
        fn.restype, fn.argtypes = restype, argtypes
    return fn
