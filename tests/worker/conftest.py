import os
import random
import time

import pytest
import torch

from worker.engine_core import EngineConfig, EngineCore
from worker.model_loader import build_default_model, load_model
from worker.model_runner import ModelRunner

torch.set_num_threads(1)

# QLLM_TEST_DEVICE=cuda runs the engine tests that use these fixtures on a GPU (a device check; CI is CPU).
DEVICE = os.environ.get("QLLM_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session")
def reference_model():
    """The embedded default with stock attention, for transformers' own generate()."""
    return build_default_model().to(DEVICE)


@pytest.fixture
def loaded():
    """A fresh embedded default for the engine (the runner switches its attention implementation)."""
    return load_model(None, device=DEVICE)


@pytest.fixture
def make_runner(loaded):
    def _make(num_blocks=256, block_size=16):
        return ModelRunner(loaded, num_blocks, block_size)
    return _make


@pytest.fixture(scope="session")
def reference_tokens(reference_model):
    """Greedy tokens from transformers' generate() on the embedded default."""
    def _generate(prompt_ids, max_new_tokens):
        out = reference_model.generate(torch.tensor([prompt_ids], device=DEVICE), max_new_tokens=max_new_tokens,
                                       min_new_tokens=max_new_tokens, do_sample=False)
        return out[0, len(prompt_ids):].tolist()
    return _generate


@pytest.fixture
def run_with_random_layer_yields():
    """Runs requests through the real core loop (qllm) with a should-yield that fires at random layer
    boundaries (probability p each); returns the stopped core and every output it gave."""
    def _run(runner, reqs, p=0.4, seed=0, timeout_s=30.0):
        done = []
        core = EngineCore(runner, EngineConfig(policy="qllm", max_num_batched_tokens=64), done.extend)
        rng = random.Random(seed)
        core.scheduler.should_park = lambda plan: rng.random() < p
        for r in reqs:
            core.submit(r)
        core.start()
        try:
            for _ in range(int(timeout_s / 0.05)):
                if sum(o.finished for o in done) == len(reqs):
                    break
                time.sleep(0.05)
        finally:
            core.stop()
        return core, done
    return _run

