import os

import pytest

# Nothing is downloaded in tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def lt():
    """An event loop on its own thread for a module's in-process fleets (qllm.testing.fleet.LoopThread)."""
    from qllm.testing.fleet import LoopThread, quiet_logs

    with quiet_logs(), LoopThread() as loop:
        yield loop


@pytest.fixture
def fleet(lt, request):
    """A router + in-process workers on free ports (qllm.testing.fleet.Fleet); parametrize indirectly with its
    keyword arguments (default: one worker)."""
    from qllm.testing.fleet import Fleet

    f = lt.run(Fleet(**getattr(request, "param", {"workers": 1})).start())
    yield f
    lt.run(f.stop())


@pytest.fixture(scope="session")
def internal_token_file(tmp_path_factory) -> str:
    """A file with a fresh internal token, as `qllm up` writes one: in-process services take it (their
    build functions' `internal_token`, the router's `internal_token_file`) as deployed ones do."""
    from qllm import internal_auth

    path = tmp_path_factory.mktemp("internal-token") / "internal-token"
    internal_auth.write_token_file(path)
    return str(path)


@pytest.fixture(scope="session")
def internal_token(internal_token_file):
    from qllm import internal_auth

    return internal_auth.InternalToken.from_file(internal_token_file)
