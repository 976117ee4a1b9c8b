import os
import shutil
import subprocess
from pathlib import Path

import pytest

GEN_CERTS = Path(__file__).resolve().parents[2] / "deploy" / "tls" / "gen-certs.sh"


def make_certs(out: Path, *sans: str) -> Path:
    """A throwaway CA with server and client certificates, made by the shipped deploy/tls/gen-certs.sh."""
    if shutil.which("openssl") is None or shutil.which("bash") is None:
        pytest.skip("openssl CLI not available")
    subprocess.run(["bash", str(GEN_CERTS), str(out), *sans], check=True, capture_output=True, timeout=60,
                   env={**os.environ, "DAYS": "2"})
    return out


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Path:
    return make_certs(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def other_certs(tmp_path_factory) -> Path:
    """A second, unrelated CA and its certificates."""
    return make_certs(tmp_path_factory.mktemp("pki-other"))


@pytest.fixture(scope="session")
def make_pki(tmp_path_factory):
    return lambda *sans: make_certs(tmp_path_factory.mktemp("pki-extra"), *sans)
