# Two entry points for a newcomer: `make demo` and `make test`.
# Everything lives in .venv; nothing is installed outside the checkout.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   := out/tubingen_starry_night.png

.PHONY: demo test bench serve gpu-carry gpu-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# Installs the project, then stylises the bundled Tübingen photo as The Starry Night.
demo: $(VENV)/.installed
	@mkdir -p out
	$(BIN)/nst stylize examples/tubingen.jpg examples/starry_night.jpg -o $(DEMO) --size 384 --steps 80 --overwrite

# Installs the test extra, lints and checks the formatting (ruff, configured in pyproject.toml),
# then runs the whole test suite (CPU; CUDA tests skip without a GPU).
test: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

$(VENV)/.installed-serve: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[serve]'
	touch $@

# Installs the serve extra and starts the HTTP service and its page on http://127.0.0.1:8000 (see README).
serve: $(VENV)/.installed-serve
	$(BIN)/nst serve

# The speed matrix on this machine (see README, "Speed"); results also as JSON under out/.
bench: $(VENV)/.installed-test
	mkdir -p out
	$(BIN)/nst bench --json out/bench.json --overwrite

# The wheels a bare GPU machine lacks, for its Python 3.12, into .gpu-wheels/ (docs/gpu-check.md).
gpu-carry: $(VENV)/.installed
	$(BIN)/python -m bench.carry

# The prepared GPU check, every stage under a time cap (docs/gpu-check.md); results in bench/results/<gpu>/.
# `make gpu-check ARGS=--dry-run` rehearses it on the CPU. It needs no .venv: on a GPU machine without one,
# the machine's own python3 runs it (after the install line in docs/gpu-check.md).
GPU_CHECK_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
gpu-check:
	$(GPU_CHECK_PYTHON) -m bench.gpu_check $(ARGS)

clean:
	rm -rf out .pytest_cache .benchmarks
