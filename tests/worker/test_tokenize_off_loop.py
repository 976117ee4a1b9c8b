"""Issue 16: a huge prompt is tokenized off the worker's event loop, so other requests' tokens keep flowing
on the same Serve stream meanwhile. The tokenizer is a fake that blocks until the test has seen the other
stream move on: tokenized on the loop, it could never be released (it gives up after 5 s and says so)."""

import asyncio
import threading
from dataclasses import dataclass

from qllm.v1 import worker_pb2
from worker.server import WorkerServicer
from worker.tokenize import PromptEncoder

HUGE = "x" * (900 * 1024)


@dataclass
class Out:
    new_token_ids: list
    finished: bool
    finish_reason: str
    num_prompt_tokens: int
    num_output_tokens: int
    cached_prompt_tokens: int = 0
    logprobs: list | None = None
    stop_token_id: int | None = None


class FakeTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "t" * len(ids)


class BlockingTokenizerEngine:
    """encode() of the huge prompt blocks until released; generate() yields a token every 5 ms."""

    tokenizer = FakeTokenizer()
    vocab_size = 8192

    def __init__(self):
        self.huge_started = threading.Event()
        self.release = threading.Event()
        self.released_by_test: bool | None = None

    def encode(self, prompt):
        if len(prompt) < len(HUGE):
            return [1, 2, 3]
        self.huge_started.set()
        self.released_by_test = self.release.wait(timeout=5.0)
        return [1] * 100

    async def generate(self, rid, prompt_ids, sampling, priority, **_):
        for i in range(sampling.max_tokens):
            await asyncio.sleep(0.005)
            last = i == sampling.max_tokens - 1
            yield Out([5], last, "length" if last else "", len(prompt_ids), i + 1)


def submit(rid, prompt, max_tokens):
    return worker_pb2.WorkerCommand(submit=worker_pb2.SubmitRequest(
        request_id=rid, prompt=prompt, priority=1, sampling=worker_pb2.SamplingParams(
            max_tokens=max_tokens, top_p=1.0, ignore_eos=True)))


async def test_other_streams_keep_flowing_while_a_huge_prompt_is_tokenized():
    engine = BlockingTokenizerEngine()
    servicer = WorkerServicer(engine, worker_pb2.WorkerInfo())
    commands: asyncio.Queue = asyncio.Queue()

    async def command_stream():
        while (command := await commands.get()) is not None:
            yield command

    events = servicer.Serve(command_stream(), None)
    commands.put_nowait(submit("bystander", "a short prompt", max_tokens=100))
    first = await asyncio.wait_for(events.__anext__(), 5)
    assert first.request_id == "bystander"

    commands.put_nowait(submit("huge", HUGE, max_tokens=2))
    while not engine.huge_started.is_set():
        await asyncio.wait_for(events.__anext__(), 5)
    # The huge prompt is being tokenized now; the bystander's stream must go on meanwhile.
    moved = 0
    while moved < 10:
        event = await asyncio.wait_for(events.__anext__(), 5)
        moved += event.request_id == "bystander"
    engine.release.set()
    finished = {}
    while len(finished) < 2:
        event = await asyncio.wait_for(events.__anext__(), 10)
        if event.tokens.finished:
            finished[event.request_id] = event.tokens
    commands.put_nowait(None)
    servicer.prompts.close()
    assert engine.released_by_test is True
    assert finished["huge"].completion_tokens == 2 and finished["huge"].prompt_tokens == 100
    assert finished["bystander"].completion_tokens == 100


async def test_short_prompts_are_tokenized_inline_and_long_ones_on_the_pool():
    threads = []
    encoder = PromptEncoder(lambda text: threads.append(threading.current_thread().name) or [len(text)],
                            inline_max_chars=8)
    assert await encoder.encode("short") == [5]
    assert await encoder.encode("a longer prompt") == [15]
    encoder.close()
    assert threads[0] == threading.current_thread().name and threads[1].startswith("tokenize")
