"""qllm/internal_auth.py without a stack: the token file, rotation, and what `qllm up` hands its services;
qllm/decoding.py's messages for bytes that do not decode."""

import os
import stat

import pytest

from qllm import internal_auth
from qllm.decoding import describe, find_bad_utf8
from qllm.internal_auth import InternalToken, InternalTokenError
from qllm.up import Stack, StackConfig
from qllm.v1 import router_pb2, worker_pb2


def test_written_token_file_is_private_and_accepted(tmp_path):
    path = tmp_path / "token"
    token = internal_auth.write_token_file(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = InternalToken.from_file(path)
    assert loaded.current == token and loaded.accepts(token) and loaded.accepts(token.encode())
    assert not loaded.accepts(None) and not loaded.accepts("") and not loaded.accepts(token + "x")


def test_rotation_accepts_every_listed_token_presents_the_first_and_rereads_the_file(tmp_path):
    old, new = "old-token-" + "a" * 16, "new-token-" + "b" * 16
    path = tmp_path / "token"
    path.write_text(old + "\n")
    token = InternalToken.from_file(path)
    assert token.accepts(old) and not token.accepts(new)
    path.write_text(f"{old}\n{new}\n")           # step 1: both accepted, the old one still presented
    assert token.accepts(new) and token.accepts(old) and token.current == old
    path.write_text(f"# rotated\n{new}\n{old}\n")  # step 2: the new one presented
    assert token.current == new
    path.write_text(new + "\n")                   # step 3: the old one refused
    assert not token.accepts(old) and token.accepts(new)
    path.write_text("")                           # a broken rewrite keeps the tokens in use
    assert token.current == new


@pytest.mark.parametrize("content", ["", "# only a comment\n", "short\n", "has a space in it 0123456789\n"])
def test_unusable_token_files_name_the_flag(tmp_path, content):
    path = tmp_path / "token"
    path.write_text(content)
    with pytest.raises(InternalTokenError, match="^--internal-token-file:"):
        InternalToken.from_file(path)
    with pytest.raises(InternalTokenError, match="^--internal-token-file: cannot read"):
        InternalToken.from_file(tmp_path / "missing")


def test_qllm_up_generates_a_token_for_its_services(monkeypatch):
    monkeypatch.delenv("QLLM_INTERNAL_TOKEN_FILE", raising=False)
    stack = Stack(StackConfig())
    stack._make_token()
    path = stack._env["QLLM_INTERNAL_TOKEN_FILE"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stack.internal_token.accepts(open(path).read().strip())
    stack.stop()                                  # no process started: only the token goes
    assert not os.path.exists(path)


def test_undecodable_messages_name_the_field_or_the_type():
    raw = worker_pb2.WorkerCommand(submit=worker_pb2.SubmitRequest(request_id="r", prompt="PLACEHOLDER")
                                   ).SerializeToString().replace(b"PLACEHOLDER", b"ok \xe2\x82 cut")
    assert find_bad_utf8(worker_pb2.WorkerCommand.DESCRIPTOR, raw) == "submit.prompt: invalid UTF-8 at byte 3"
    assert describe(worker_pb2.WorkerCommand, raw, ValueError("x")).startswith("submit.prompt: invalid UTF-8")
    assert describe(router_pb2.GenerateRequest, b"\xff\xff", ValueError("bad")) == (
        "request: 2 bytes are not a valid qllm.v1.GenerateRequest message (bad)")
    good = router_pb2.GenerateRequest(prompt="fine", request_id="ok").SerializeToString()
    assert find_bad_utf8(router_pb2.GenerateRequest.DESCRIPTOR, good) is None
